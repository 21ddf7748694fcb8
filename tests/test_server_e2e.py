"""The real server end to end: `python -m server.launch_server` on SmolLM2-135M-Instruct,
driven over HTTP the way SGLang's notebooks and clients drive the reference.

Two servers, each started once for the module: the main one (tokenizer, metrics)
and a `--skip-tokenizer-init --api-key` one that also checks the readiness line,
the warnings for reference-only flags, and the SIGTERM drain.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from server.utils import find_free_port, launch_server_cmd, terminate_process, wait_for_server
from tests import fixture_spec as spec

STARTUP_TIMEOUT = 600
QUESTION = "What is the capital of France?"
SERVER_FLAGS = "--max-total-tokens 8192 --max-running-requests 64 --chunked-prefill-size 512 --no-warmup"


def _model_path() -> Path:
    folder = spec.models_dir() / spec.SMOLLM2
    if not (folder / "config.json").is_file():
        pytest.skip(f"{folder} missing: run `make fixtures`")
    return folder


@pytest.fixture(scope="module")
def model_path() -> Path:
    return _model_path()


@pytest.fixture(scope="module")
def tokenizer(model_path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_path))


@pytest.fixture(scope="module")
def chat_prompt(tokenizer: Any) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )


def _served(command: str) -> Iterator[str]:
    """The URL of a server launched as a notebook launches the reference, until the fixture ends."""
    process, port = launch_server_cmd(command, host="127.0.0.1")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(url, timeout=STARTUP_TIMEOUT, process=process)
        yield url
    finally:
        terminate_process(process)


@pytest.fixture(scope="module")
def base_url(model_path: Path) -> Iterator[str]:
    """The main server."""
    yield from _served(
        f"python3 -m sglang.launch_server --model-path {model_path} --host 127.0.0.1 "
        f"{SERVER_FLAGS} --enable-metrics --tool-call-parser qwen25 --reasoning-parser qwen3 "
        "--log-level warning"
    )


@pytest.fixture(scope="module")
def tiny_url(tiny_llama_path: Path) -> Iterator[str]:
    """The main server's flags on the tiny Llama (SmolLM2's tokenizer and vocabulary): for tests
    of the server's handling, not the model (random loads, fuzzed bodies, streams that leave).
    Their batches meet many step shapes, each compiled inline, and the tiny model's compiles
    and steps cost a fraction of SmolLM2's."""
    yield from _served(
        f"python3 -m sglang.launch_server --model-path {tiny_llama_path} --host 127.0.0.1 "
        f"{SERVER_FLAGS} --log-level warning {' '.join(spec.compile_level_flags(tiny_llama_path))}"
    )


def generate(url: str, **body: Any) -> requests.Response:
    return requests.post(url + "/generate", json=body, timeout=300)


def greedy(max_new_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"temperature": 0, "max_new_tokens": max_new_tokens, **extra}


def sse(response: requests.Response) -> list[Any]:
    events = []
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith(b"data: "), line
        data = line[len(b"data: ") :]
        events.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return events


def server_info(url: str) -> dict[str, Any]:
    return requests.get(url + "/get_server_info", timeout=60).json()


def wait_idle(url: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        info = server_info(url)
        if info["num_running_reqs"] == 0 and info["num_queue_reqs"] == 0:
            return info
        assert time.monotonic() < deadline, f"server not idle: {info}"
        time.sleep(0.2)


# ----------------------------------------------------------------------------- the notebook's flows


def test_generate_capital_of_france(base_url: str) -> None:
    r = generate(base_url, text=QUESTION, sampling_params=greedy(16))
    assert r.status_code == 200, r.text
    body = r.json()
    # Without its chat template SmolLM2 answers this with EOS at once (HF transformers does the same).
    assert isinstance(body["text"], str)
    meta = body["meta_info"]
    keys = {"id", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens", "e2e_latency"}
    assert keys <= set(meta)
    assert 1 <= meta["completion_tokens"] <= 16 and meta["prompt_tokens"] == 7
    assert meta["finish_reason"]["type"] in ("stop", "length")
    continued = generate(base_url, text="The capital of France is", sampling_params=greedy(8)).json()
    assert continued["text"].strip()


def test_chat_template_greedy_says_paris(base_url: str, chat_prompt: str) -> None:
    body = generate(base_url, text=chat_prompt, sampling_params=greedy(32)).json()
    assert "Paris" in body["text"], body["text"]
    assert body["meta_info"]["finish_reason"]["type"] in ("stop", "length")


def test_model_and_server_info(base_url: str, model_path: Path) -> None:
    info = requests.get(base_url + "/get_model_info").json()
    assert set(info) == {"model_path", "tokenizer_path", "is_generation"}
    assert info["model_path"] == str(model_path) and info["is_generation"] is True
    server = server_info(base_url)
    assert server["model_path"] == str(model_path)
    assert server["max_total_num_tokens"] > 0 and server["max_req_input_len"] > 0
    assert server["page_size"] == 16 and server["enable_metrics"] is True
    assert "version" in server and "last_gen_throughput" in server


def test_health(base_url: str) -> None:
    assert requests.get(base_url + "/health").status_code == 200
    assert requests.get(base_url + "/health_generate", timeout=60).status_code == 200


def test_flush_cache_idle_and_busy(base_url: str) -> None:
    wait_idle(base_url)
    assert requests.post(base_url + "/flush_cache").status_code == 200
    body = {"text": "Count to a hundred:", "sampling_params": greedy(200, ignore_eos=True), "stream": True}
    with requests.post(base_url + "/generate", json=body, stream=True, timeout=300) as r:
        lines = r.iter_lines()  # keep the iterator: dropping it closes the connection
        next(lines)
        busy = requests.get(base_url + "/flush_cache")
        assert busy.status_code == 400
        assert busy.text.startswith("Cache flushed.\n")
    # Leaving the stream aborted the request: the server is idle again soon.
    wait_idle(base_url)
    assert requests.get(base_url + "/flush_cache").status_code == 200


# ----------------------------------------------------------------------------- streaming, batches, logprobs


def test_stream_equals_non_stream(base_url: str, chat_prompt: str) -> None:
    plain = generate(base_url, text=chat_prompt, sampling_params=greedy(24)).json()
    with requests.post(
        base_url + "/generate",
        json={"text": chat_prompt, "sampling_params": greedy(24), "stream": True},
        stream=True,
        timeout=300,
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse(r)
    assert events[-1] == "[DONE]"
    texts = [e["text"] for e in events[:-1]]
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:], strict=False))
    assert texts[-1] == plain["text"]
    assert events[-2]["meta_info"]["finish_reason"] == plain["meta_info"]["finish_reason"]
    assert all(e["meta_info"]["finish_reason"] is None for e in events[:-2])


