"""Request and response bodies of the HTTP API, and their expansion into engine requests.

Bodies are validated here, before anything reaches the engine: a wrong JSON type,
a batch whose lists disagree in length, or a field of the reference this server
does not serve becomes a `ProtocolError` (HTTP 400) whose message names the
field. A valid body is expanded into one `EngineRequest` per prompt and sample,
in the order `[p0 x n, p1 x n, ...]`, which is also the order of the answer.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from runtime.grammar import GRAMMAR_KEYS
from runtime.io_struct import EngineRequest, RequestKind
from runtime.sampling_params import MAX_N, SamplingParams

TokenIds = list[StrictInt]
ModelT = TypeVar("ModelT", bound=BaseModel)


class ProtocolError(ValueError):
    """A client mistake: answered with `status` (400 unless said otherwise) and `message`."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param


def new_rid() -> str:
    """A fresh request id, as the reference makes them (uuid4 hex)."""
    return uuid.uuid4().hex


def parse_json_body(body: bytes, *, allow_empty: bool = False) -> Any:
    """Decode a request body; malformed JSON is a 400, an empty body is None when allowed."""
    if not body.strip():
        if allow_empty:
            return None
        raise ProtocolError("The request body is empty; a JSON object is expected.")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"Malformed JSON in the request body: {exc}.") from exc


def format_validation_error(exc: ValidationError) -> str:
    """One line per offending field; the alternatives of a union are merged into one line."""
    by_field: dict[str, list[str]] = {}
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        if error["type"] == "extra_forbidden":
            by_field.setdefault(".".join(loc), []).append("unknown field")
            continue
        # Union members appear as loc parts such as 'list[int]': keep the path to the field only.
        path = ".".join(
            part for part in loc if "[" not in part and part not in ("str", "int", "bool", "float")
        )
        message = error["msg"]
        messages = by_field.setdefault(path or "body", [])
        if message not in messages:
            messages.append(message)
    return "; ".join(f"{field}: {' or '.join(msgs)}" for field, msgs in by_field.items())


def validate_model(model: type[ModelT], data: Any) -> ModelT:
    """`model.model_validate(data)` with a ProtocolError naming the fields on failure."""
    if not isinstance(data, dict):
        raise ProtocolError(f"The request body must be a JSON object, got {type(data).__name__}.")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]["loc"] if exc.error_count() else ()
        param = str(first[0]) if first else None  # the top-level field, as OpenAI errors name it
        raise ProtocolError(format_validation_error(exc), param=param) from exc


# ============================================================================ native API


class GenerateRequest(BaseModel):
    """POST /generate (NATIVE_API.md): one prompt or a batch, scalar or per-prompt arguments."""

    model_config = ConfigDict(extra="forbid")

    text: str | list[str] | None = None
    input_ids: TokenIds | list[TokenIds] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    rid: str | list[str] | None = None
    return_logprob: StrictBool | list[StrictBool] | None = None
    logprob_start_len: StrictInt | list[StrictInt] | None = None
    top_logprobs_num: StrictInt | list[StrictInt] | None = None
    token_ids_logprob: TokenIds | list[TokenIds] | None = None
    return_text_in_logprobs: StrictBool = False
    stream: StrictBool = False
    return_hidden_states: StrictBool | list[StrictBool] = False
    # Reference fields with no effect here (logging switches, modality hints).
    log_metrics: StrictBool = True
    modalities: list[Any] | None = None
    # Reference fields this server does not serve: a non-null value is a 400.
    input_embeds: Any = None
    image_data: Any = None
    audio_data: Any = None
    lora_path: Any = None
    custom_logit_processor: Any = None
    session_params: Any = None
    bootstrap_host: Any = None
    bootstrap_port: Any = None
    bootstrap_room: Any = None


