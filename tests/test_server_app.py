"""The HTTP layer over a scripted engine: every route's answer, streaming, errors,
API key, metrics, and aborts on client disconnect. No model and no JAX step runs
here, so these tests take seconds; tests/test_server_e2e.py runs the real thing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import openai
import pytest
import requests
import uvicorn

import server.app as app_module
from runtime.io_struct import EngineRequest, RequestOutput
from runtime.sampling_params import SamplingParams
from runtime.server_args import ServerArgs
from server.app import FLUSH_CACHE_TEXT, create_app

VOCAB = 1000
CONTEXT = 256
STEP_SECONDS = 0.002


class FakeTokenizer:
    """One token per character; token t decodes to a letter, so texts are easy to predict."""

    chat_template = "fake"
    eos_token_id = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) % VOCAB for c in text]

    def decode(self, token_ids: list[int], **kwargs: Any) -> str:
        return "".join(chr(97 + t % 26) for t in token_ids)

    def apply_chat_template(
        self, messages: list[dict], tokenize: bool, add_generation_prompt: bool, **kw: Any
    ) -> str:
        text = "".join(f"[{m['role']}]{m['content']}" for m in messages)
        return text + ("[assistant]" if add_generation_prompt else "")


def fake_tokens(input_ids: list[int], count: int) -> list[int]:
    """The scripted 'model': deterministic tokens from the prompt."""
    base = sum(input_ids)
    return [(base + 7 * k) % VOCAB for k in range(count)]


class FakeEngine:
    """The Engine API over a thread that emits one token per active request per step."""

    def __init__(
        self, args: ServerArgs, is_generation: bool = True, embedding_kind: str | None = None
    ) -> None:
        self.server_args = args
        self.tokenizer = None if args.skip_tokenizer_init else FakeTokenizer()
        self.model_info = SimpleNamespace(
            model_path=args.model_path,
            tokenizer_path=None if args.skip_tokenizer_init else args.tokenizer_path,
            is_generation=is_generation,
            embedding_kind=embedding_kind,
            context_length=CONTEXT,
            vocab_size=VOCAB,
            served_model_name=args.served_model_name,
            embedding_size=2 if embedding_kind else None,  # the fake's vectors: [prompt length, 0.5]
        )
        self.inbox: queue.Queue = queue.Queue()
        self.active: dict[str, dict[str, Any]] = {}
        self.aborted: list[str] = []
        self.finished: list[str] = []
        self.stalled = threading.Event()
        self.profiling = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def tokenize(self, text: str) -> list[int]:
        assert self.tokenizer is not None
        return self.tokenizer.encode(text)

    def validate_request(self, req: EngineRequest) -> None:
        for t in req.input_ids:
            if not 0 <= t < VOCAB:
                raise ValueError(f"Token id {t} is outside the vocabulary (size {VOCAB}).")
        max_new = req.sampling_params.max_new_tokens
        if max_new is not None and len(req.input_ids) + max_new > CONTEXT:
            raise ValueError(
                f"Requested token count exceeds the model's maximum context length of {CONTEXT} tokens."
            )
        if req.rid in self.active:
            raise ValueError(f"Request id {req.rid!r} is already in flight.")

    def submit(self, req: EngineRequest, callback: Callable[[RequestOutput], None]) -> None:
        self.inbox.put(("req", req, callback))

    def abort(self, rid: str) -> None:
        self.inbox.put(("abort", rid))

    def flush_cache(self) -> bool:
        return not self.active and self.inbox.empty()

    def stats(self) -> dict[str, Any]:
        return {
            "num_running_reqs": len(self.active),
            "num_queue_reqs": 0,
            "num_used_tokens": 0,
            "token_usage": 0.0,
            "cache_hit_rate": 0.0,
            "gen_throughput": 1.5,
        }

    def get_server_info(self) -> dict[str, Any]:
        held = len(self.active)
        return {
            **self.stats(),
            "max_total_num_tokens": 4096,
            "num_free_pages": 10 - held,
            "num_total_pages": 10,
            "num_cached_pages": 0,
            "max_req_input_len": CONTEXT - 1,
        }

    def start_profile(self, output_dir: str | None, num_steps: int | None) -> None:
        if self.profiling:
            raise ValueError("Profiling is already in progress. Call /stop_profile first.")
        self.profiling = True

    def stop_profile(self) -> None:
        if not self.profiling:
            raise ValueError("Profiling is not in progress.")
        self.profiling = False

    def update_weights_from_disk(self, model_path: str, load_format: str | None) -> tuple[bool, str, int]:
        if model_path == "/missing":
            return False, f"Failed to get weights iterator: {model_path} (repository not found).", 0
        self.model_info.model_path = model_path
        return True, "Succeeded to update model weights.", 0

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _output(self, state: dict[str, Any], finished: bool, reason: dict | None) -> RequestOutput:
        req: EngineRequest = state["req"]
        ids = list(state["ids"])
        output = RequestOutput(
            rid=req.rid,
            output_ids=ids,
            text=self.tokenizer.decode(ids) if self.tokenizer else None,
            finished=finished,
            finish_reason=reason,
            prompt_tokens=len(req.input_ids),
            completion_tokens=len(ids),
            cached_tokens=0,
            e2e_latency=0.01,
        )
        if req.return_logprob:
            output.input_token_logprobs = [(None, req.input_ids[-1])]
            output.output_token_logprobs = [(-0.25, t) for t in ids]
            if req.top_logprobs_num:
                output.input_top_logprobs = [None]
                output.output_top_logprobs = [
                    [(-0.25, t), (-2.0, (t + 1) % VOCAB)][: req.top_logprobs_num] for t in ids
                ]
        if req.kind != "generate":
            output.embedding = [float(len(req.input_ids)), 0.5]
        return output

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                while True:
                    item = self.inbox.get(timeout=0 if self.active else 0.05)
                    if item[0] == "req":
                        _, req, callback = item
                        if self.stalled.is_set():
                            continue
                        count = 0 if req.kind != "generate" else req.sampling_params.max_new_tokens
                        if count is None:
                            count = CONTEXT - len(req.input_ids)
                        plan = fake_tokens(req.input_ids, count)
                        self.active[req.rid] = {"req": req, "cb": callback, "ids": [], "plan": plan}
                    elif item[1] in self.active:
                        state = self.active.pop(item[1])
                        self.aborted.append(item[1])
                        state["cb"](
                            self._output(state, True, {"type": "abort", "message": "Aborted by the client."})
                        )
            except queue.Empty:
                pass
            time.sleep(STEP_SECONDS)
            for rid, state in list(self.active.items()):
                req = state["req"]
                if len(state["ids"]) < len(state["plan"]):
                    state["ids"].append(state["plan"][len(state["ids"])])
                done = len(state["ids"]) >= len(state["plan"])
                if rid.startswith("fail-") and len(state["ids"]) == 2:  # the engine fails mid-request
                    del self.active[rid]
                    output = self._output(state, True, {"type": "abort", "message": "boom"})
                    output.error = "internal error: boom"
                    state["cb"](output)
                elif done:
                    del self.active[rid]
                    self.finished.append(rid)
                    state["cb"](self._output(state, True, {"type": "length", "length": len(state["plan"])}))
                elif req.stream:
                    state["cb"](self._output(state, False, None))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LiveServer:
    """uvicorn in a thread on 127.0.0.1 over a FakeEngine."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.app = create_app(engine)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", log_config=None
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.engine.shutdown()