def test_batch_and_n_order(base_url: str) -> None:
    prompts = ["The capital of Italy is", "One, two, three,"]
    solo = [generate(base_url, text=p, sampling_params=greedy(8)).json()["text"] for p in prompts]
    body = generate(base_url, text=prompts, sampling_params=greedy(8, n=2)).json()
    assert [b["text"] for b in body] == [solo[0], solo[0], solo[1], solo[1]]
    streamed = requests.post(
        base_url + "/generate",
        json={"text": prompts, "sampling_params": greedy(8), "stream": True},
        stream=True,
        timeout=300,
    )
    final = {e["index"]: e["text"] for e in sse(streamed)[:-1] if e["meta_info"]["finish_reason"]}
    assert final == {0: solo[0], 1: solo[1]}


def test_logprob_shapes(base_url: str, tokenizer: Any) -> None:
    ids = tokenizer.encode("The quick brown fox jumps over")

    def meta_info(new_tokens: int, **logprob_args: Any) -> dict[str, Any]:
        body = dict(input_ids=ids, sampling_params=greedy(new_tokens), return_logprob=True, **logprob_args)
        return generate(base_url, **body).json()["meta_info"]

    default = meta_info(4)
    assert default["input_token_logprobs"] == [[None, ids[-1], None]]
    assert [len(e) for e in default["output_token_logprobs"]] == [3] * 4
    meta = meta_info(
        4,
        logprob_start_len=0,
        top_logprobs_num=3,
        token_ids_logprob=[ids[0], ids[1]],
        return_text_in_logprobs=True,
    )
    inputs = meta["input_token_logprobs"]
    assert len(inputs) == len(ids) and inputs[0][0] is None
    assert [entry[1] for entry in inputs] == ids
    assert all(isinstance(entry[0], float) and entry[0] <= 0 for entry in inputs[1:])
    outputs = meta["output_token_logprobs"]
    assert len(outputs) == 4 and all(isinstance(entry[2], str) for entry in outputs)
    assert len(meta["output_top_logprobs"]) == 4 and all(len(top) == 3 for top in meta["output_top_logprobs"])
    # Greedy: the chosen token is the best of the top list.
    assert all(top[0][1] == entry[1] for top, entry in zip(meta["output_top_logprobs"], outputs, strict=True))
    assert len(meta["input_top_logprobs"]) == len(ids) and meta["input_top_logprobs"][0] is None
    assert all(len(pos) == 2 for pos in meta["output_token_ids_logprobs"])
    # an empty id list still gives an entry a token, lined up with the tokens (null, as the
    # reference writes an empty position)
    empty = meta_info(2, logprob_start_len=0, token_ids_logprob=[])
    assert empty["input_token_ids_logprobs"] == [None] * len(ids)
    assert empty["output_token_ids_logprobs"] == [None, None]


def test_hidden_states(base_url: str) -> None:
    meta = generate(base_url, text="Hello", sampling_params=greedy(3), return_hidden_states=True).json()[
        "meta_info"
    ]
    hidden = meta["hidden_states"]
    assert len(hidden) == meta["completion_tokens"]
    assert all(len(vector) == 576 for vector in hidden)  # SmolLM2-135M's hidden size


def test_cached_tokens(base_url: str) -> None:
    prompt = "Here is a long shared prefix for the cache test. " * 6
    first = generate(base_url, text=prompt + "First?", sampling_params=greedy(2)).json()["meta_info"]
    second = generate(base_url, text=prompt + "Second?", sampling_params=greedy(2)).json()["meta_info"]
    assert first["cached_tokens"] < second["cached_tokens"] < second["prompt_tokens"]
    assert second["cached_tokens"] >= 16