UNSUPPORTED_GENERATE_FIELDS = (
    "input_embeds",
    "image_data",
    "audio_data",
    "lora_path",
    "custom_logit_processor",
    "session_params",
    "bootstrap_host",
    "bootstrap_port",
    "bootstrap_room",
)


def reject_unsupported(data: dict[str, Any], fields: Sequence[str]) -> None:
    """`{field} is not supported by this server.` for the first field given a value."""
    for name in fields:
        value = data.get(name)
        if value is not None and value != [] and value != {}:
            raise ProtocolError(f"{name} is not supported by this server.", param=name)


@dataclasses.dataclass
class ExpandedRequests:
    """The engine requests of one HTTP call, and how the answer is shaped."""

    requests: list[EngineRequest]
    is_single: bool  # one prompt, n == 1: the answer is one object, not a list
    stream: bool = False
    num_prompts: int = 1
    n: int = 1
    prompts: list[str | None] = dataclasses.field(default_factory=list)


def _per_prompt(name: str, value: Any, num_prompts: int, is_list: Callable[[Any], bool]) -> list[Any]:
    """A scalar repeated for every prompt, or a list with exactly one entry per prompt."""
    if is_list(value):
        if len(value) != num_prompts:
            raise ProtocolError(
                f"{name} has {len(value)} entries but the request has {num_prompts} prompt(s).", param=name
            )
        return list(value)
    return [value] * num_prompts


def _is_list(value: Any) -> bool:
    return isinstance(value, list)


def _is_nested_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, list) for v in value)


def check_token_ids(name: str, ids: Sequence[int], vocab_size: int | None) -> None:
    """Token ids must be non-negative and, when the vocabulary is known, inside it."""
    for token_id in ids:
        if token_id < 0 or (vocab_size is not None and token_id >= vocab_size):
            bound = f"[0, {vocab_size})" if vocab_size is not None else "non-negative"
            raise ProtocolError(
                f"{name} contains token id {token_id}, outside the vocabulary {bound}.", param=name
            )


def parse_sampling_params(data: dict[str, Any] | None) -> SamplingParams:
    """SamplingParams.from_dict with its ValueError (unknown key, bad range) turned into a 400."""
    try:
        return SamplingParams.from_dict(data)
    except (ValueError, TypeError) as exc:
        raise ProtocolError(str(exc), param="sampling_params") from exc


# The native sampling names an OpenAI client knows by other names.
OPENAI_SAMPLING_NAMES = {
    "max_new_tokens": "max_tokens",
    "min_new_tokens": "min_tokens",
    "sampling_seed": "seed",
}


def parse_openai_sampling(data: dict[str, Any]) -> SamplingParams:
    """parse_sampling_params for an OpenAI route: its 400 names the field as the client sent it."""
    try:
        return parse_sampling_params(data)
    except ProtocolError as exc:
        message = exc.message
        for native, name in OPENAI_SAMPLING_NAMES.items():
            message = message.replace(native, name)
        names = [OPENAI_SAMPLING_NAMES.get(key, key) for key in data]
        param = next((name for name in names if message.startswith(name + " ")), None)
        raise ProtocolError(message, param=param) from exc


def expand_rids(rid: str | list[str] | None, num_prompts: int, n: int) -> list[str]:
    """One rid per engine request: given per request, per prompt (suffixed per sample), or generated."""
    total = num_prompts * n
    if rid is None:
        return [new_rid() for _ in range(total)]
    if rid == "" or (isinstance(rid, list) and "" in rid):  # /abort_request could never name it
        raise ProtocolError("rid must not be empty.", param="rid")
    if isinstance(rid, str):
        return [rid] if total == 1 else [f"{rid}_{k}" for k in range(total)]
    if len(rid) == total:
        rids = list(rid)
    elif len(rid) == num_prompts:
        rids = [r if n == 1 else f"{r}_{j}" for r in rid for j in range(n)]
    else:
        raise ProtocolError(
            f"rid has {len(rid)} entries but the request has {num_prompts} prompt(s) x n={n}.", param="rid"
        )
    if len(set(rids)) != len(rids):
        raise ProtocolError("rid must be unique within a request.", param="rid")
    return rids