def start_server(**kwargs: Any) -> LiveServer:
    engine_kwargs = {k: kwargs.pop(k) for k in ("is_generation", "embedding_kind") if k in kwargs}
    args = ServerArgs(model_path="/models/fake", **kwargs)
    return LiveServer(FakeEngine(args, **engine_kwargs))


@pytest.fixture(scope="module")
def live() -> Iterator[LiveServer]:
    server = start_server(enable_metrics=True)
    yield server
    server.close()


def sse_events(response: requests.Response) -> list[Any]:
    """Parse an SSE body; asserts the framing (`data: ...` blocks separated by blank lines)."""
    events = []
    raw = response.content.decode()
    assert raw.endswith("\n\n")
    for block in raw.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def expected_text(prompt: str, n: int) -> str:
    tok = FakeTokenizer()
    return tok.decode(fake_tokens(tok.encode(prompt), n))


# ----------------------------------------------------------------------------- /generate


def test_generate_single(live: LiveServer) -> None:
    r = requests.post(
        live.url + "/generate", json={"text": "hello", "sampling_params": {"max_new_tokens": 4}}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["text"] == expected_text("hello", 4)
    meta = body["meta_info"]
    assert set(meta) == {
        "id",
        "finish_reason",
        "prompt_tokens",
        "completion_tokens",
        "cached_tokens",
        "e2e_latency",
    }
    assert meta["finish_reason"] == {"type": "length", "length": 4}
    assert (meta["prompt_tokens"], meta["completion_tokens"]) == (5, 4)


def test_generate_put_and_rid(live: LiveServer) -> None:
    r = requests.put(live.url + "/generate", json={"input_ids": [1, 2], "rid": "my-rid"})
    assert r.status_code == 200 and r.json()["meta_info"]["id"] == "my-rid"


def test_batch_and_n_order(live: LiveServer) -> None:
    r = requests.post(
        live.url + "/generate",
        json={"text": ["ab", "xyz"], "sampling_params": {"max_new_tokens": 3, "n": 2}},
    )
    assert r.status_code == 200
    body = r.json()
    assert isinstance(body, list) and len(body) == 4
    assert [b["meta_info"]["prompt_tokens"] for b in body] == [2, 2, 3, 3]
    assert [b["text"] for b in body] == [expected_text("ab", 3)] * 2 + [expected_text("xyz", 3)] * 2


def test_streaming_is_cumulative_and_matches(live: LiveServer) -> None:
    body = {"text": "stream me", "sampling_params": {"max_new_tokens": 6}}
    plain = requests.post(live.url + "/generate", json=body).json()
    r = requests.post(live.url + "/generate", json={**body, "stream": True})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    texts = [e["text"] for e in events[:-1]]
    assert all(texts[i + 1].startswith(texts[i]) for i in range(len(texts) - 1))
    assert texts[-1] == plain["text"]
    assert all(e["meta_info"]["finish_reason"] is None for e in events[:-2])
    assert events[-2]["meta_info"]["finish_reason"] == {"type": "length", "length": 6}
    assert all("index" not in e for e in events[:-1])


def test_a_stream_behind_the_steps_gets_the_latest_output() -> None:
    """Outputs are cumulative: those waiting for one request reach it as the newest one alone,
    for every request of a batch, and nothing of the request's text or tokens is lost."""
    engine = FakeEngine(ServerArgs(model_path="/models/fake", enable_metrics=True))
    params = SamplingParams(max_new_tokens=30)
    prompts = [[5, 6, 7], [8, 9]]
    requests_ = [EngineRequest(f"behind-{i}", p, params, stream=True) for i, p in enumerate(prompts)]

    async def consume() -> list[tuple[int, RequestOutput]]:
        group = app_module.RequestGroup(app_module.ServerState(engine), requests_)
        group.start()
        while any(rid in engine.active or not engine.inbox.empty() for rid in ("behind-0", "behind-1")):
            time.sleep(0.01)  # the event loop is held while every step of both requests runs
        return [item async for item in group.outputs()]

    try:
        received = asyncio.run(consume())
    finally:
        engine.shutdown()
    assert sorted(index for index, _ in received) == [0, 1]  # one output each: the last
    for index, output in received:
        assert output.finished and output.output_ids == fake_tokens(prompts[index], 30)
        assert output.text == engine.tokenizer.decode(fake_tokens(prompts[index], 30))


def test_streamed_batch_has_index(live: LiveServer) -> None:
    r = requests.post(
        live.url + "/generate",
        json={"text": ["a", "bb"], "sampling_params": {"max_new_tokens": 3}, "stream": True},
    )
    events = sse_events(r)[:-1]
    assert {e["index"] for e in events} == {0, 1}
    last = {e["index"]: e for e in events if e["meta_info"]["finish_reason"] is not None}
    assert last[0]["text"] == expected_text("a", 3) and last[1]["text"] == expected_text("bb", 3)


def test_logprobs(live: LiveServer) -> None:
    r = requests.post(
        live.url + "/generate",
        json={
            "input_ids": [3, 4, 5],
            "sampling_params": {"max_new_tokens": 2},
            "return_logprob": True,
            "top_logprobs_num": 2,
            "return_text_in_logprobs": True,
        },
    )
    meta = r.json()["meta_info"]
    assert meta["input_token_logprobs"] == [[None, 5, FakeTokenizer().decode([5])]]
    assert len(meta["output_token_logprobs"]) == 2
    assert all(len(entry) == 3 for entry in meta["output_token_logprobs"])
    assert [len(top) for top in meta["output_top_logprobs"]] == [2, 2]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "Malformed JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"text": 5}', "text:"),
        (b'{"text": "a", "sampling_params": {"nope": 1}}', "Unknown sampling parameter: 'nope'."),
        (b'{"text": "a", "sampling_params": {"max_new_tokens": -1}}', "max_new_tokens must be at least 0"),
        (b'{"text": "a", "sampling_params": {"max_new_tokens": 1000000}}', "maximum context length of 256"),
        (b'{"input_ids": [1, 99999]}', "99999"),
        (b'{"input_ids": []}', "input_ids cannot be empty."),
        (b"{}", "Either text, input_ids or input_embeds should be provided."),
        (b'{"text": "a", "input_embeds": [[1.0]]}', "input_embeds is not supported by this server."),
        (
            b'{"text": "a", "stream": true, "sampling_params": {"top_p": 5}}',
            "top_p must be in (0, 1], got 5.",
        ),
    ],
)
def test_bad_requests_are_400_and_server_keeps_serving(live: LiveServer, body: bytes, message: str) -> None:
    r = requests.post(live.url + "/generate", data=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert message in r.json()["error"]["message"]
    ok = requests.post(live.url + "/generate", json={"text": "ok", "sampling_params": {"max_new_tokens": 1}})
    assert ok.status_code == 200


def test_rid_in_flight_is_400(live: LiveServer) -> None:
    body = {"text": "long", "rid": "dup", "sampling_params": {"max_new_tokens": 50}, "stream": True}
    with requests.post(live.url + "/generate", json=body, stream=True) as first:
        lines = first.iter_lines()  # keep the iterator: dropping it closes the connection
        next(lines)
        second = requests.post(live.url + "/generate", json=body)
        assert second.status_code == 400 and "dup" in second.json()["error"]["message"]


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_stream_disconnect_aborts(live: LiveServer) -> None:
    body = {"text": "bye", "rid": "gone-stream", "sampling_params": {"max_new_tokens": 60}, "stream": True}
    with requests.post(live.url + "/generate", json=body, stream=True) as r:
        lines = r.iter_lines()
        next(lines)
    wait_until(lambda: "gone-stream" in live.engine.aborted)
    wait_until(lambda: not live.engine.active)


@pytest.mark.parametrize("route", ["/generate", "/v1/completions", "/v1/chat/completions"])
def test_stream_gone_before_its_first_event_aborts(live: LiveServer, route: str) -> None:
    """The client is gone when the response starts (ASGI 2.4: the first send fails), so the
    events' generator never starts: the requests must be aborted all the same."""
    rid = f"gone-early{route.replace('/', '-')}"
    bodies = {
        "/generate": {"text": "bye", "rid": rid, "sampling_params": {"max_new_tokens": 60}, "stream": True},
        "/v1/completions": {"model": "m", "prompt": "bye", "max_tokens": 60, "stream": True, "rid": rid},
        "/v1/chat/completions": {
            "model": "m",
            "messages": [{"role": "user", "content": "bye"}],
            "max_tokens": 60,
            "stream": True,
            "rid": rid,
        },
    }
    incoming = [{"type": "http.request", "body": json.dumps(bodies[route]).encode(), "more_body": False}]

    async def receive() -> dict[str, Any]:
        if incoming:
            return incoming.pop()
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            assert message["status"] == 200
            raise OSError("the client went away")

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": route,
        "raw_path": route.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", live.port),
    }

    async def call() -> None:
        with contextlib.suppress(Exception):
            await live.app(scope, receive, send)

    asyncio.run(call())
    wait_until(lambda: any(r.startswith(rid) for r in live.engine.aborted))  # the engine's thread takes it
    wait_until(lambda: not any(r.startswith(rid) for r in live.engine.active))