def test_openai_client(base_url: str) -> None:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="none")
    [model] = client.models.list().data
    chat = client.chat.completions.create(
        model=model.id, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=32
    )
    assert "Paris" in chat.choices[0].message.content
    assert chat.usage.completion_tokens > 0 and chat.usage.prompt_tokens > 0
    stream = client.chat.completions.create(
        model=model.id,
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=32,
        stream=True,
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == chat.choices[0].message.content
    completion = client.completions.create(model=model.id, prompt="The capital of France is", max_tokens=8)
    assert completion.choices[0].text and completion.usage.completion_tokens <= 8


def test_structured_output_beside_free_requests(base_url: str, chat_prompt: str) -> None:
    """regex, JSON schema and EBNF over the native and OpenAI routes, streamed and not, with n and
    sampling, while free greedy requests run beside them: every output fits its grammar, the free
    answers are those alone, and a grammar that does not compile is a 400."""
    alone = generate(base_url, text=chat_prompt, sampling_params=greedy(24)).json()["text"]
    free_answers: list[str] = []
    free = [
        threading.Thread(
            target=lambda: free_answers.append(
                generate(base_url, text=chat_prompt, sampling_params=greedy(24)).json()["text"]
            )
        )
        for _ in range(4)
    ]
    for thread in free:
        thread.start()
    sentence = r"The capital of France is [A-Z][a-z]+\."
    fixed = generate(base_url, text=chat_prompt, sampling_params=greedy(24, regex=sentence)).json()
    assert re.fullmatch(sentence, fixed["text"]), fixed
    assert fixed["meta_info"]["finish_reason"]["type"] == "stop", fixed
    r = generate(base_url, text=chat_prompt, sampling_params=greedy(24, regex=sentence), stream=True)
    events = [e for e in sse(r) if e != "[DONE]"]
    assert events[-1]["text"] == fixed["text"]
    yes_no = 'root ::= ("Yes" | "No") ", " [a-z]+ "."'
    sampled = generate(
        base_url,
        text=[chat_prompt, "Is water wet?"],
        sampling_params={
            "temperature": 1.0,
            "n": 3,
            "max_new_tokens": 24,
            "ebnf": yes_no,
            "sampling_seed": 7,
        },
    ).json()
    assert len(sampled) == 6
    for answer in sampled:
        assert re.fullmatch(r"(Yes|No), [a-z]+\.", answer["text"]) or (
            answer["meta_info"]["finish_reason"]["type"] == "length"
            and re.fullmatch(r"(Yes|No), [a-z]*", answer["text"])
        ), answer
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}, "country": {"enum": ["France", "Spain"]}},
        "required": ["city", "country"],
    }
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="none")
    chat = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=48,
        response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": schema}},
    )
    place = json.loads(chat.choices[0].message.content)
    assert set(place) == {"city", "country"} and place["country"] in ("France", "Spain"), place
    assert chat.choices[0].finish_reason == "stop"
    native = generate(base_url, text=chat_prompt, sampling_params=greedy(48, json_schema=schema)).json()
    assert set(json.loads(native["text"])) == {"city", "country"}, native
    # completions take response_format too (vLLM's extension), as the same native grammar
    completion = client.completions.create(
        model="m",
        prompt=chat_prompt,
        temperature=0,
        max_tokens=48,
        extra_body={
            "response_format": {"type": "json_schema", "json_schema": {"name": "place", "schema": schema}}
        },
    )
    assert completion.choices[0].text == native["text"], completion
    tag = {
        "structures": [{"begin": "<city=", "schema": {"enum": ["Lyon"]}, "end": ">"}],
        "triggers": ["<city="],
    }
    few_shot = (
        'Q: a city in Italy?\nA: <city="Rome">\nQ: a city in Norway?\nA: <city="Oslo">\nQ: another?\nA:'
    )
    tagged = generate(base_url, text=few_shot, sampling_params=greedy(24, structural_tag=tag)).json()
    assert re.findall(r"<city=([^>]*)>", tagged["text"]) == ['"Lyon"'] * tagged["text"].count("<city="), (
        tagged
    )
    assert "<city=" in tagged["text"], tagged
    for bad in (
        {"regex": "("},
        {"json_schema": "{"},
        {"ebnf": "root ::= undefined"},
        {"structural_tag": "{}"},
    ):
        r = generate(base_url, text="a", sampling_params=bad)
        assert r.status_code == 400 and r.json()["error"]["message"].startswith(
            f"Invalid {next(iter(bad))}: "
        )
    r = requests.post(
        base_url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "a"}], "response_format": {"type": "json_schema"}},
        timeout=60,
    )
    assert r.status_code == 400 and r.json()["param"] == "response_format", r.text
    for thread in free:
        thread.join(timeout=300)
    assert free_answers == [alone] * 4
    assert generate(base_url, text=chat_prompt, sampling_params=greedy(24)).json()["text"] == alone


def test_forced_tool_calls_come_back_as_tool_calls(base_url: str) -> None:
    """tool_choice named or required: the answer is constrained to calls of the tools and comes
    back as tool_calls (streamed: one delta with every call at the end); cut short, it is text."""
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["C", "F"]}},
                "required": ["city", "unit"],
            },
        },
    }
    clock = {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"enum": ["UTC", "CET"]}},
                "required": ["zone"],
            },
        },
    }
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="none")
    ask = dict(
        model="m",
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[weather, clock],
        temperature=0,
        max_tokens=64,
    )
    named = {"type": "function", "function": {"name": "get_weather"}}
    answer = client.chat.completions.create(**ask, tool_choice=named, parallel_tool_calls=False)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
    [call] = choice.message.tool_calls
    arguments = json.loads(call.function.arguments)
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert set(arguments) == {"city", "unit"} and arguments["unit"] in ("C", "F"), arguments
    chunks = list(
        client.chat.completions.create(**ask, tool_choice=named, parallel_tool_calls=False, stream=True)
    )
    streamed = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert [(d.index, d.function.name, d.function.arguments) for d in streamed] == [
        (0, "get_weather", call.function.arguments)
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(c.choices and c.choices[0].delta.content for c in chunks)
    required = client.chat.completions.create(**ask, tool_choice="required").choices[0]
    assert required.finish_reason == "tool_calls" and required.message.tool_calls
    for call in required.message.tool_calls:
        assert call.function.name in ("get_weather", "get_time")
        assert isinstance(json.loads(call.function.arguments), dict)
    cut = client.chat.completions.create(**{**ask, "max_tokens": 3}, tool_choice="required").choices[0]
    assert cut.finish_reason == "length" and cut.message.tool_calls is None and cut.message.content
    r = requests.post(
        base_url + "/v1/chat/completions",
        json={**ask, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        timeout=60,
    )
    assert r.status_code == 400 and r.json()["param"] == "tool_choice", r.text


def test_a_reasoning_parser_returns_the_thinking_apart(base_url: str) -> None:
    """--reasoning-parser qwen3 (the main server's): an answer that thinks first (forced here by a
    regex: SmolLM2 does not think) has its thinking in reasoning_content, streamed as its own
    deltas; separate_reasoning false leaves it in the content."""
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": QUESTION}],
        "temperature": 0,
        "max_tokens": 48,
        "regex": r"<think>\n[a-z ]{4,60}\n</think>\n\nThe capital of France is Paris\.",
    }
    url = base_url + "/v1/chat/completions"
    message = requests.post(url, json=body, timeout=120).json()["choices"][0]["message"]
    assert message["content"] == "The capital of France is Paris.", message
    assert re.fullmatch("[a-z ]{4,60}", message["reasoning_content"]), message
    with requests.post(url, json={**body, "stream": True}, stream=True, timeout=120) as r:
        deltas = [e["choices"][0]["delta"] for e in sse(r) if e != "[DONE]"]
    assert "".join(d.get("reasoning_content") or "" for d in deltas).strip() == message["reasoning_content"]
    assert "".join(d.get("content") or "" for d in deltas) == message["content"]
    whole = requests.post(url, json={**body, "separate_reasoning": False}, timeout=120).json()
    assert whole["choices"][0]["message"]["content"].startswith("<think>\n")
    assert whole["choices"][0]["message"]["reasoning_content"] is None


def test_a_tool_call_parser_reads_the_models_own_calls(base_url: str) -> None:
    """--tool-call-parser qwen25 (the main server's): a call the model writes in Qwen2.5's format
    (forced here by a regex: SmolLM2 has no such habit) comes back as tool_calls after its text;
    streamed, no part of the call goes out as content; with tool_choice none it stays text."""
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    written = (
        r'Let me check\.\n<tool_call>\n\{"name": "get_weather", "arguments": '
        r'\{"city": "[A-Z][a-z]{1,12}"\}\}\n</tool_call>'
    )
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tools": [weather],
        "temperature": 0,
        "max_tokens": 64,
        "regex": written,
    }
    url = base_url + "/v1/chat/completions"
    choice = requests.post(url, json=body, timeout=120).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    assert choice["message"]["content"] == "Let me check."
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert set(json.loads(call["function"]["arguments"])) == {"city"}
    with requests.post(url, json={**body, "stream": True}, stream=True, timeout=120) as r:
        events = [e for e in sse(r) if e != "[DONE]"]
    deltas = [e["choices"][0]["delta"] for e in events]
    content = "".join(d.get("content") or "" for d in deltas)
    assert content.strip() == "Let me check." and "<tool" not in content, content
    streamed = [c for d in deltas for c in d.get("tool_calls") or []]
    assert [(c["index"], c["function"]) for c in streamed] == [(0, call["function"])]
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
    plain = requests.post(url, json={**body, "tool_choice": "none"}, timeout=120).json()["choices"][0]
    assert plain["message"]["tool_calls"] is None and "<tool_call>" in plain["message"]["content"]
    # a call of a tool the request did not offer is dropped: the answer stays text
    other = {**body, "regex": written.replace("get_weather", "launch_rocket")}
    unoffered = requests.post(url, json=other, timeout=120).json()["choices"][0]
    assert unoffered["message"]["tool_calls"] is None and unoffered["finish_reason"] != "tool_calls"
    assert '"launch_rocket"' in unoffered["message"]["content"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"prompt": "Hello there", "max_tokens": 3, "echo": True, "logprobs": 1},
        {"prompt": "Hello there", "max_tokens": 0, "echo": True, "logprobs": 1},
        {"prompt": "1, 2, 3, 4,", "max_tokens": 12, "logprobs": 1, "stop": " 8, 1"},
    ],
)
def test_streamed_completion_logprobs_add_up_to_the_whole(base_url: str, kwargs: dict[str, Any]) -> None:
    """Streamed chunks carry the echoed prompt's logprobs and offsets counted over the logprob
    tokens sent (text held back for a stop string must not shift them)."""
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="none")
    whole = client.completions.create(model="m", temperature=0, **kwargs).choices[0]
    chunks = [
        c.choices[0] for c in client.completions.create(model="m", temperature=0, stream=True, **kwargs)
    ]
    pieces = [c.logprobs for c in chunks if c.logprobs]
    assert sum((p.tokens for p in pieces), []) == whole.logprobs.tokens
    assert sum((p.text_offset for p in pieces), []) == whole.logprobs.text_offset
    assert sum((p.token_logprobs for p in pieces), []) == pytest.approx(
        whole.logprobs.token_logprobs, abs=1e-4
    )
    assert "".join(c.text for c in chunks) == whole.text


