"""Request bodies -> engine requests (order, per-prompt arguments, errors), and
engine outputs -> the /generate and /encode JSON (runtime/response.py)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from runtime.io_struct import EngineRequest, RequestOutput
from runtime.response import embedding_response, generate_response
from runtime.sampling_params import SamplingParams
from server import protocol
from server.protocol import GenerateRequest, ProtocolError


def tokenize(text: str) -> list[int]:
    return [ord(c) for c in text]


def expand(body: dict[str, Any], vocab_size: int | None = 1000) -> protocol.ExpandedRequests:
    if isinstance(body, dict):
        protocol.reject_unsupported(body, protocol.UNSUPPORTED_GENERATE_FIELDS)
    return protocol.expand_generate(protocol.validate_model(GenerateRequest, body), tokenize, vocab_size)


def error_of(body: Any, vocab_size: int | None = 1000) -> str:
    with pytest.raises(ProtocolError) as exc:
        expand(body, vocab_size)
    assert exc.value.status == 400
    return exc.value.message


class WordDecoder:
    def decode(self, token_ids: list[int], **kwargs: Any) -> str:
        return "".join(f"<{t}>" for t in token_ids)


# ----------------------------------------------------------------------------- expansion


def test_single_text_is_one_request() -> None:
    out = expand({"text": "hi", "sampling_params": {"max_new_tokens": 3, "temperature": 0}})
    assert out.is_single and not out.stream
    [req] = out.requests
    assert req.input_ids == [104, 105] and req.text == "hi"
    assert req.sampling_params.max_new_tokens == 3 and req.sampling_params.temperature == 0
    assert len(req.rid) == 32
    assert req.kind == "generate" and req.logprob_start_len == -1 and req.top_logprobs_num == 0


def test_batch_and_n_expand_prompt_major() -> None:
    out = expand({"text": ["a", "b"], "sampling_params": {"n": 3, "sampling_seed": 10}, "rid": ["x", "y"]})
    assert not out.is_single and (out.num_prompts, out.n) == (2, 3)
    assert [r.input_ids for r in out.requests] == [[97]] * 3 + [[98]] * 3
    assert [r.rid for r in out.requests] == ["x_0", "x_1", "x_2", "y_0", "y_1", "y_2"]
    assert [r.sampling_params.sampling_seed for r in out.requests] == [10, 11, 12] * 2
    assert all(r.sampling_params.n == 1 for r in out.requests)
    # Every sample owns its SamplingParams: the engine may write into one without touching the others.
    assert len({id(r.sampling_params) for r in out.requests}) == 6


def test_single_prompt_with_n_is_a_list_answer() -> None:
    out = expand({"input_ids": [1, 2], "sampling_params": {"n": 2}, "rid": "r"})
    assert not out.is_single
    assert [r.rid for r in out.requests] == ["r_0", "r_1"]


def test_per_prompt_arguments() -> None:
    out = expand(
        {
            "input_ids": [[1, 2, 3], [4, 5]],
            "sampling_params": [{"max_new_tokens": 1}, {"max_new_tokens": 2}],
            "return_logprob": [True, False],
            "logprob_start_len": [0, -1],
            "top_logprobs_num": 2,
            "token_ids_logprob": [[7], [8, 9]],
            "return_text_in_logprobs": True,
            "rid": ["a", "b"],
            "stream": True,
        }
    )
    first, second = out.requests
    assert (first.sampling_params.max_new_tokens, second.sampling_params.max_new_tokens) == (1, 2)
    assert (first.return_logprob, second.return_logprob) == (True, False)
    assert (first.logprob_start_len, second.logprob_start_len) == (0, -1)
    assert first.top_logprobs_num == second.top_logprobs_num == 2
    assert (first.token_ids_logprob, second.token_ids_logprob) == ([7], [8, 9])
    assert first.return_text_in_logprobs and first.stream and out.stream


def test_flat_token_ids_logprob_is_shared() -> None:
    out = expand({"input_ids": [[1], [2]], "token_ids_logprob": [5, 6]})
    assert [r.token_ids_logprob for r in out.requests] == [[5, 6], [5, 6]]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "Either text, input_ids or input_embeds should be provided."),
        ({"sampling_params": {}}, "Either text, input_ids or input_embeds should be provided."),
        ({"input_ids": []}, "input_ids cannot be empty."),
        ({"input_ids": [[1], []]}, "input_ids cannot be empty."),
        ({"text": "a", "input_ids": [1]}, "text and input_ids cannot be provided at the same time"),
        ({"text": "a", "input_embeds": [[0.1]]}, "input_embeds is not supported by this server."),
        ({"text": "a", "image_data": "x.png"}, "image_data is not supported by this server."),
        ({"text": "a", "lora_path": "l"}, "lora_path is not supported by this server."),
        (
            {"text": "a", "custom_logit_processor": "p"},
            "custom_logit_processor is not supported by this server.",
        ),
        ({"text": "a", "session_params": {"id": 1}}, "session_params is not supported by this server."),
        ({"text": "a", "sampling_params": {"bogus": 1}}, "Unknown sampling parameter: 'bogus'."),
        ({"text": "a", "sampling_params": {"temperature": -1}}, "temperature must be non-negative, got -1."),
        (
            {"text": "a", "sampling_params": {"max_new_tokens": -5}},
            "max_new_tokens must be at least 0, got -5.",
        ),
        ({"text": "a", "sampling_params": {"max_new_tokens": "x"}}, "max_new_tokens must be an integer"),
        (
            {"text": ["a", "b"], "sampling_params": [{"n": 1}, {"n": 2}]},
            "n must be the same for every prompt",
        ),
        (
            {"text": ["a", "b"], "sampling_params": [{}]},
            "sampling_params has 1 entries but the request has 2",
        ),
        ({"text": ["a", "b"], "rid": ["x"]}, "rid has 1 entries"),
        ({"text": ["a", "b"], "rid": ["x", "x"]}, "rid must be unique"),
        ({"text": "a", "rid": ""}, "rid must not be empty"),
        ({"text": ["a", "b"], "rid": ["x", ""]}, "rid must not be empty"),
        ({"text": ["a", "b"], "return_logprob": [True]}, "return_logprob has 1 entries"),
        ({"input_ids": [1, 5000]}, "input_ids contains token id 5000, outside the vocabulary [0, 1000)."),
        ({"input_ids": [-1]}, "input_ids contains token id -1"),
        ({"input_ids": [1], "token_ids_logprob": [1000]}, "token_ids_logprob contains token id 1000"),
        ({"text": "a", "top_logprobs_num": -1}, "top_logprobs_num must be at least 0"),
        ({"text": "a", "logprob_start_len": -2}, "logprob_start_len must be -1 or at least 0"),
        ({"text": ""}, "text cannot be empty."),
        ({"text": []}, "text cannot be an empty list."),
    ],
)
def test_bad_bodies_name_the_problem(body: dict[str, Any], message: str) -> None:
    assert message in error_of(body)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"text": 5}, "text"),
        ({"input_ids": ["a"]}, "input_ids"),
        ({"input_ids": [1.5]}, "input_ids"),
        ({"input_ids": [True]}, "input_ids"),
        ({"text": "a", "sampling_params": 3}, "sampling_params"),
        ({"text": "a", "stream": "yes"}, "stream"),
        ({"text": "a", "return_logprob": 1}, "return_logprob"),
        ({"text": "a", "rid": 7}, "rid"),
        ({"text": "a", "bogus_field": 1}, "bogus_field"),
    ],
)
def test_wrong_types_name_the_field(body: dict[str, Any], field: str) -> None:
    message = error_of(body)
    assert message.split(":")[0].split(".")[0] == field, message


def test_body_must_be_an_object() -> None:
    assert "must be a JSON object" in error_of([1, 2])  # type: ignore[arg-type]


def test_malformed_json() -> None:
    with pytest.raises(ProtocolError, match="Malformed JSON"):
        protocol.parse_json_body(b'{"text": ')
    with pytest.raises(ProtocolError, match="empty"):
        protocol.parse_json_body(b"  ")
    assert protocol.parse_json_body(b"", allow_empty=True) is None


def test_text_without_tokenizer_is_refused() -> None:
    body = protocol.validate_model(GenerateRequest, {"text": "a"})
    with pytest.raises(ProtocolError, match="--skip-tokenizer-init"):
        protocol.expand_generate(body, None, 100)


def test_encode_expansion() -> None:
    body = protocol.validate_model(protocol.EncodeRequest, {"text": ["ab", "c"], "model": "ignored"})
    out = protocol.expand_encode(body, "embed", tokenize, 1000)
    assert not out.is_single and [r.kind for r in out.requests] == ["embed", "embed"]
    assert [r.input_ids for r in out.requests] == [[97, 98], [99]]
    single = protocol.expand_encode(protocol.EncodeRequest(input_ids=[1, 2]), "classify", None, 1000)
    assert single.is_single and single.requests[0].kind == "classify"


def test_openai_sampling_mapping() -> None:
    body = protocol.validate_model(
        protocol.ChatCompletionRequest,
        {
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "max_completion_tokens": 5,
            "temperature": 0,
            "stop": ["x"],
            "seed": 3,
            "top_k": 4,
            "response_format": {"type": "text"},
            "unknown_openai_field": True,
        },
    )
    params = body.sampling_dict(body.max_new_tokens())
    assert params == {
        "temperature": 0,
        "top_k": 4,
        "stop": ["x"],
        "sampling_seed": 3,
        "max_new_tokens": 5,
    }
    assert body.template_messages() == [{"role": "user", "content": "hi"}]
    image = protocol.validate_model(
        protocol.ChatCompletionRequest,
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]},
    )
    with pytest.raises(ProtocolError, match="only text parts"):
        image.template_messages()
    textless = protocol.validate_model(
        protocol.ChatCompletionRequest, {"messages": [{"role": "user", "content": [{"type": "text"}]}]}
    )
    with pytest.raises(ProtocolError, match=r"content\[0\]: a text part needs its text"):
        textless.template_messages()


def test_openai_response_format_becomes_the_native_grammar() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    formats = [
        ({"type": "json_schema", "json_schema": {"name": "n", "schema": schema, "strict": True}}, schema),
        ({"type": "json_object"}, {"type": "object"}),
    ]
    for response_format, want in formats:
        body = protocol.validate_model(
            protocol.ChatCompletionRequest,
            {"messages": [{"role": "user", "content": "hi"}], "response_format": response_format},
        )
        body.check_supported()
        assert json.loads(body.sampling_dict(None)["json_schema"]) == want
    tag = {"structures": [{"begin": "<f>", "schema": schema, "end": "</f>"}], "triggers": ["<f"]}
    body = protocol.validate_model(
        protocol.ChatCompletionRequest,
        {
            "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "structural_tag", **tag},
        },
    )
    assert json.loads(body.sampling_dict(None)["structural_tag"]) == tag
    completion = protocol.validate_model(
        protocol.CompletionRequest, {"prompt": "hi", "response_format": {"type": "json_object"}}
    )
    completion.check_supported()
    assert json.loads(completion.sampling_dict(16)["json_schema"]) == {"type": "object"}
    both = protocol.validate_model(
        protocol.CompletionRequest, {"prompt": "hi", "response_format": {"type": "json_object"}, "regex": "a"}
    )
    with pytest.raises(ProtocolError, match="response_format cannot be set with regex"):
        both.check_supported()


def test_a_malformed_tool_is_a_400_whatever_the_tool_choice() -> None:
    """With tool_choice auto the tool names still read the answer's calls (`tool_names`): a tool
    without a name is refused before any work, as with tool_choice required."""
    for choice in ("auto", "required"):
        body = protocol.validate_model(
            protocol.ChatCompletionRequest,
            {
                "messages": [{"role": "user", "content": "hi"}],
                "tools": [{"type": "function", "function": {"parameters": {}}}],
                "tool_choice": choice,
            },
        )
        with pytest.raises(ProtocolError, match=r"tools\[0\] must be") as error:
            body.check_supported()
        assert error.value.param == "tools"


def test_openai_chat_roles() -> None:
    body = protocol.validate_model(
        protocol.ChatCompletionRequest,
        {"messages": [{"role": "System", "content": "s"}, {"role": "USER", "content": "x"}]},
    )
    assert [m.role for m in body.messages] == ["system", "user"]
    with pytest.raises(
        ProtocolError, match="role must be one of system, developer, user, assistant"
    ) as error:
        protocol.validate_model(
            protocol.ChatCompletionRequest, {"messages": [{"role": "wizard", "content": "x"}]}
        )
    assert error.value.param == "messages"


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        ({"top_p": 0.0}, "top_p", "top_p must be in (0, 1]"),
        ({"min_tokens": 5}, "min_tokens", "min_tokens must be in [0, max_tokens(2)]"),
        ({"presence_penalty": 9.0}, "presence_penalty", "presence_penalty must be in [-2, 2]"),
    ],
)
def test_openai_sampling_errors_use_the_openai_names(fields: dict, param: str, message: str) -> None:
    body = protocol.validate_model(protocol.CompletionRequest, {"prompt": "x", "max_tokens": 2, **fields})
    with pytest.raises(ProtocolError) as error:
        protocol.parse_openai_sampling(body.sampling_dict(body.max_tokens))
    assert error.value.param == param and error.value.message.startswith(message), error.value.message


def test_openai_null_fields_take_their_defaults() -> None:
    chat = protocol.validate_model(
        protocol.ChatCompletionRequest,
        {"messages": [{"role": "user", "content": "x"}], "n": None, "stream": None, "logprobs": None},
    )
    assert (chat.n, chat.stream, chat.logprobs) == (1, False, False)
    completion = protocol.validate_model(protocol.CompletionRequest, {"prompt": "x", "echo": None, "n": None})
    assert (completion.echo, completion.n) == (False, 1)
    with pytest.raises(ProtocolError, match="messages"):
        protocol.validate_model(protocol.ChatCompletionRequest, {"messages": None})


def test_openai_user_messages_need_content() -> None:
    for messages in ([{"role": "user"}], [{"role": "user", "content": None}]):
        with pytest.raises(ProtocolError, match="a user message needs content"):
            protocol.validate_model(protocol.ChatCompletionRequest, {"messages": messages})
    protocol.validate_model(
        protocol.ChatCompletionRequest,
        {"messages": [{"role": "assistant"}, {"role": "user", "content": "x"}]},
    )


WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CLOCK = {"type": "function", "function": {"name": "clock"}}


def test_forced_tool_calls_are_a_json_array_of_the_tools_calls() -> None:
    """tool_choice required or named constrains the answer to the reference's array of calls, and
    the answer comes back as OpenAI's tool_calls."""

    def sampling(**extra: Any) -> dict[str, Any]:
        body = protocol.validate_model(
            protocol.ChatCompletionRequest,
            {"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER, CLOCK], **extra},
        )
        body.check_supported()
        return body.sampling_dict(None)

    def schema(**extra: Any) -> dict[str, Any]:
        return json.loads(sampling(**extra)["json_schema"])

    named = schema(tool_choice={"type": "function", "function": {"name": "clock"}}, parallel_tool_calls=False)
    assert named == {
        "type": "array",
        "minItems": 1,
        "maxItems": 1,
        "items": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": ["clock"]},
                "parameters": {"type": "object", "properties": {}},
            },
            "required": ["name", "parameters"],
        },
    }
    required = schema(tool_choice="required")
    assert "maxItems" not in required
    assert [item["properties"]["name"]["enum"] for item in required["items"]["anyOf"]] == [
        ["weather"],
        ["clock"],
    ]
    assert required["items"]["anyOf"][0]["properties"]["parameters"] == WEATHER["function"]["parameters"]
    for choice in ("auto", "none", None):
        assert "json_schema" not in sampling(tool_choice=choice)
    calls = protocol.forced_tool_calls(
        '[{"name": "weather", "parameters": {"city": "Zürich"}}, {"name": "clock", "parameters": {}}]'
    )
    assert [call["function"] for call in calls] == [
        {"name": "weather", "arguments": '{"city": "Zürich"}'},
        {"name": "clock", "arguments": "{}"},
    ]
    assert all(call["type"] == "function" and call["id"].startswith("call_") for call in calls)
    assert len({call["id"] for call in calls}) == 2
    for cut in ('[{"name": "weather", "parameters": {"ci', "{}", '[{"parameters": {}}]', ""):
        assert protocol.forced_tool_calls(cut) is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"response_format": {"type": "json_schema"}},
            "response_format json_schema needs json_schema.schema",
        ),
        (
            {"response_format": {"type": "json_object"}, "regex": "a+"},
            "response_format cannot be set with regex, json_schema or ebnf.",
        ),
        ({"tool_choice": "required", "tools": [{"type": "function"}]}, "tools[0] must be {"),
        ({"tool_choice": "required"}, "tool_choice required needs tools."),
        ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "Tool 'f' is not among"),
        ({"tool_choice": "always", "tools": [WEATHER]}, "tool_choice must be none, auto, required or"),
        (
            {"tool_choice": "required", "tools": [WEATHER], "response_format": {"type": "json_object"}},
            "tool_choice required or a named function cannot be set with response_format",
        ),
        ({"top_logprobs": 2}, "top_logprobs needs logprobs: true."),
    ],
)
def test_openai_chat_fields_that_are_refused(extra: dict, message: str) -> None:
    body = protocol.validate_model(
        protocol.ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}], **extra}
    )
    with pytest.raises(ProtocolError, match=re.escape(message)):
        body.check_supported()
    for fine in ({"tool_choice": "auto"}, {"tool_choice": "none"}, {"logprobs": True, "top_logprobs": 2}):
        protocol.validate_model(
            protocol.ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}], **fine}
        ).check_supported()