def test_non_stream_disconnect_aborts(live: LiveServer) -> None:
    live.engine.stalled.clear()
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(
            live.url + "/generate",
            json={"text": "slow", "rid": "gone-plain", "sampling_params": {"max_new_tokens": 60}},
            timeout=0.03,
        )
    wait_until(lambda: "gone-plain" in live.engine.aborted)


def test_abort_request_route(live: LiveServer) -> None:
    results: list[Any] = []
    body = {"text": "x", "rid": "to-abort", "sampling_params": {"max_new_tokens": 60}}
    thread = threading.Thread(target=lambda: results.append(requests.post(live.url + "/generate", json=body)))
    thread.start()
    wait_until(lambda: "to-abort" in live.engine.active)
    assert requests.post(live.url + "/abort_request", json={"rid": "to-abort"}).status_code == 200
    thread.join(timeout=5)
    assert results[0].status_code == 200
    assert results[0].json()["meta_info"]["finish_reason"]["type"] == "abort"


# ----------------------------------------------------------------------------- other native routes


def test_model_and_server_info(live: LiveServer) -> None:
    info = requests.get(live.url + "/get_model_info").json()
    assert info == {"model_path": "/models/fake", "tokenizer_path": "/models/fake", "is_generation": True}
    server_info = requests.get(live.url + "/get_server_info").json()
    assert server_info["model_path"] == "/models/fake" and server_info["page_size"] == 16
    assert server_info["max_total_num_tokens"] == 4096 and "version" in server_info
    assert "last_gen_throughput" in server_info or "gen_throughput" in server_info