def expand_generate(
    req: GenerateRequest,
    tokenize: Callable[[str], list[int]] | None,
    vocab_size: int | None = None,
) -> ExpandedRequests:
    """Turn a /generate body into engine requests `[p0 x n, p1 x n, ...]`.

    `tokenize` is None when the server runs without a tokenizer; text prompts are then a 400.
    """
    reject_unsupported(req.__dict__, UNSUPPORTED_GENERATE_FIELDS)
    if req.text is None and req.input_ids is None:
        raise ProtocolError("Either text, input_ids or input_embeds should be provided.")
    if req.text is not None and req.input_ids is not None:
        raise ProtocolError("text and input_ids cannot be provided at the same time")

    texts: list[str | None]
    if req.text is not None:
        single_prompt = isinstance(req.text, str)
        texts = [req.text] if isinstance(req.text, str) else list(req.text)
        if not texts:
            raise ProtocolError("text cannot be an empty list.", param="text")
        if tokenize is None:
            raise ProtocolError(
                "text needs a tokenizer, and this server runs with --skip-tokenizer-init: send input_ids.",
                param="text",
            )
        prompt_ids = [tokenize(t) for t in texts if t is not None]
    else:
        assert req.input_ids is not None
        if not req.input_ids:
            raise ProtocolError("input_ids cannot be empty.", param="input_ids")
        single_prompt = not isinstance(req.input_ids[0], list)
        prompt_ids = [list(req.input_ids)] if single_prompt else [list(ids) for ids in req.input_ids]  # type: ignore[arg-type]
        texts = [None] * len(prompt_ids)
    for ids, text in zip(prompt_ids, texts, strict=True):
        if not ids:
            name = "input_ids" if text is None else "text"
            raise ProtocolError(f"{name} cannot be empty.", param=name)
        check_token_ids("input_ids", ids, vocab_size)
    num_prompts = len(prompt_ids)

    sampling_dicts = _per_prompt("sampling_params", req.sampling_params, num_prompts, _is_list)
    params = [parse_sampling_params(d) for d in sampling_dicts]
    n = params[0].n
    if any(p.n != n for p in params):
        raise ProtocolError(
            f"n must be the same for every prompt of a batch, got {[p.n for p in params]}.", param="n"
        )

    return_logprob = _per_prompt("return_logprob", req.return_logprob, num_prompts, _is_list)
    start_lens = _per_prompt("logprob_start_len", req.logprob_start_len, num_prompts, _is_list)
    top_nums = _per_prompt("top_logprobs_num", req.top_logprobs_num, num_prompts, _is_list)
    token_ids_lp = _per_prompt("token_ids_logprob", req.token_ids_logprob, num_prompts, _is_nested_list)
    hidden = _per_prompt("return_hidden_states", req.return_hidden_states, num_prompts, _is_list)
    rids = expand_rids(req.rid, num_prompts, n)

    requests: list[EngineRequest] = []
    for i, ids in enumerate(prompt_ids):
        start_len = -1 if start_lens[i] is None else start_lens[i]
        top_num = 0 if top_nums[i] is None else top_nums[i]
        if start_len < -1:
            raise ProtocolError(f"logprob_start_len must be -1 or at least 0, got {start_len}.")
        if top_num < 0:
            raise ProtocolError(f"top_logprobs_num must be at least 0, got {top_num}.")
        if token_ids_lp[i] is not None:
            check_token_ids("token_ids_logprob", token_ids_lp[i], vocab_size)
        for j in range(n):
            requests.append(
                EngineRequest(
                    rid=rids[i * n + j],
                    input_ids=list(ids),
                    sampling_params=params[i].for_sample(j),
                    kind="generate",
                    stream=req.stream,
                    return_logprob=bool(return_logprob[i]),
                    logprob_start_len=start_len,
                    top_logprobs_num=top_num,
                    token_ids_logprob=list(token_ids_lp[i]) if token_ids_lp[i] is not None else None,
                    return_text_in_logprobs=req.return_text_in_logprobs,
                    return_hidden_states=bool(hidden[i]),
                    text=texts[i],
                )
            )
    return ExpandedRequests(
        requests=requests,
        is_single=single_prompt and n == 1,
        stream=req.stream,
        num_prompts=num_prompts,
        n=n,
        prompts=texts,
    )