@pytest.mark.parametrize("model", [protocol.CompletionRequest, protocol.ChatCompletionRequest])
def test_openai_n_has_the_native_bounds(model: type) -> None:
    prompt = (
        {"prompt": "a"}
        if model is protocol.CompletionRequest
        else {"messages": [{"role": "user", "content": "a"}]}
    )
    protocol.validate_model(model, {**prompt, "n": 1024}).check_supported()
    with pytest.raises(ProtocolError, match="n may be at most 1024, got 1025"):
        protocol.validate_model(model, {**prompt, "n": 1025}).check_supported()


def test_openai_unsupported_fields() -> None:
    body = protocol.validate_model(protocol.CompletionRequest, {"prompt": "a", "logit_bias": {"1": 5}})
    with pytest.raises(ProtocolError, match="logit_bias is not supported"):
        body.check_supported()
    body = protocol.validate_model(protocol.CompletionRequest, {"prompt": "a", "suffix": "z"})
    with pytest.raises(ProtocolError, match="suffix is not supported"):
        body.check_supported()


def test_split_openai_prompts() -> None:
    assert protocol.split_openai_prompts("a") == (["a"], True)
    assert protocol.split_openai_prompts([1, 2]) == ([[1, 2]], True)
    assert protocol.split_openai_prompts(["a", "b"]) == (["a", "b"], False)
    assert protocol.split_openai_prompts([[1], [2]]) == ([[1], [2]], False)
    with pytest.raises(ProtocolError):
        protocol.split_openai_prompts([])