def test_health(live: LiveServer) -> None:
    assert requests.get(live.url + "/health").status_code == 200
    r = requests.get(live.url + "/health_generate")
    assert r.status_code == 200 and r.content == b""


def test_health_generate_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    server = start_server()
    try:
        monkeypatch.setattr(app_module, "HEALTH_CHECK_TIMEOUT", 0.3)
        server.engine.stalled.set()
        assert requests.get(server.url + "/health_generate").status_code == 503
        server.engine.stalled.clear()
        assert requests.get(server.url + "/health_generate").status_code == 200
    finally:
        server.close()


def test_control_routes_answer_503_when_the_engine_is_slow(monkeypatch: pytest.MonkeyPatch) -> None:
    server = start_server(enable_metrics=True)
    try:
        monkeypatch.setattr(app_module, "CONTROL_TIMEOUT", 0.3)
        slow = lambda *args: time.sleep(1.0) or {}  # noqa: E731
        for name in ("flush_cache", "stats", "get_server_info", "start_profile", "stop_profile"):
            monkeypatch.setattr(server.engine, name, slow)
        for route in ("/flush_cache", "/get_server_info", "/metrics", "/start_profile", "/stop_profile"):
            r = requests.get(server.url + route)
            assert r.status_code == 503, (route, r.status_code, r.text)
            assert "did not answer within 0.3 s" in r.json()["error"]["message"], r.text
        monkeypatch.undo()
        assert requests.get(server.url + "/get_server_info").status_code == 200
    finally:
        server.close()