class EncodeRequest(BaseModel):
    """POST /encode and /classify: text or input_ids, one or a list; other keys (model, ...) ignored."""

    model_config = ConfigDict(extra="ignore")

    text: str | list[str] | None = None
    input_ids: TokenIds | list[TokenIds] | None = None
    rid: str | list[str] | None = None


def expand_encode(
    req: EncodeRequest,
    kind: RequestKind,
    tokenize: Callable[[str], list[int]] | None,
    vocab_size: int | None = None,
) -> ExpandedRequests:
    """One engine request of `kind` per input of an /encode or /classify body."""
    if req.text is None and req.input_ids is None:
        raise ProtocolError("Either text, input_ids or input_embeds should be provided.")
    if req.text is not None and req.input_ids is not None:
        raise ProtocolError("text and input_ids cannot be provided at the same time")
    if req.text is not None:
        single = isinstance(req.text, str)
        texts: list[str | None] = [req.text] if isinstance(req.text, str) else list(req.text)
        if tokenize is None:
            raise ProtocolError(
                "text needs a tokenizer, and this server runs with --skip-tokenizer-init: send input_ids.",
                param="text",
            )
        prompt_ids = [tokenize(t) for t in texts if t is not None]
    else:
        assert req.input_ids is not None
        if not req.input_ids:
            raise ProtocolError("input_ids cannot be empty.", param="input_ids")
        single = not isinstance(req.input_ids[0], list)
        prompt_ids = [list(req.input_ids)] if single else [list(ids) for ids in req.input_ids]  # type: ignore[arg-type]
        texts = [None] * len(prompt_ids)
    if not prompt_ids:
        raise ProtocolError("The input cannot be an empty list.")
    return embedding_requests(prompt_ids, texts, single, kind, req.rid, vocab_size)


def embedding_requests(
    prompt_ids: list[list[int]],
    texts: list[str | None],
    single: bool,
    kind: RequestKind,
    rid: str | list[str] | None,
    vocab_size: int | None,
) -> ExpandedRequests:
    """Embedding engine requests: one per prompt, no sampling."""
    for ids in prompt_ids:
        if not ids:
            raise ProtocolError("input_ids cannot be empty.", param="input_ids")
        check_token_ids("input_ids", ids, vocab_size)
    rids = expand_rids(rid, len(prompt_ids), 1)
    requests = [
        EngineRequest(
            rid=rids[i],
            input_ids=ids,
            sampling_params=SamplingParams(max_new_tokens=0),
            kind=kind,
            text=texts[i],
        )
        for i, ids in enumerate(prompt_ids)
    ]
    return ExpandedRequests(requests=requests, is_single=single, num_prompts=len(requests), prompts=texts)


class UpdateWeightsFromDiskRequest(BaseModel):
    """POST /update_weights_from_disk."""

    model_config = ConfigDict(extra="ignore")

    model_path: str = Field(min_length=1)
    load_format: str | None = None


class UpdateWeightsFromDiskResponse(BaseModel):
    success: bool
    message: str
    num_paused_requests: int = 0