# ----------------------------------------------------------------------------- response JSON


def make_output(**kwargs: Any) -> RequestOutput:
    base: dict[str, Any] = dict(
        rid="r1",
        output_ids=[5, 6],
        text=" Paris",
        finished=True,
        finish_reason={"type": "length", "length": 2},
        prompt_tokens=3,
        completion_tokens=2,
        cached_tokens=1,
        e2e_latency=0.5,
    )
    base.update(kwargs)
    return RequestOutput(**base)


def test_generate_response_plain() -> None:
    request = EngineRequest(rid="r1", input_ids=[1, 2, 3])
    body = generate_response(request, make_output(), WordDecoder(), False)
    assert body == {
        "text": " Paris",
        "meta_info": {
            "id": "r1",
            "finish_reason": {"type": "length", "length": 2},
            "prompt_tokens": 3,
            "completion_tokens": 2,
            "cached_tokens": 1,
            "e2e_latency": 0.5,
        },
    }


def test_unfinished_event_has_null_finish_reason() -> None:
    request = EngineRequest(rid="r1", input_ids=[1])
    body = generate_response(request, make_output(finished=False, finish_reason=None), WordDecoder(), False)
    assert body["meta_info"]["finish_reason"] is None
    assert "e2e_latency" not in body["meta_info"]