def test_flush_cache(live: LiveServer) -> None:
    for method in (requests.get, requests.post):
        r = method(live.url + "/flush_cache")
        assert r.status_code == 200 and r.text == FLUSH_CACHE_TEXT
    body = {"text": "busy", "sampling_params": {"max_new_tokens": 60}, "stream": True}
    with requests.post(live.url + "/generate", json=body, stream=True) as r:
        lines = r.iter_lines()  # keep the iterator: dropping it closes the connection
        next(lines)
        busy = requests.post(live.url + "/flush_cache")
        assert busy.status_code == 400 and busy.text == FLUSH_CACHE_TEXT


def test_control_routes(live: LiveServer) -> None:
    assert requests.post(live.url + "/start_profile").text == "Start profiling.\n"
    again = requests.post(live.url + "/start_profile", json={"output_dir": "/tmp/x", "num_steps": 3})
    assert again.status_code == 400 and "already" in again.json()["error"]["message"]
    assert requests.get(live.url + "/stop_profile").text == "Stop profiling. This will take some time.\n"
    # The fake engine has no expert recorder: the route says so instead of crashing.
    r = requests.post(live.url + "/start_expert_distribution_record")
    assert r.status_code == 501 and "start_expert_distribution_record" in r.json()["error"]["message"]