def test_metrics(base_url: str) -> None:
    def gauge(name: str, unset: float | None = None) -> float:
        text = requests.get(base_url + "/metrics").text
        values = [line.split()[-1] for line in text.splitlines() if line.startswith(name + "{")]
        if not values and unset is not None:  # a histogram shows its labels from its first sample
            return unset
        assert len(values) == 1, (name, values)
        return float(values[0])

    wait_idle(base_url)
    assert requests.post(base_url + "/flush_cache").status_code == 200
    assert gauge("sglang:cache_hit_rate") == 0.0  # nothing from earlier batches (or the warm-up)
    prompt = "Tell me about the history of the city of Lyon, " * 8
    ttft, itl = "sglang:time_to_first_token_seconds_count", "sglang:inter_token_latency_seconds_count"
    before = gauge(ttft, unset=0.0), gauge(itl, unset=0.0)
    # Not streamed: its first token and later gaps are timed by the engine.
    generate(base_url, text=prompt, sampling_params=greedy(3, ignore_eos=True))
    assert (gauge(ttft), gauge(itl)) == (before[0] + 1, before[1] + 2)
    body = {"text": prompt, "sampling_params": greedy(2), "stream": True}
    with requests.post(base_url + "/generate", json=body, stream=True, timeout=300) as r:
        assert sse(r)[-1] == "[DONE]"  # streamed: its TTFT is recorded
    assert gauge("sglang:cache_hit_rate") > 0.5  # the second prompt's batch found it cached
    assert gauge("sglang:avg_request_queue_latency") >= 0.0
    assert gauge("sglang:num_retracted_requests_total") == 0.0  # a pool far larger than these requests
    text = requests.get(base_url + "/metrics").text
    for name in (
        "sglang:prompt_tokens_total",
        "sglang:generation_tokens_total",
        "sglang:e2e_request_latency_seconds_bucket",
        "sglang:time_to_first_token_seconds_bucket",
        "sglang:num_running_reqs",
        "sglang:token_usage",
    ):
        assert name in text, name


# ----------------------------------------------------------------------------- bad inputs


def test_bad_inputs_are_4xx_and_the_server_keeps_serving(base_url: str) -> None:
    info = server_info(base_url)
    context = info["max_req_input_len"] + 1
    cases: list[tuple[str, Any]] = [
        ("/generate", b"{oops"),
        ("/generate", b'"just a string"'),
        ("/generate", {"text": 12}),
        ("/generate", {"text": "a", "sampling_params": {"max_new_tokens": "ten"}}),
        ("/generate", {"text": "a", "sampling_params": {"temperature": [1]}}),
        ("/generate", {"text": "a", "sampling_params": {"no_such_key": 1}}),
        ("/generate", {"input_ids": [1, 10**9]}),
        ("/generate", {"input_ids": [-3]}),
        ("/generate", {"input_ids": [5] * (context + 10)}),
        ("/generate", {"text": "a", "sampling_params": {"max_new_tokens": -1}}),
        ("/generate", {"text": "a", "sampling_params": {"max_new_tokens": 10**9}}),
        ("/generate", {"text": "a", "stream": True, "sampling_params": {"top_k": 0}}),
        ("/generate", {"input_ids": []}),
        ("/generate", {}),
        ("/v1/completions", {"prompt": "a", "max_tokens": "x"}),
        ("/v1/chat/completions", {"messages": []}),
        ("/v1/chat/completions", {"messages": [{"content": "no role"}]}),
        ("/encode", {"text": "a"}),
    ]
    for route, body in cases:
        if isinstance(body, bytes):
            r = requests.post(base_url + route, data=body, headers={"Content-Type": "application/json"})
        else:
            r = requests.post(base_url + route, json=body)
        assert 400 <= r.status_code < 500, (route, body, r.status_code, r.text)
        assert not r.headers["content-type"].startswith("text/event-stream")
    ok = generate(base_url, text="Hello", sampling_params=greedy(2))
    assert ok.status_code == 200