def test_skip_tokenizer_init_gives_output_ids() -> None:
    request = EngineRequest(rid="r1", input_ids=[1])
    body = generate_response(request, make_output(text=None), None, True)
    assert body["output_ids"] == [5, 6] and "text" not in body


def test_logprob_shapes() -> None:
    request = EngineRequest(
        rid="r1",
        input_ids=[1, 2, 3],
        sampling_params=SamplingParams(),
        return_logprob=True,
        top_logprobs_num=2,
        token_ids_logprob=[9],
        return_text_in_logprobs=True,
    )
    output = make_output(
        input_token_logprobs=[(None, 3)],
        output_token_logprobs=[(-0.5, 5), (-0.1, 6)],
        input_top_logprobs=[None],
        output_top_logprobs=[[(-0.5, 5), (-1.0, 7)], [(-0.1, 6), (-3.0, 8)]],
        input_token_ids_logprobs=[None],
        output_token_ids_logprobs=[[(-4.0, 9)], [(-5.0, 9)]],
    )
    meta = generate_response(request, output, WordDecoder(), False)["meta_info"]
    assert meta["input_token_logprobs"] == [[None, 3, "<3>"]]
    assert meta["output_token_logprobs"] == [[-0.5, 5, "<5>"], [-0.1, 6, "<6>"]]
    assert meta["input_top_logprobs"] == [None]
    assert meta["output_top_logprobs"] == [
        [[-0.5, 5, "<5>"], [-1.0, 7, "<7>"]],
        [[-0.1, 6, "<6>"], [-3.0, 8, "<8>"]],
    ]
    assert meta["input_token_ids_logprobs"] == [None]
    assert meta["output_token_ids_logprobs"] == [[[-4.0, 9, "<9>"]], [[-5.0, 9, "<9>"]]]

    request.return_text_in_logprobs = False
    meta = generate_response(request, output, WordDecoder(), False)["meta_info"]
    assert meta["output_token_logprobs"] == [[-0.5, 5, None], [-0.1, 6, None]]