class ProfileRequest(BaseModel):
    """POST /start_profile; `activities`, `with_stack`, `record_shapes` of the reference are ignored."""

    model_config = ConfigDict(extra="ignore")

    output_dir: str | None = None
    num_steps: StrictInt | None = Field(default=None, ge=1)
    activities: list[str] | None = None
    with_stack: bool | None = None
    record_shapes: bool | None = None

    @field_validator("num_steps", mode="before")
    @classmethod
    def _steps_as_text(cls, value: Any) -> Any:
        """The reference's profiler client sends `num_steps` as text ("3")."""
        if isinstance(value, str) and value.strip().isdecimal():
            return int(value)
        return value


class AbortRequest(BaseModel):
    """POST /abort_request: one rid, or every request of this server with abort_all."""

    model_config = ConfigDict(extra="ignore")

    rid: str = ""
    abort_all: StrictBool = False


# ============================================================================ OpenAI API


class StreamOptions(BaseModel):
    include_usage: StrictBool | None = False
    continuous_usage_stats: StrictBool | None = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: dict[str, Any] | None = None
    structures: list[Any] | None = None  # structural_tag, as the native key reads them
    triggers: list[Any] | None = None


class _NullMeansDefault(BaseModel):
    """An OpenAI request: its fields are nullable, and an explicit null (`"n": null`,
    `"encoding_format": null`, as some clients send them) takes the field's default instead of
    failing its type."""

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data


class _OpenAISampling(_NullMeansDefault):
    """The sampling fields shared by completions and chat, with SGLang's extensions."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    temperature: StrictFloat | None = None
    top_p: StrictFloat | None = None
    presence_penalty: StrictFloat | None = None
    frequency_penalty: StrictFloat | None = None
    seed: StrictInt | None = None
    user: str | None = None
    logit_bias: dict[str, StrictFloat] | None = None
    # SGLang extensions
    top_k: StrictInt | None = None
    min_p: StrictFloat | None = None
    min_tokens: StrictInt | None = None
    repetition_penalty: StrictFloat | None = None
    stop_token_ids: TokenIds | None = None
    no_stop_trim: StrictBool | None = None
    ignore_eos: StrictBool | None = None
    skip_special_tokens: StrictBool | None = None
    spaces_between_special_tokens: StrictBool | None = None
    regex: str | None = None
    json_schema: str | None = None
    ebnf: str | None = None
    response_format: ResponseFormat | None = None  # chat's, and vLLM's extension for completions
    lora_path: Any = None
    session_params: Any = None
    rid: str | None = None

    def check_supported(self) -> None:
        """Fields the API defines but this server cannot honour are a 400, never silently dropped."""
        if self.logit_bias:
            raise ProtocolError("logit_bias is not supported by this server.", param="logit_bias")
        reject_unsupported(self.__dict__, ("lora_path", "session_params"))
        if self.n < 1:
            raise ProtocolError(f"n must be at least 1, got {self.n}.", param="n")
        if self.n > MAX_N:
            raise ProtocolError(f"n may be at most {MAX_N}, got {self.n}.", param="n")
        if self.stream_options is not None and not self.stream:
            raise ProtocolError("stream_options can only be set when stream is true.", param="stream_options")
        if self.response_format_grammar is not None and self.native_grammars():
            raise ProtocolError(
                "response_format cannot be set with regex, json_schema or ebnf.", param="response_format"
            )

    @functools.cached_property
    def response_format_grammar(self) -> tuple[str, str] | None:
        """What `response_format` asks for as a native grammar key and its text: a JSON schema (a
        json_object is any object, as the reference reads it) or a structural tag."""
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return "json_schema", '{"type": "object"}'
        if fmt.type == "structural_tag":
            return "structural_tag", _json_text({"structures": fmt.structures, "triggers": fmt.triggers})
        schema = (fmt.json_schema or {}).get("schema")
        if not isinstance(schema, dict):
            raise ProtocolError(
                "response_format json_schema needs json_schema.schema, a JSON schema object.",
                param="response_format",
            )
        return "json_schema", _json_text(schema)

    def native_grammars(self) -> list[str]:
        """The native grammar keys (SGLang's extension fields) the request sets."""
        return [key for key in GRAMMAR_KEYS if getattr(self, key)]

    def sampling_dict(self, max_new_tokens: int | None) -> dict[str, Any]:
        """The native sampling_params equivalent; unset fields keep the native defaults."""
        mapping = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "min_new_tokens": self.min_tokens,
            "stop": self.stop,
            "stop_token_ids": self.stop_token_ids,
            "no_stop_trim": self.no_stop_trim,
            "ignore_eos": self.ignore_eos,
            "skip_special_tokens": self.skip_special_tokens,
            "spaces_between_special_tokens": self.spaces_between_special_tokens,
            "regex": self.regex,
            "json_schema": self.json_schema,
            "ebnf": self.ebnf,
            "sampling_seed": self.seed,
        }
        params = {key: value for key, value in mapping.items() if value is not None}
        params["max_new_tokens"] = max_new_tokens
        grammar = self.response_format_grammar
        if grammar is not None:
            params[grammar[0]] = grammar[1]
        return params