def test_update_weights(live: LiveServer) -> None:
    bad = requests.post(live.url + "/update_weights_from_disk", json={"model_path": "/missing"})
    assert bad.status_code == 400
    assert bad.json() == {
        "success": False,
        "message": "Failed to get weights iterator: /missing (repository not found).",
        "num_paused_requests": 0,
    }
    assert (
        requests.post(live.url + "/update_weights_from_disk", json={"load_format": None}).status_code == 400
    )
    good = requests.post(live.url + "/update_weights_from_disk", json={"model_path": "/models/new"})
    assert good.status_code == 200 and good.json()["success"] is True
    assert requests.get(live.url + "/get_model_info").json()["model_path"] == "/models/new"
    requests.post(live.url + "/update_weights_from_disk", json={"model_path": "/models/fake"})


def test_encode_on_generation_model(live: LiveServer) -> None:
    r = requests.post(live.url + "/encode", json={"text": "a"})
    assert r.status_code == 400
    assert r.json()["error"]["message"].startswith(
        "This model does not appear to be an embedding model by default."
    )
    r = requests.post(live.url + "/v1/embeddings", json={"input": "a", "model": "m"})
    assert r.status_code == 400 and r.json()["object"] == "error" and r.json()["code"] == 400


def test_metrics(live: LiveServer) -> None:
    requests.post(
        live.url + "/generate", json={"text": "m", "sampling_params": {"max_new_tokens": 3}, "stream": True}
    )
    text = requests.get(live.url + "/metrics").text
    for name in (
        "sglang:prompt_tokens_total",
        "sglang:generation_tokens_total",
        "sglang:num_requests_total",
        "sglang:cached_tokens_total",
        "sglang:time_to_first_token_seconds_bucket",
        "sglang:inter_token_latency_seconds_bucket",
        "sglang:e2e_request_latency_seconds_bucket",
        "sglang:num_running_reqs",
        "sglang:num_queue_reqs",
        "sglang:gen_throughput",
        "sglang:token_usage",
        "sglang:cache_hit_rate",
    ):
        assert name in text, name
    assert 'model_name="/models/fake"' in text


# ----------------------------------------------------------------------------- OpenAI routes


def test_v1_models(live: LiveServer) -> None:
    body = requests.get(live.url + "/v1/models").json()
    assert body["object"] == "list"
    [card] = body["data"]
    assert card["id"] == "/models/fake" and card["object"] == "model" and card["max_model_len"] == CONTEXT
    assert {"created", "owned_by", "root"} <= set(card)
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="none")
    assert client.models.retrieve("/models/fake").model_dump()["max_model_len"] == CONTEXT
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("other")


def test_openai_client(live: LiveServer) -> None:
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="none")
    completion = client.completions.create(model="m", prompt="hey", max_tokens=5, n=2)
    assert [c.text for c in completion.choices] == [expected_text("hey", 5)] * 2
    assert completion.usage.prompt_tokens == 3 and completion.usage.completion_tokens == 10
    chat = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
    )
    prompt = "[user]hi[assistant]"
    assert chat.choices[0].message.content == expected_text(prompt, 4)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].finish_reason == "length"
    stream = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected_text(prompt, 4)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    streamed = client.completions.create(model="m", prompt="hey", max_tokens=5, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected_text("hey", 5)


def test_openai_logprobs(live: LiveServer) -> None:
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="none")
    chat = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "a"}], max_tokens=3, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 for c in content)
    completion = client.completions.create(model="m", prompt="ab", max_tokens=3, logprobs=1, echo=True)
    logprobs = completion.choices[0].logprobs
    assert completion.choices[0].text.startswith("ab")
    assert len(logprobs.tokens) == 4  # the fake reports the last prompt token, then 3 outputs


def test_completion_top_logprobs_hold_the_chosen_token() -> None:
    """Legacy completions' top logprobs hold the chosen token as well as the `logprobs` most
    likely ones, as OpenAI's do (up to logprobs + 1 entries); an echoed first prompt token has none."""
    state = SimpleNamespace(token_texts=SimpleNamespace(decode=lambda ids: f"<{ids[0]}>"))
    entries = [(None, 1), (-3.0, 7), (-0.1, 5)]
    top = [None, [(-0.5, 5)], [(-0.1, 5)]]
    logprobs = app_module._completion_logprobs(state, entries, top, 0)
    assert logprobs.top_logprobs == [None, {"<5>": -0.5, "<7>": -3.0}, {"<5>": -0.1}]