def test_logprob_keys_absent_unless_asked() -> None:
    request = EngineRequest(rid="r1", input_ids=[1], return_logprob=True)
    meta = generate_response(request, make_output(output_token_logprobs=[(-1.0, 5)]), None, False)[
        "meta_info"
    ]
    assert "output_token_logprobs" in meta and "output_top_logprobs" not in meta
    assert "input_token_ids_logprobs" not in meta


def test_hidden_states_when_asked() -> None:
    request = EngineRequest(rid="r1", input_ids=[1], return_hidden_states=True)
    meta = generate_response(request, make_output(hidden_states=[[0.5, 1.5]]), None, False)["meta_info"]
    assert meta["hidden_states"] == [[0.5, 1.5]]


def test_embedding_response() -> None:
    output = make_output(embedding=[0.1, 0.2], finish_reason=None, completion_tokens=0)
    assert embedding_response(output) == {
        "embedding": [0.1, 0.2],
        "meta_info": {
            "id": "r1",
            "finish_reason": {"type": "length", "length": 0},
            "prompt_tokens": 3,
            "e2e_latency": 0.5,
        },
    }


def test_forced_tools_share_their_defs_at_the_top() -> None:
    """A tool's `$ref`s point into its own `$defs`; in the array of calls they resolve at the top,
    so the definitions move there (two tools defining one name differently is a 400)."""
    from runtime.grammar import compile_grammar

    location = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    parameters = {
        "$defs": {"Loc": location},
        "properties": {"loc": {"$ref": "#/$defs/Loc"}},
        "required": ["loc"],
    }
    tool = {"type": "function", "function": {"name": "weather", "parameters": parameters}}

    def body(*tools: dict) -> Any:
        return protocol.validate_model(
            protocol.ChatCompletionRequest,
            {
                "messages": [{"role": "user", "content": "hi"}],
                "tools": list(tools),
                "tool_choice": "required",
            },
        )

    schema = body(tool).forced_tool_schema
    assert schema["$defs"] == {"Loc": location}
    compile_grammar("json_schema", json.dumps(schema))
    other = {
        "type": "function",
        "function": {"name": "clock", "parameters": {"$defs": {"Loc": {"type": "string"}}}},
    }
    with pytest.raises(ProtocolError, match="Tools define \\$defs 'Loc' differently"):
        body(tool, other).check_supported()