def test_update_weights_from_a_missing_path_keeps_the_old_weights(base_url: str, chat_prompt: str) -> None:
    r = requests.post(base_url + "/update_weights_from_disk", json={"model_path": "/no/such/dir"})
    assert r.status_code == 400, r.text
    assert r.json() == {
        "success": False,
        "message": "Failed to get weights iterator: /no/such/dir (repository not found).",
        "num_paused_requests": 0,
    }
    body = generate(base_url, text=chat_prompt, sampling_params=greedy(32)).json()
    assert "Paris" in body["text"]


# ----------------------------------------------------------------------------- many clients, some leaving


def test_concurrent_streams_with_disconnects_leave_the_pool_whole(tiny_url: str, tokenizer: Any) -> None:
    """Streamed answers are the solo ones; clients that leave midway give their pages back (the
    server's streams, not the model: the tiny Llama)."""
    questions = [
        "What is the capital of France?",
        "Name a primary color.",
        "What is two plus two?",
        "Say hello in Spanish.",
        "What color is the sky?",
        "Name a fruit.",
        "What is the largest ocean?",
        "How many legs does a cat have?",
    ]
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in questions
    ]
    solo = [generate(tiny_url, text=p, sampling_params=greedy(8)).json()["text"] for p in prompts]
    results: dict[int, str | None] = {}
    errors: list[BaseException] = []

    def client(index: int) -> None:
        leaves = index % 4 == 3  # a quarter of the clients disconnect midway
        try:
            body = {"text": prompts[index % len(prompts)], "sampling_params": greedy(8), "stream": True}
            with requests.post(tiny_url + "/generate", json=body, stream=True, timeout=600) as r:
                assert r.status_code == 200, r.text
                text = None
                seen = 0
                for line in r.iter_lines():
                    if not line:
                        continue
                    data = line[len(b"data: ") :]
                    if data == b"[DONE]":
                        break
                    text = json.loads(data)["text"]
                    seen += 1
                    if leaves and seen >= 2:
                        break
                results[index] = None if leaves else text
        except BaseException as exc:  # surfaced below with the thread's index
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not errors, errors[:3]
    for index in range(64):
        if index % 4 != 3:
            assert results[index] == solo[index % len(prompts)], (index, results[index])
    info = wait_idle(tiny_url)
    assert info["num_free_pages"] + info["num_cached_pages"] == info["num_total_pages"], info
    assert requests.post(tiny_url + "/flush_cache").status_code == 200
    info = server_info(tiny_url)
    assert info["num_free_pages"] == info["num_total_pages"], info
    assert generate(tiny_url, text="Hello", sampling_params=greedy(2)).status_code == 200