def test_openai_streams_match_non_streamed(live: LiveServer) -> None:
    """Streamed choices (n=2, echo, logprobs) add up to the non-streamed response."""
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="none")
    kwargs = dict(model="m", prompt="ab", max_tokens=3, logprobs=1, n=2)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True))
    echoed = list(client.completions.create(**kwargs, echo=True, stream=True))
    for i, choice in enumerate(whole.choices):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == i]
        assert "".join(c.text for c in mine) == choice.text
        assert sum((c.logprobs.tokens for c in mine if c.logprobs), []) == choice.logprobs.tokens
        assert [c.finish_reason for c in mine][-1] == choice.finish_reason == "length"
        assert not any(c.finish_reason for c in mine[:-1])
        assert "".join(c.choices[0].text for c in echoed if c.choices[0].index == i) == "ab" + choice.text
    chat_kwargs = dict(
        model="m", messages=[{"role": "user", "content": "a"}], max_tokens=3, logprobs=True, top_logprobs=2
    )
    chat = client.chat.completions.create(**chat_kwargs).choices[0]
    chunks = [c for c in client.chat.completions.create(**chat_kwargs, stream=True) if c.choices]
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.message.content
    streamed = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in chat.logprobs.content]
    assert all(len(e.top_logprobs) == 2 for e in streamed)
    assert chunks[-1].choices[0].finish_reason == chat.finish_reason == "length"


def test_an_engine_error_mid_stream_reaches_the_openai_client_as_an_error(live: LiveServer) -> None:
    """An error after a stream started is an `{"error": {...}}` event, as the reference sends it:
    the openai client raises it (an event of the error body alone reads as an empty chunk)."""
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="none")
    chat = dict(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True)
    with pytest.raises(openai.APIError, match="internal error: boom"):
        list(client.chat.completions.create(**chat, extra_body={"rid": "fail-chat"}))
    with pytest.raises(openai.APIError, match="internal error: boom"):
        list(
            client.completions.create(
                model="m", prompt="hey", max_tokens=8, stream=True, extra_body={"rid": "fail-c"}
            )
        )
    raw = requests.post(
        live.url + "/v1/completions", json={"prompt": "hey", "max_tokens": 8, "stream": True, "rid": "fail-r"}
    )
    error = next(event for event in sse_events(raw) if isinstance(event, dict) and "error" in event)["error"]
    assert error["code"] == 500 and error["type"] == "InternalServerError" and error["object"] == "error"


def test_openai_errors(live: LiveServer) -> None:
    r = requests.post(live.url + "/v1/chat/completions", json={"model": "m", "messages": "nope"})
    assert r.status_code == 400
    body = r.json()
    assert body["object"] == "error" and body["type"] == "BadRequestError" and body["code"] == 400
    assert "messages" in body["message"]
    r = requests.post(live.url + "/v1/completions", data=b"{bad")
    assert r.status_code == 400 and r.json()["object"] == "error"
    r = requests.post(live.url + "/v1/completions", json={"prompt": "a", "max_tokens": 10**6})
    assert r.status_code == 400 and "maximum context length" in r.json()["message"]
    wrong = [
        ("/v1/completions", {"prompt": "a", "temperature": True}, "temperature"),
        ("/v1/completions", {"prompt": "a", "top_p": "0.5"}, "top_p"),
        (
            "/v1/completions",
            {"prompt": "a", "stream": True, "stream_options": {"include_usage": 1}},
            "stream_options",
        ),
        ("/v1/completions", {"prompt": "a", "max_tokens": -1}, "max_tokens"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "a"}], "max_tokens": -2},
            "max_tokens",
        ),
    ]
    for route, body, field in wrong:
        r = requests.post(live.url + route, json=body)
        assert r.status_code == 400, (route, body, r.text)
        assert field in r.json()["message"], (route, body, r.text)
    r = requests.post(live.url + "/v1/completions", json={"prompt": "a", "max_tokens": -1})
    assert r.json()["param"] == "max_tokens"