def test_nesting_past_the_stack_is_a_400_or_text() -> None:
    """A schema or a model's output nested deeper than Python's stack: a 400 for the schema, and
    an answer that stays text, never a 500."""
    from server.tool_parsers import Llama3Parser, Qwen25Parser

    deep: dict[str, Any] = {}
    node = deep
    for _ in range(2000):
        node["anyOf"] = [{}]
        node = node["anyOf"][0]
    body = protocol.validate_model(
        protocol.ChatCompletionRequest,
        {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}},
    )
    body.response_format = protocol.ResponseFormat(type="json_schema", json_schema={"schema": deep})
    with pytest.raises(ProtocolError, match="nested too deeply"):
        body.sampling_dict(None)
    with pytest.raises(ValueError, match="^Invalid json_schema: nested too deeply"):
        SamplingParams.from_dict({"json_schema": "[" * 5000 + "]" * 5000})
    nested = "[" * 5000
    assert protocol.forced_tool_calls(nested) is None
    assert Qwen25Parser().parse("<tool_call>" + nested) is None
    assert Llama3Parser().parse('{"name": "f", "parameters": ' + nested) is None


def test_a_constrained_chat_request_says_so() -> None:
    def constrained(**extra: Any) -> bool:
        return protocol.validate_model(
            protocol.ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}], **extra}
        ).is_constrained()

    assert not constrained() and not constrained(tools=[WEATHER], tool_choice="auto")
    assert constrained(regex="a+") and constrained(response_format={"type": "json_object"})
    assert constrained(tools=[WEATHER], tool_choice="required")