def test_abort_all_ends_every_request_with_an_abort_reason(base_url: str) -> None:
    """Plain, streamed and OpenAI requests in flight all answer 200 with an abort reason."""
    long = {"max_new_tokens": 2000, "ignore_eos": True}
    answers: dict[str, Any] = {}

    def plain() -> None:
        answers["plain"] = generate(base_url, text="Count:", sampling_params=long)

    def streamed() -> None:
        body = {"text": "Count:", "sampling_params": long, "stream": True}
        with requests.post(base_url + "/generate", json=body, stream=True, timeout=300) as r:
            answers["stream_status"] = r.status_code
            answers["stream"] = sse(r)

    def completion() -> None:
        body = {"prompt": "Count:", "max_tokens": 2000, "ignore_eos": True}
        answers["openai"] = requests.post(base_url + "/v1/completions", json=body, timeout=300)

    threads = [threading.Thread(target=fn) for fn in (plain, streamed, completion)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 120
    while server_info(base_url)["num_running_reqs"] < 3:
        assert time.monotonic() < deadline, "the three requests never ran together"
        time.sleep(0.05)
    assert requests.post(base_url + "/abort_request", json={"abort_all": True}).status_code == 200
    for thread in threads:
        thread.join(timeout=120)
    assert answers["plain"].status_code == 200, answers["plain"].text
    assert answers["plain"].json()["meta_info"]["finish_reason"]["type"] == "abort"
    assert answers["stream_status"] == 200 and answers["stream"][-1] == "[DONE]"
    assert answers["stream"][-2]["meta_info"]["finish_reason"]["type"] == "abort"
    assert answers["openai"].status_code == 200, answers["openai"].text
    assert answers["openai"].json()["choices"][0]["finish_reason"] == "abort"
    info = wait_idle(base_url)
    assert info["num_free_pages"] + info["num_cached_pages"] == info["num_total_pages"], info


def _random_request(
    rng: random.Random, prompts: list[str], vocab: int, max_new_tokens: int = 8
) -> tuple[str, dict[str, Any], bool]:
    """`(route, body, stream)`: a valid request mixing the features a busy server sees at once."""
    sampling: dict[str, Any] = {
        "max_new_tokens": rng.randint(1, max_new_tokens),
        "temperature": rng.choice([0.0, 0.7, 1.3]),
        "top_p": rng.choice([1.0, 0.9, 0.5]),
        "top_k": rng.choice([-1, 1, 20]),
        "min_p": rng.choice([0.0, 0.1]),
        "frequency_penalty": rng.choice([0.0, 0.5, -0.5]),
        "presence_penalty": rng.choice([0.0, 1.0]),
        "repetition_penalty": rng.choice([1.0, 1.2, 0.8]),
        "ignore_eos": rng.random() < 0.3,
        "n": rng.choice([1, 1, 2, 3]),
    }
    sampling["min_new_tokens"] = rng.randint(0, sampling["max_new_tokens"])
    if rng.random() < 0.4:
        sampling["stop"] = rng.sample([" the", ".", "\n", "Paris", "a"], rng.randint(1, 3))
    if rng.random() < 0.3:
        sampling["stop_token_ids"] = [rng.randrange(vocab) for _ in range(rng.randint(1, 3))]
    if rng.random() < 0.3:
        sampling["sampling_seed"] = rng.randrange(1000)
    grammar = rng.random() < 0.2
    stream = rng.random() < 0.5
    route = rng.choices(["/generate", "/v1/completions", "/v1/chat/completions"], [6, 2, 2])[0]
    if route == "/generate":
        if grammar:
            sampling["regex"] = LOAD_REGEX
        body: dict[str, Any] = {"sampling_params": sampling, "stream": stream}
        if rng.random() < 0.7:
            body["text"] = rng.choice(prompts)
        else:
            # Two tokens at least: logprob_start_len 1 must be inside the prompt (else a 400).
            body["input_ids"] = [rng.randrange(vocab) for _ in range(rng.randint(2, 40))]
        if rng.random() < 0.5:
            body["return_logprob"] = True
            body["top_logprobs_num"] = rng.choice([0, 3])
            body["logprob_start_len"] = rng.choice([-1, 0, 1])
            body["return_text_in_logprobs"] = rng.random() < 0.5
            if rng.random() < 0.3:
                body["token_ids_logprob"] = [rng.randrange(vocab) for _ in range(2)]
        return route, body, stream
    openai_body: dict[str, Any] = {
        "model": "m",
        "max_tokens": sampling["max_new_tokens"],
        "temperature": sampling["temperature"],
        "top_p": sampling["top_p"],
        "n": sampling["n"],
        "stream": stream,
        "stop": sampling.get("stop"),
        "seed": sampling.get("sampling_seed"),
        "top_k": sampling["top_k"],
        "ignore_eos": sampling["ignore_eos"],
    }
    if route == "/v1/completions":
        openai_body["prompt"] = rng.choice(prompts)
        openai_body["logprobs"] = rng.choice([None, 0, 2])
    else:
        openai_body["messages"] = [{"role": "user", "content": rng.choice(prompts)}]
        openai_body["logprobs"] = rng.random() < 0.4
        if grammar:
            openai_body["response_format"] = {"type": "json_object"}
        openai_body["top_logprobs"] = 2 if openai_body["logprobs"] else None
    return route, openai_body, stream


def _story_prompts(chat_prompt: str) -> list[str]:
    # Repeated prompts arrive together: one of several pages exercises the shared-prefix path.
    story = "Once upon a time, " + " ".join(f"a town called Number {i} had a mill." for i in range(40))
    return [chat_prompt, story, "def add(a, b):", "1, 2, 3,", "The weather today"]


# The grammar of some random /generate requests: any prefix of a match (an answer cut by its
# length or a stop string) matches LOAD_REGEX_PREFIX.
LOAD_REGEX = "[a-z ]+\\."
LOAD_REGEX_PREFIX = "[a-z ]*\\.?"


def _fits_its_grammar(route: str, body: dict[str, Any], answer: Any) -> bool:
    """A constrained answer of the random load fits its grammar: /generate's text is a prefix of
    a LOAD_REGEX match; a chat json_object that ended by itself (no stop strings) is an object."""
    if route == "/generate" and "regex" in body["sampling_params"]:
        return all(re.fullmatch(LOAD_REGEX_PREFIX, a["text"]) for a in answer if "text" in a)
    if route == "/v1/chat/completions" and "response_format" in body and not body.get("stop"):
        ended = [c["message"]["content"] for c in answer["choices"] if c["finish_reason"] == "stop"]
        return all(isinstance(json.loads(content), dict) for content in ended)
    return True


def _run_random_load(
    url: str, rng: random.Random, prompts: list[str], vocab: int, num_requests: int, max_new_tokens: int
) -> list[str]:
    """Random clients at once (some leave mid-stream, some are aborted by rid) beside greedy
    requests for each prompt; the failures, and greedy answers unlike the prompt's answer alone."""
    greedy_body = greedy(8, ignore_eos=True)
    alone = {p: generate(url, text=p, sampling_params=greedy_body).json()["text"] for p in prompts}
    plans = [
        (*_random_request(rng, prompts, vocab, max_new_tokens), rng.random() < 0.2)
        for _ in range(num_requests)
    ]
    aborts = []
    for index, (route, body, stream, leave) in enumerate(plans):
        if leave and route == "/generate" and not stream:  # aborted by rid instead of left
            body["rid"] = f"fuzz-{index}-{rng.randrange(1 << 30)}"
            n = body["sampling_params"]["n"]
            aborts.append(body["rid"] if n == 1 else f"{body['rid']}_{rng.randrange(n)}")
    failures: list[str] = []

    def client(route: str, body: dict[str, Any], stream: bool, leave: bool) -> None:
        try:
            with requests.post(url + route, json=body, stream=stream, timeout=600) as r:
                if r.status_code != 200:
                    failures.append(f"{route} {body}: {r.status_code} {r.text[:300]}")
                    return
                if not stream:
                    answer = r.json()
                    choices = answer if isinstance(answer, list) else answer.get("choices", [answer])
                    assert choices, answer
                    answers = answer if isinstance(answer, list) or route != "/generate" else [answer]
                    if not _fits_its_grammar(route, body, answers):
                        failures.append(f"{route} {body}: {answer} does not fit its grammar")
                    return
                events = 0
                for line in r.iter_lines():
                    if not line:
                        continue
                    assert line.startswith(b"data: "), line
                    if line == b"data: [DONE]":
                        return
                    json.loads(line[len(b"data: ") :])
                    events += 1
                    if leave and events >= 1:
                        return
                failures.append(f"{route} {body}: the stream ended without [DONE]")
        except Exception as exc:  # noqa: BLE001 - every failure is reported with its request
            failures.append(f"{route} {body}: {exc!r}")

    def check_greedy(prompt: str) -> None:
        text = generate(url, text=prompt, sampling_params=greedy_body).json()["text"]
        if text != alone[prompt]:
            failures.append(f"greedy {prompt[:30]!r}: {text!r} under load, {alone[prompt]!r} alone")

    threads = [threading.Thread(target=client, args=plan) for plan in plans]
    threads += [threading.Thread(target=check_greedy, args=(prompt,)) for prompt in prompts]
    rng.shuffle(threads)
    for thread in threads:
        thread.start()
    time.sleep(0.5)  # most requests have arrived; an abort of one not yet queued changes nothing
    for rid in aborts:
        assert requests.post(url + "/abort_request", json={"rid": rid}, timeout=60).status_code == 200
    for thread in threads:
        thread.join(timeout=600)
    return failures


def _assert_pool_whole_then_empty(url: str) -> None:
    info = wait_idle(url, timeout=120)
    assert info["num_free_pages"] + info["num_cached_pages"] == info["num_total_pages"], info
    assert requests.post(url + "/flush_cache", timeout=60).status_code == 200
    info = server_info(url)
    assert info["num_free_pages"] == info["num_total_pages"], info


def test_random_mixed_load_with_disconnects_and_aborts(
    tiny_url: str, chat_prompt: str, tokenizer: Any
) -> None:
    """Many clients at once, each mixing sampling, penalties, stops, logprobs, n, streaming and
    the three generation routes; some leave mid-stream, some are aborted by rid. Every request
    answers as the API says, greedy answers are those of each prompt alone, and the pool comes
    back whole."""
    seed = secrets.randbits(32)
    print(f"seed {seed}")
    failures = _run_random_load(
        tiny_url, random.Random(seed), _story_prompts(chat_prompt), len(tokenizer), 48, 8
    )
    assert not failures, failures[:5]
    _assert_pool_whole_then_empty(tiny_url)


@pytest.fixture(scope="module")
def small_pool_url(tiny_llama_path: Path) -> Iterator[str]:
    """A KV pool of 40 pages and 64-token prefill chunks: admission waits and decode rows are
    retracted all the time under the random load. The tiny Llama shares SmolLM2's tokenizer and
    vocabulary, and this test is about the scheduler, so its steps need not cost a real model's."""
    yield from _served(
        f"python3 -m sglang.launch_server --model-path {tiny_llama_path} --host 127.0.0.1 "
        "--max-total-tokens 640 --chunked-prefill-size 64 --max-running-requests 64 --no-warmup "
        f"--log-level warning {' '.join(spec.compile_level_flags(tiny_llama_path))}"
    )


def test_random_load_on_a_small_pool(small_pool_url: str, chat_prompt: str, tokenizer: Any) -> None:
    """The random load with outputs up to 120 tokens on a pool a few requests fill: retractions,
    prefix sharing, aborts and departures together."""
    seed = secrets.randbits(32)
    print(f"seed {seed}")
    prompts = _story_prompts(chat_prompt)
    failures = _run_random_load(small_pool_url, random.Random(seed), prompts, len(tokenizer), 40, 120)
    assert not failures, failures[:5]
    assert server_info(small_pool_url)["num_retracted_reqs"] > 0  # the load did outgrow the pool
    _assert_pool_whole_then_empty(small_pool_url)


# Valid bodies of each route, mutated by `_mutate`; every answer must be a 200 or a 4xx. Not
# /start_profile: a mutated output_dir ("3") would put traces in the server's working directory
# (tests/test_profile.py has its bad bodies).
_FUZZ_BODIES: list[tuple[str, Any]] = [
    (
        "/generate",
        {
            "text": "Hello",
            "sampling_params": {"max_new_tokens": 3, "temperature": 0.5, "stop": ["x"], "n": 1},
            "return_logprob": True,
            "top_logprobs_num": 2,
            "logprob_start_len": 0,
        },
    ),
    ("/generate", {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2}, "stream": True}),
    (
        "/generate",
        {
            "text": ["a", "b"],
            "sampling_params": [{"max_new_tokens": 2}, {"max_new_tokens": 1}],
            "return_logprob": [True, False],
            "token_ids_logprob": [1, 2],
        },
    ),
    (
        "/v1/completions",
        {"model": "m", "prompt": "Hi", "max_tokens": 3, "logprobs": 2, "n": 2, "stop": ["."], "echo": True},
    ),
    (
        "/v1/completions",
        {"model": "m", "prompt": [[1, 2, 3], [4, 5]], "max_tokens": 2, "stream": True,
         "stream_options": {"include_usage": True}},
    ),
    (
        "/v1/chat/completions",
        {"model": "m", "messages": [{"role": "system", "content": "s"},
         {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
         "max_tokens": 3, "logprobs": True, "top_logprobs": 2},
    ),
    ("/v1/embeddings", {"model": "m", "input": "hi"}),
    ("/abort_request", {"rid": "nothing"}),
    ("/update_weights_from_disk", {"model_path": "/nonexistent"}),
    ("/flush_cache", None),
]  # fmt: skip
_ODD_VALUES: list[Any] = [
    None, True, False, 0, -1, 1, 2**31, 2**63, -(2**63), 1e308, -0.0, "", "x", "\u0000", "é", "A" * 5000,
    [], [None], [1, "a"], [[1]], {}, {"a": 1}, [-5], [10**12], 0.5, "3", [""],
]  # fmt: skip


def _odd(rng: random.Random) -> Any:
    """One of `_ODD_VALUES`, a fresh copy (a shared list put in twice could end up inside itself)."""
    return json.loads(json.dumps(rng.choice(_ODD_VALUES)))


def _mutate(rng: random.Random, body: Any) -> Any:
    """`body` with one to three values replaced, keys dropped or keys added, at any depth."""
    body = json.loads(json.dumps(body))
    if body is None:
        return _odd(rng)
    for _ in range(rng.randint(1, 3)):
        target = body
        while isinstance(target, dict | list) and target and rng.random() < 0.6:
            key = rng.choice(list(target)) if isinstance(target, dict) else rng.randrange(len(target))
            if not isinstance(target[key], dict | list):
                break
            target = target[key]
        if isinstance(target, dict):
            roll, keys = rng.random(), list(target)
            if roll < 0.15 and keys:
                del target[rng.choice(keys)]
            elif roll < 0.3 or not keys:
                extra = ["extra", "n", "logprobs", "stream", "rid", "top_k", "min_p", "regex", "input_ids"]
                target[rng.choice(extra)] = _odd(rng)
            else:
                target[rng.choice(keys)] = _odd(rng)
        elif isinstance(target, list) and target:
            target[rng.randrange(len(target))] = _odd(rng)
    return body


def _bounded(route: str, body: Any) -> Any:
    """A generation left without a length would run to the context (minutes here): give it 4."""
    if isinstance(body, dict) and route in ("/v1/completions", "/v1/chat/completions"):
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            body["max_tokens"] = 4
    elif isinstance(body, dict) and route == "/generate":
        params = body.get("sampling_params")
        for one in params if isinstance(params, list) else [params]:
            if isinstance(one, dict) and one.get("max_new_tokens") is None:
                one["max_new_tokens"] = 4
    return body


def test_mutated_bodies_get_a_200_or_a_4xx_and_the_server_keeps_serving(tiny_url: str) -> None:
    """Random type, value and key mutations of valid bodies on every route: never a 5xx, never a
    stream without its end (a name too long for the OS once gave a 500 on weight updates). On the
    tiny Llama: the server's input handling, not the model, is under test."""
    seed = secrets.randbits(32)
    print(f"seed {seed}")
    rng = random.Random(seed)
    problems = []
    for _ in range(200):
        route, base = rng.choice(_FUZZ_BODIES)
        body = _bounded(route, _mutate(rng, base))
        # Only the generation routes stream; elsewhere a mutation's "stream": true changes nothing.
        streams = route in ("/generate", "/v1/completions", "/v1/chat/completions")
        stream = streams and isinstance(body, dict) and body.get("stream") is True
        data = json.dumps(body)
        with requests.post(
            tiny_url + route,
            data=data,
            headers={"Content-Type": "application/json"},
            stream=stream,
            timeout=300,
        ) as r:
            text = "\n".join(line.decode() for line in r.iter_lines()) if stream else r.text
            if r.status_code >= 500 or (stream and r.status_code == 200 and "[DONE]" not in text):
                problems.append(f"{route} {data[:300]} -> {r.status_code} {text[:300]}")
    assert not problems, problems[:5]
    assert generate(tiny_url, text="Hello", sampling_params=greedy(2)).status_code == 200
    info = wait_idle(tiny_url)
    assert info["num_free_pages"] + info["num_cached_pages"] == info["num_total_pages"], info


# ----------------------------------------------------------------------------- a server without tokenizer


@pytest.fixture(scope="module")
def bare_server(
    model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Any, Path]]:
    """`--skip-tokenizer-init --api-key`, warm-up on, its log kept to check the readiness line.

    Its requests are short and one at a time, so 8 rows and 128-token chunks serve them; the
    warm-up then compiles 9 step programs instead of 24 (the suite's compile time, not the
    server's behaviour, is what the limits change)."""
    port = find_free_port("127.0.0.1")
    log_path = tmp_path_factory.mktemp("bare") / "server.log"
    argv = [
        sys.executable,
        "-m",
        "server.launch_server",
        "--model-path",
        str(model_path),
        "--port",
        str(port),
        "--skip-tokenizer-init",
        "--api-key",
        "test-key",
        "--max-total-tokens",
        "4096",
        "--max-running-requests",
        "8",
        "--chunked-prefill-size",
        "128",
        "--disable-cuda-graph",
        "--trust-remote-code",
        "--cuda-graph-max-bs",
        "8",
    ]
    with open(log_path, "wb") as log:
        env = {**os.environ, "SGLAX_DRAIN_TIMEOUT": "300"}  # the drain test's request must not be cut short
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while "The server is fired up and ready to roll!" not in log_path.read_text():
            assert process.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "server never announced readiness"
            time.sleep(0.5)
        yield url, process, log_path
    finally:
        terminate_process(process)


AUTH = {"Authorization": "Bearer test-key"}


def test_bare_server_output_ids_say_paris(bare_server: tuple[str, Any, Path], tokenizer: Any) -> None:
    url, _, log_path = bare_server
    log = log_path.read_text()
    for flag in ("--disable-cuda-graph", "--trust-remote-code", "--cuda-graph-max-bs"):
        assert f"{flag} is ignored" in log
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    input_ids = tokenizer.encode(ids)
    r = requests.post(
        url + "/generate", json={"input_ids": input_ids, "sampling_params": greedy(32)}, headers=AUTH
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert "text" not in body
    assert "Paris" in tokenizer.decode(body["output_ids"])


def test_bare_server_api_key(bare_server: tuple[str, Any, Path]) -> None:
    url, _, _ = bare_server
    assert requests.get(url + "/health").status_code == 200
    assert requests.get(url + "/get_model_info").status_code == 401
    assert requests.get(url + "/get_model_info", headers={"Authorization": "Bearer nope"}).status_code == 401
    info = requests.get(url + "/get_model_info", headers=AUTH).json()
    assert info["tokenizer_path"] is None
    r = requests.post(url + "/generate", json={"text": "hi"}, headers=AUTH)
    assert r.status_code == 400 and "input_ids" in r.json()["error"]["message"]


def sigterm_mid_stream(
    url: str, process: subprocess.Popen, body: dict[str, Any], headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """Send SIGTERM once a stream's first event arrived; the stream's last event before [DONE]."""
    with requests.post(url + "/generate", json=body, headers=headers, stream=True, timeout=300) as r:
        lines = r.iter_lines()
        next(line for line in lines if line)
        os.kill(process.pid, signal.SIGTERM)
        events = [line for line in lines if line]
    assert events[-1] == b"data: [DONE]"
    return json.loads(events[-2][len(b"data: ") :])


def test_sigterm_drains_running_requests(bare_server: tuple[str, Any, Path]) -> None:
    url, process, log_path = bare_server
    body = {"input_ids": [1, 2, 3, 4], "sampling_params": greedy(12, ignore_eos=True), "stream": True}
    last = sigterm_mid_stream(url, process, body, AUTH)
    assert last["meta_info"]["finish_reason"] == {"type": "length", "length": 12}
    assert len(last["output_ids"]) == 12
    assert process.wait(timeout=120) == 0
    assert "Engine stopped." in log_path.read_text()


def test_sigterm_aborts_what_outlives_the_drain(model_path: Path, tmp_path: Path) -> None:
    """Past SGLAX_DRAIN_TIMEOUT a running stream is aborted: its client still gets a final event."""
    port = find_free_port("127.0.0.1")
    argv = [sys.executable, "-m", "server.launch_server", "--model-path", str(model_path)]
    argv += ["--port", str(port), "--max-total-tokens", "4096", "--no-warmup"]
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        env = {**os.environ, "SGLAX_DRAIN_TIMEOUT": "1"}
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(url, timeout=STARTUP_TIMEOUT, process=process)
        body = {"text": "Count:", "sampling_params": greedy(3000, ignore_eos=True), "stream": True}
        last = sigterm_mid_stream(url, process, body)
        assert last["meta_info"]["finish_reason"]["type"] == "abort", last["meta_info"]
        assert process.wait(timeout=120) == 0
        assert "Traceback" not in log_path.read_text()
    finally:
        terminate_process(process)