def test_openai_stream_chunks_share_one_id(live: LiveServer) -> None:
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="none")
    chunks = list(
        client.completions.create(
            model="m", prompt="ab", max_tokens=3, n=3, stream=True, stream_options={"include_usage": True}
        )
    )
    assert len({chunk.id for chunk in chunks}) == 1 and len(chunks) > 3
    running = list(
        client.completions.create(
            model="m", prompt="ab", max_tokens=3, stream=True, stream_options={"continuous_usage_stats": True}
        )
    )
    counts = [chunk.usage.completion_tokens for chunk in running]
    assert counts == sorted(counts) and counts[-1] == 3 and running[0].usage.prompt_tokens == 2
    r = requests.post(
        live.url + "/v1/completions", json={"prompt": "a", "stream_options": {"include_usage": True}}
    )
    assert r.status_code == 400 and r.json()["param"] == "stream_options", r.text


# ----------------------------------------------------------------------------- other configurations


def test_api_key() -> None:
    server = start_server(api_key="sekrit")
    try:
        assert requests.get(server.url + "/health").status_code == 200
        assert requests.get(server.url + "/get_model_info").status_code == 401
        bad = {"Authorization": "Bearer wrong"}
        assert requests.post(server.url + "/generate", json={"text": "a"}, headers=bad).status_code == 401
        good = {"Authorization": "Bearer sekrit"}
        assert requests.get(server.url + "/get_model_info", headers=good).status_code == 200
        r = requests.post(server.url + "/v1/completions", json={"prompt": "a"}, headers=bad)
        assert r.status_code == 401 and r.json()["object"] == "error"
        assert r.json()["type"] == "AuthenticationError"
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="sekrit")
        assert client.models.list().data[0].id == "/models/fake"
        assert requests.get(server.url + "/metrics").status_code != 401
        info = requests.get(server.url + "/get_server_info", headers=good).json()
        assert info["api_key"] != "sekrit"
    finally:
        server.close()


def test_cors_is_open(live: LiveServer) -> None:
    r = requests.options(
        live.url + "/generate",
        headers={"Origin": "http://example.com", "Access-Control-Request-Method": "POST"},
    )
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] in ("*", "http://example.com")


def test_skip_tokenizer_init() -> None:
    server = start_server(skip_tokenizer_init=True)
    try:
        r = requests.post(
            server.url + "/generate", json={"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 3}}
        )
        assert r.status_code == 200
        body = r.json()
        assert "text" not in body and body["output_ids"] == fake_tokens([1, 2], 3)
        r = requests.post(server.url + "/generate", json={"text": "a"})
        assert r.status_code == 400 and "--skip-tokenizer-init" in r.json()["error"]["message"]
        info = requests.get(server.url + "/get_model_info").json()
        assert info["tokenizer_path"] is None
    finally:
        server.close()


def test_embedding_model() -> None:
    server = start_server(is_generation=False, embedding_kind="embed", is_embedding=True)
    try:
        r = requests.post(server.url + "/encode", json={"text": "abc", "model": "x"})
        assert r.status_code == 200
        body = r.json()
        assert body["embedding"] == [3.0, 0.5]
        assert body["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
        assert body["meta_info"]["prompt_tokens"] == 3
        batch = requests.post(server.url + "/classify", json={"input_ids": [[1], [2, 3]]}).json()
        assert [b["embedding"][0] for b in batch] == [1.0, 2.0]
        r = requests.post(server.url + "/generate", json={"text": "a"})
        assert r.status_code == 400 and "embedding model" in r.json()["error"]["message"]
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
        result = client.embeddings.create(model="m", input=["ab", "abcd"])  # base64 on the wire
        assert [d.embedding for d in result.data] == [[2.0, 0.5], [4.0, 0.5]]
        assert result.usage.prompt_tokens == 6
        floats = client.embeddings.create(model="m", input="ab", encoding_format="float")
        assert floats.data[0].embedding == [2.0, 0.5]
        r = requests.post(server.url + "/v1/embeddings", json={"input": []})
        assert r.status_code == 400 and r.json()["param"] == "input", r.text
        assert requests.get(server.url + "/health_generate").status_code == 200
    finally:
        server.close()


def test_draining_refuses_new_work(live: LiveServer) -> None:
    state = live.app.state.sglax
    state.draining = True
    try:
        r = requests.post(live.url + "/generate", json={"text": "a"})
        assert r.status_code == 503
        assert requests.get(live.url + "/health").status_code == 503
    finally:
        state.draining = False