def _tool_function(tool: Any, index: int) -> dict[str, Any]:
    """A request's tool as `{"name", "parameters"}`, checked: `{"type": "function", "function":
    {"name": str, "parameters": a JSON schema object (optional)}}`."""
    function = tool.get("function") if isinstance(tool, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    parameters = function.get("parameters", None) if isinstance(function, dict) else None
    if not isinstance(name, str) or not name or not isinstance(parameters, dict | None):
        raise ProtocolError(
            f'tools[{index}] must be {{"type": "function", "function": {{"name": ..., '
            '"parameters": {...}}}}.',
            param="tools",
        )
    return {"name": name, "parameters": parameters or {"type": "object", "properties": {}}}


def _named_tool_choice(choice: Any) -> str:
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(name, str):
        raise ProtocolError(
            f'tool_choice must be none, auto, required or {{"type": "function", "function": '
            f'{{"name": ...}}}}, got {choice!r}.',
            param="tool_choice",
        )
    return name


def _json_text(value: Any, param: str = "response_format") -> str:
    """`value` as JSON text; a 400 naming `param` when it is nested too deeply to write."""
    try:
        return json.dumps(value)
    except RecursionError:
        raise ProtocolError(f"{param} is nested too deeply.", param=param) from None


def forced_tool_calls(text: str) -> list[dict[str, Any]] | None:
    """An answer written under `forced_tool_schema` as OpenAI's `tool_calls` (arguments as JSON
    text); None when the text is not such an array (cut by max_tokens or a stop string)."""
    try:
        calls = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(calls, list) or not all(
        isinstance(call, dict) and isinstance(call.get("name"), str) and "parameters" in call
        for call in calls
    ):
        return None
    return openai_tool_calls([(call["name"], call["parameters"]) for call in calls])


def openai_tool_calls(calls: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    """(name, arguments) pairs as OpenAI's `tool_calls`: each with a fresh id, its arguments as
    JSON text."""
    return [
        {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
        }
        for name, arguments in calls
    ]


def _call_schema(tool: dict[str, Any]) -> dict[str, Any]:
    """One call of `tool` as the answer writes it: its name, and parameters that fit its schema."""
    return {
        "type": "object",
        "properties": {"name": {"type": "string", "enum": [tool["name"]]}, "parameters": tool["parameters"]},
        "required": ["name", "parameters"],
    }


def check_token_budget(name: str, value: int | None) -> None:
    """A negative max_tokens is a 400 naming the field the client sent (not the native one)."""
    if value is not None and value < 0:
        raise ProtocolError(f"{name} must be at least 0, got {value}.", param=name)


class CompletionRequest(_OpenAISampling):
    """POST /v1/completions."""

    prompt: str | list[str] | TokenIds | list[TokenIds]
    max_tokens: StrictInt | None = 16
    echo: StrictBool = False
    logprobs: StrictInt | None = None
    best_of: StrictInt | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix:
            raise ProtocolError("suffix is not supported by this server.", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise ProtocolError("best_of is not supported by this server.", param="best_of")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ProtocolError(f"logprobs must be in [0, 20], got {self.logprobs}.", param="logprobs")
        check_token_budget("max_tokens", self.max_tokens)


# The roles the API defines; any other would reach the chat template as a header of its own.
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")


class ChatMessage(BaseModel):
    """One chat message; extra keys (name, tool_calls, tool_call_id) go to the template untouched."""

    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None

    @field_validator("role", mode="before")
    @classmethod
    def _known_role(cls, role: Any) -> Any:
        """One of CHAT_ROLES in any case, stored in lower case: chat templates compare lower-case names."""
        if not isinstance(role, str):
            return role  # the field's own type check answers
        if role.lower() not in CHAT_ROLES:
            raise ValueError(f"role must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
        return role.lower()

    @model_validator(mode="after")
    def _user_says_something(self) -> ChatMessage:
        """Only an assistant (tool calls) or tool message may come without content, as in the API."""
        if self.content is None and self.role in ("user", "system"):
            raise ValueError(f"a {self.role} message needs content")
        return self


class ChatCompletionRequest(_OpenAISampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: StrictBool = True
    separate_reasoning: StrictBool = True  # with --reasoning-parser: the thinking as reasoning_content
    continue_final_message: StrictBool = False
    chat_template_kwargs: dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= 20:
            raise ProtocolError(
                f"top_logprobs must be in [0, 20], got {self.top_logprobs}.", param="top_logprobs"
            )
        if self.top_logprobs and not self.logprobs:
            raise ProtocolError("top_logprobs needs logprobs: true.", param="top_logprobs")
        _ = self.tool_names  # every tool well-formed, whatever tool_choice: a 400 before any work
        if self.forced_tool_schema is not None and (self.native_grammars() or self.response_format_grammar):
            raise ProtocolError(
                "tool_choice required or a named function cannot be set with response_format, regex, "
                "json_schema or ebnf.",
                param="tool_choice",
            )
        check_token_budget("max_tokens", self.max_tokens)
        check_token_budget("max_completion_tokens", self.max_completion_tokens)

    @functools.cached_property
    def tool_names(self) -> frozenset[str]:
        """The names of the request's tools (checked as `forced_tool_schema` checks them)."""
        return frozenset(_tool_function(tool, index)["name"] for index, tool in enumerate(self.tools or []))

    @functools.cached_property
    def forced_tool_schema(self) -> dict[str, Any] | None:
        """For `tool_choice` "required" or a named function, the JSON schema of the calls the answer
        must be (the reference's constraint): an array of `{"name", "parameters"}` objects, each
        one of the tools (the named one), at most one unless parallel_tool_calls. None otherwise
        ("auto" and "none": the model writes what it wants, and a call comes back as text)."""
        choice = self.tool_choice
        if choice in (None, "auto", "none"):
            return None
        tools = [_tool_function(tool, index) for index, tool in enumerate(self.tools or [])]
        if choice == "required":
            if not tools:
                raise ProtocolError("tool_choice required needs tools.", param="tool_choice")
            items: dict[str, Any] = {"type": "object", "anyOf": [_call_schema(tool) for tool in tools]}
        else:
            name = _named_tool_choice(choice)
            chosen = [tool for tool in tools if tool["name"] == name]
            if not chosen:
                raise ProtocolError(f"Tool {name!r} is not among the request's tools.", param="tool_choice")
            items = _call_schema(chosen[0])
        schema = {"type": "array", "minItems": 1, "items": items}
        if not self.parallel_tool_calls:
            schema["maxItems"] = 1
        # A tool's `$ref`s point into its own `$defs`: they move to the top, where refs now resolve.
        for key in ("$defs", "definitions"):
            merged: dict[str, Any] = {}
            for tool in tools:
                definitions = tool["parameters"].get(key)
                for name, definition in definitions.items() if isinstance(definitions, dict) else ():
                    if merged.setdefault(name, definition) != definition:
                        raise ProtocolError(
                            f"Tools define {key} {name!r} differently: one definition per name.",
                            param="tools",
                        )
            if merged:
                schema[key] = merged
        return schema

    def is_constrained(self) -> bool:
        """Whether a grammar shapes the answer from its first token (a native grammar key,
        `response_format`, or forced tool calls)."""
        return bool(self.native_grammars() or self.response_format_grammar or self.forced_tool_schema)

    def sampling_dict(self, max_new_tokens: int | None) -> dict[str, Any]:
        params = super().sampling_dict(max_new_tokens)
        calls = self.forced_tool_schema
        if calls is not None:
            params["json_schema"] = _json_text(calls, param="tools")
        return params

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def template_messages(self) -> list[dict[str, Any]]:
        """Messages as the chat template expects them: text parts joined, images refused."""
        out = []
        for index, message in enumerate(self.messages):
            item = message.model_dump(exclude_none=True)
            if isinstance(message.content, list):
                texts = []
                for number, part in enumerate(message.content):
                    if part.get("type") != "text":
                        raise ProtocolError(
                            f"messages[{index}].content: only text parts are supported by this server, "
                            f"got type {part.get('type')!r}.",
                            param="messages",
                        )
                    if not isinstance(part.get("text"), str):
                        raise ProtocolError(
                            f"messages[{index}].content[{number}]: a text part needs its text, a string.",
                            param="messages",
                        )
                    texts.append(part["text"])
                item["content"] = "\n".join(texts)
            elif message.content is None:
                item["content"] = ""
            out.append(item)
        return out


class EmbeddingRequest(_NullMeansDefault):
    """POST /v1/embeddings."""

    model_config = ConfigDict(extra="ignore")

    input: str | list[str] | TokenIds | list[TokenIds]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None
    user: str | None = None


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int | None = 0
    total_tokens: int = 0
    prompt_tokens_details: dict[str, int] | None = None


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    matched_stop: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionStreamResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    bytes: list[int]
    logprob: float | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] = Field(default_factory=list)


class ChatMessageOut(BaseModel):
    role: str = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    matched_stop: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    matched_stop: int | str | None = None


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: str = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class EmbeddingObject(BaseModel):
    object: str = "embedding"
    embedding: list[float] | str
    index: int


class EmbeddingResponse(BaseModel):
    object: str = "list"
    data: list[EmbeddingObject]
    model: str
    usage: UsageInfo


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "sglang"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


class ErrorResponse(BaseModel):
    """The OpenAI routes' error body."""

    object: str = "error"
    message: str
    type: str = "BadRequestError"
    param: str | None = None
    code: int = 400


def split_openai_prompts(
    prompt: str | list[str] | list[int] | list[list[int]], param: str = "prompt"
) -> tuple[list[Any], bool]:
    """A prompt or list of prompts (text or token ids) -> (prompts, is_single); `param` names
    the field in errors (`input` on /v1/embeddings)."""
    if isinstance(prompt, str):
        return [prompt], True
    if not prompt:
        raise ProtocolError(f"The {param} cannot be empty.", param=param)
    if isinstance(prompt[0], int):
        return [prompt], True
    return list(prompt), False


def finish_reason_type(finish_reason: dict[str, Any] | None) -> str | None:
    """The OpenAI finish_reason string of a native finish reason."""
    return None if finish_reason is None else str(finish_reason.get("type"))


def matched_stop(finish_reason: dict[str, Any] | None) -> int | str | None:
    """The stop string or token id that ended a request, when one did."""
    return None if finish_reason is None else finish_reason.get("matched")
