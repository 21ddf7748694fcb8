"""The FastAPI app: SGLang's native routes, the OpenAI-compatible routes and /metrics.

A handler parses and checks its body (`server.protocol`), expands it into
`EngineRequest`s, has the engine validate every one of them, then submits them
all. The engine calls back on another thread (the engine client's reader, or an
in-process engine's scheduler); `RequestGroup` carries each `RequestOutput`
onto the event loop (`server.output_relay`: one wake-up of the loop for all the
outputs of a step), where the handler turns it into JSON
(`runtime.response`). Errors are found before a response starts, so a bad
request is always a plain 4xx, streamed or not. When a client goes away,
streamed or not, its unfinished requests are aborted so their KV pages return
to the pool.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import functools
import hmac
import importlib.metadata
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from runtime.io_struct import EngineRequest, RequestKind, RequestOutput
from runtime.response import embedding_response, generate_response
from runtime.sampling_params import SamplingParams
from server import protocol
from server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from server.metrics import RequestTimer, ServerMetrics
from server.output_relay import OutputRelay
from server.protocol import ExpandedRequests, ProtocolError
from server.reasoning_parsers import PARSERS as REASONING_PARSERS
from server.reasoning_parsers import ReasoningParser
from server.tool_parsers import PARSERS

logger = logging.getLogger(__name__)

HEALTH_CHECK_TIMEOUT = float(os.environ.get("SGLAX_HEALTH_CHECK_TIMEOUT", "20"))
HEALTH_CHECK_POLL_S = 0.25  # how often a waiting health check asks whether the engine steps on
# The health checks' engine calls have threads of their own: a call to a hung engine is never
# answered, and its thread must not be one that the control routes wait for.
_HEALTH_CALLS = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="health-check")
# Control calls run on the scheduler thread between steps; a wedged engine must not wedge the route.
CONTROL_TIMEOUT = float(os.environ.get("SGLAX_CONTROL_TIMEOUT", "60"))
FLUSH_CACHE_TEXT = (
    "Cache flushed.\nPlease check backend logs for more details. "
    "(When there are running or waiting requests, the operation will not be performed.)\n"
)
NOT_EMBEDDING_MODEL = (
    "This model does not appear to be an embedding model by default. Please add `--is-embedding` "
    "when launching the server or try another model."
)


# Paths reachable without the API key, as in the reference.
PUBLIC_PATHS = frozenset({"/health", "/health_generate", "/metrics"})
SSE_DONE = b"data: [DONE]\n\n"
LOG_TRUNCATE = 200


def not_generating(route: str) -> ProtocolError:
    """The 400 of a generation route on an embedding or reward model, naming the route asked for."""
    return ProtocolError(
        f"This model is an embedding model: {route} is not served. "
        "Use /encode or /classify (/v1/embeddings on the OpenAI routes)."
    )


def _version() -> str:
    try:
        return importlib.metadata.version("sglax")
    except importlib.metadata.PackageNotFoundError:
        return "0.1.0"


def json_response(content: Any, status_code: int = 200) -> Response:
    """orjson rendering: fast, and NaN/inf become null instead of invalid JSON."""
    return Response(
        orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY),
        status_code=status_code,
        media_type="application/json",
    )


def native_error(message: str, status_code: int = 400) -> Response:
    return json_response({"error": {"message": message}}, status_code)


OPENAI_ERROR_TYPES = {401: "AuthenticationError", 404: "NotFoundError"}


def openai_error_body(message: str, status_code: int = 400, param: str | None = None) -> dict[str, Any]:
    error_type = OPENAI_ERROR_TYPES.get(
        status_code, "BadRequestError" if status_code < 500 else "InternalServerError"
    )
    return protocol.ErrorResponse(
        message=message, type=error_type, param=param, code=status_code
    ).model_dump()


def openai_error(message: str, status_code: int = 400, param: str | None = None) -> Response:
    return json_response(openai_error_body(message, status_code, param), status_code)


def error_for_path(path: str, message: str, status_code: int, param: str | None = None) -> Response:
    """The error body of the route family `path` belongs to."""
    if path.startswith("/v1/"):
        return openai_error(message, status_code, param)
    return native_error(message, status_code)


def sse_event(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n\n"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= LOG_TRUNCATE else text[:LOG_TRUNCATE] + "...'"


class TokenTextCache:
    """Single-token decoding, memoized: streamed logprob lists decode the same ids again and again."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def decode(self, token_ids: list[int], **kwargs: Any) -> str:
        if len(token_ids) != 1 or kwargs:
            return self.tokenizer.decode(token_ids, **kwargs)
        token_id = token_ids[0]
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self.tokenizer.decode([token_id])
        return text


class ApiKeyMiddleware:
    """`Authorization: Bearer KEY` on every route but the health checks and /metrics (pure ASGI,
    so streaming and disconnect detection are untouched)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            await self.app(scope, receive, send)
            return
        message = "Unauthorized: a valid `Authorization: Bearer <api key>` header is required."
        response = error_for_path(scope["path"], message, 401)
        await response(scope, receive, send)


class RequestGroup:
    """The engine requests of one HTTP call; their outputs arrive on one asyncio queue as (index, output)."""

    def __init__(self, state: ServerState, requests: list[EngineRequest], internal: bool = False) -> None:
        self.state = state
        self.requests = requests
        self.queue: asyncio.Queue[tuple[int, RequestOutput]] = asyncio.Queue()
        self.finished = [False] * len(requests)
        # Internal requests (health checks) stay out of the metrics and the request log, as in the reference.
        self.log_requests = state.args.log_requests and not internal
        with_metrics = state.metrics is not None and not internal
        self.timers = [RequestTimer() for _ in requests] if with_metrics else None
        self.submitted = 0

    def start(self) -> None:
        """Validate every request, then submit them all: a batch runs whole or not at all."""
        engine = self.state.engine
        for request in self.requests:
            try:
                engine.validate_request(request)
            except ValueError as exc:
                raise ProtocolError(str(exc)) from exc
        loop = asyncio.get_running_loop()
        for index, request in enumerate(self.requests):
            if self.timers is not None:
                self.timers[index] = RequestTimer()
            try:
                engine.submit(request, self._callback(loop, index))
            except ValueError as exc:
                self.abort_unfinished()
                raise ProtocolError(str(exc)) from exc
            self.submitted += 1
            self.state.inflight[request.rid] = self
            if self.log_requests:
                logger.info(
                    "Receive: rid=%s kind=%s prompt_tokens=%d text=%s sampling=%s",
                    request.rid,
                    request.kind,
                    len(request.input_ids),
                    _short(request.text),
                    _short(request.sampling_params),
                )

    def _callback(self, loop: asyncio.AbstractEventLoop, index: int) -> Callable[[RequestOutput], None]:
        queue, relay = self.queue, self.state.output_relay(loop)

        def on_output(output: RequestOutput) -> None:  # runs on the engine's thread, not the loop
            relay.put(queue, (index, output))

        return on_output

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Each request's outputs in arrival order, until each has delivered its last one.

        Outputs are cumulative, so of several that wait for one request only the latest is
        handed on (as the reference's tokenizer manager does): a stream that falls behind the
        steps (64 streams a step at batch 64) catches up in one event instead of sending each
        step's.
        """
        while not all(self.finished):
            waiting = [await self.queue.get()]
            while not self.queue.empty():
                waiting.append(self.queue.get_nowait())
            latest = {index: position for position, (index, _) in enumerate(waiting)}
            for position, (index, output) in enumerate(waiting):
                if latest[index] == position and self._take(index, output):
                    yield index, output

    def _take(self, index: int, output: RequestOutput) -> bool:
        """Book an output of request `index` (metrics, its end); False if that request has ended."""
        if self.finished[index]:
            return False
        request = self.requests[index]
        if self.timers is not None and self.state.metrics is not None:
            self.state.metrics.observe(request, self.timers[index], output)
        if output.finished:
            self.finished[index] = True
            self.state.inflight.pop(request.rid, None)
            if self.log_requests:
                logger.info(
                    "Finish: rid=%s finish_reason=%s completion_tokens=%d text=%s",
                    request.rid,
                    output.finish_reason,
                    output.completion_tokens,
                    _short(output.text),
                )
        return True

    def abort_unfinished(self) -> None:
        """Abort what is still running (client gone, server stopping); pages go back to the pool."""
        for index, request in enumerate(self.requests[: self.submitted]):
            if not self.finished[index]:
                self.finished[index] = True
                self.state.inflight.pop(request.rid, None)
                self.state.engine.abort(request.rid)


async def _wait_for_disconnect(request: Request) -> None:
    """Return when the client closes the connection (the body has already been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def collect_outputs(group: RequestGroup, request: Request) -> list[RequestOutput] | None:
    """The final output of every request of the group, or None if the client went away first."""
    finals: list[RequestOutput | None] = [None] * len(group.requests)

    async def consume() -> None:
        async for index, output in group.outputs():
            if output.finished:
                finals[index] = output

    consumer = asyncio.ensure_future(consume())
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not consumer.done():
            return None
        consumer.result()
        return [output for output in finals if output is not None]
    finally:
        watcher.cancel()
        consumer.cancel()
        group.abort_unfinished()


class ServerState:
    """What the routes share: the engine, its model facts, metrics and the in-flight requests."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.args = engine.server_args
        self.tokenizer = engine.tokenizer
        self.token_texts = TokenTextCache(self.tokenizer) if self.tokenizer is not None else None
        self.metrics = ServerMetrics(self.args.served_model_name) if self.args.enable_metrics else None
        self.inflight: dict[str, RequestGroup] = {}
        self.draining = False
        self.version = _version()
        self._relay: OutputRelay | None = None

    def output_relay(self, loop: asyncio.AbstractEventLoop) -> OutputRelay:
        """The relay onto the loop serving the routes (made on first use, inside that loop)."""
        if self._relay is None or self._relay.loop is not loop:
            self._relay = OutputRelay(loop)
        return self._relay

    @property
    def info(self) -> Any:
        return self.engine.model_info

    @property
    def embedding_kind(self) -> RequestKind | None:
        info = self.info
        kind = getattr(info, "embedding_kind", None) or getattr(info, "is_embedding_kind", None)
        return kind if not info.is_generation else None

    @property
    def tokenize(self) -> Callable[[str], list[int]] | None:
        return self.engine.tokenize if self.tokenizer is not None else None

    def start(self, requests: list[EngineRequest]) -> RequestGroup:
        if self.draining:
            raise ProtocolError("The server is shutting down.", status=503)
        group = RequestGroup(self, requests)
        group.start()
        return group

    async def control(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a blocking engine call off the event loop, bounded in time. The engine's
        ValueError (the client's mistake) is a 400; past the time, a 503 (the engine is busy,
        e.g. loading weights): the call itself goes on, and may still take effect."""
        try:
            return await asyncio.wait_for(asyncio.to_thread(fn, *args), CONTROL_TIMEOUT)
        except ProtocolError:
            raise
        except ValueError as exc:
            raise ProtocolError(str(exc)) from exc
        except TimeoutError as exc:
            raise ProtocolError(
                f"The engine did not answer within {CONTROL_TIMEOUT:g} s; the call may still take effect.",
                status=503,
            ) from exc

    def engine_method(self, name: str) -> Callable[..., Any]:
        method = getattr(self.engine, name, None)
        if method is None:
            raise NotImplementedError(f"{name} is not implemented by this engine.")
        return method


def _native(handler: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
    """Errors of a native route: ProtocolError -> its status with `{"error": {"message"}}`."""

    @functools.wraps(handler)
    async def wrapper(request: Request) -> Response:
        try:
            return await handler(request)
        except ProtocolError as exc:
            return native_error(exc.message, exc.status)
        except NotImplementedError as exc:
            return native_error(str(exc) or "Not implemented by this server.", 501)

    return wrapper


def _openai(handler: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
    """Errors of an OpenAI route: the OpenAI error object."""

    @functools.wraps(handler)
    async def wrapper(request: Request) -> Response:
        try:
            return await handler(request)
        except ProtocolError as exc:
            return openai_error(exc.message, exc.status, exc.param)

    return wrapper


def _client_gone() -> Response:
    """Nobody reads this answer; 499 is nginx's code for a closed client connection."""
    return Response(status_code=499)


class GroupEventStream(StreamingResponse):
    """The SSE of a request group, which aborts what is still running however the response
    ends. Not in the events' generator: a client gone before the first event fails the
    response's first send, and the generator, never started, would run no `finally`."""

    def __init__(self, events: AsyncIterator[bytes], group: RequestGroup) -> None:
        super().__init__(events, media_type="text/event-stream")
        self.group = group

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.group.abort_unfinished()


def create_app(engine: Any) -> FastAPI:
    """The HTTP app over a running engine (see NATIVE_API.md for every route's answer)."""
    state = ServerState(engine)
    app = FastAPI(title="sglax", version=state.version)
    app.state.sglax = state
    if state.args.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=state.args.api_key)
    app.add_middleware(
        CORSMiddleware, allow_origins=["*"], allow_credentials=True, allow_methods=["*"], allow_headers=["*"]
    )

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> Response:
        return error_for_path(request.url.path, str(exc), 400)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("Unexpected error on %s", request.url.path)
        return error_for_path(request.url.path, f"Internal server error: {exc}", 500)

    _add_native_routes(app, state)
    _add_control_routes(app, state)
    _add_openai_routes(app, state)
    return app


# ============================================================================ native generation


def _generate_payloads(
    state: ServerState, expanded: ExpandedRequests, outputs: list[RequestOutput]
) -> list[dict[str, Any]]:
    skip = state.tokenizer is None
    return [
        generate_response(request, output, state.token_texts, skip)
        for request, output in zip(expanded.requests, outputs, strict=True)
    ]


def _first_error(outputs: list[RequestOutput]) -> RequestOutput | None:
    """The first output that carries an engine error (its `error_status` says whose fault)."""
    return next((output for output in outputs if output.error), None)


async def _stream_generate(
    state: ServerState, expanded: ExpandedRequests, group: RequestGroup
) -> AsyncIterator[bytes]:
    """SSE of /generate: cumulative events, `index` in a batch, then [DONE] (`GroupEventStream`
    aborts what a disconnect leaves running)."""
    skip = state.tokenizer is None
    async for index, output in group.outputs():
        if output.error:
            yield sse_event({"error": {"message": output.error}})
            continue
        payload = generate_response(expanded.requests[index], output, state.token_texts, skip)
        if not expanded.is_single:
            payload["index"] = index
        yield sse_event(payload)
    yield SSE_DONE


def _add_native_routes(app: FastAPI, state: ServerState) -> None:
    @app.api_route("/generate", methods=["POST", "PUT"])
    @_native
    async def generate(request: Request) -> Response:
        data = protocol.parse_json_body(await request.body())
        if isinstance(data, dict):
            protocol.reject_unsupported(data, protocol.UNSUPPORTED_GENERATE_FIELDS)
        body = protocol.validate_model(protocol.GenerateRequest, data)
        if not state.info.is_generation:
            raise not_generating("/generate")
        expanded = protocol.expand_generate(body, state.tokenize, state.info.vocab_size)
        group = state.start(expanded.requests)
        if expanded.stream:
            return GroupEventStream(_stream_generate(state, expanded, group), group)
        outputs = await collect_outputs(group, request)
        if outputs is None:
            return _client_gone()
        failed = _first_error(outputs)
        if failed is not None:
            return native_error(failed.error, failed.error_status)
        payloads = _generate_payloads(state, expanded, outputs)
        return json_response(payloads[0] if expanded.is_single else payloads)

    async def run_embedding(request: Request) -> Response:
        data = protocol.parse_json_body(await request.body())
        body = protocol.validate_model(protocol.EncodeRequest, data)
        kind = state.embedding_kind
        if kind is None:
            raise ProtocolError(NOT_EMBEDDING_MODEL)
        expanded = protocol.expand_encode(body, kind, state.tokenize, state.info.vocab_size)
        group = state.start(expanded.requests)
        outputs = await collect_outputs(group, request)
        if outputs is None:
            return _client_gone()
        failed = _first_error(outputs)
        if failed is not None:
            return native_error(failed.error, failed.error_status)
        payloads = [embedding_response(output) for output in outputs]
        return json_response(payloads[0] if expanded.is_single else payloads)

    @app.api_route("/encode", methods=["POST", "PUT"])
    @_native
    async def encode(request: Request) -> Response:
        return await run_embedding(request)

    @app.api_route("/classify", methods=["POST", "PUT"])
    @_native
    async def classify(request: Request) -> Response:
        return await run_embedding(request)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=503 if state.draining else 200)

    @app.get("/health_generate")
    async def health_generate() -> Response:
        return Response(status_code=200 if await _health_generate(state) else 503)

    @app.get("/get_model_info")
    async def get_model_info() -> Response:
        info = state.info
        return json_response(
            {
                "model_path": info.model_path,
                "tokenizer_path": info.tokenizer_path,
                "is_generation": info.is_generation,
            }
        )

    @app.get("/get_server_info")
    @_native
    async def get_server_info(request: Request) -> Response:
        internal = await state.control(state.engine.get_server_info)
        return json_response({**state.args.to_dict(), **internal, "version": state.version})

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    @_native
    async def flush_cache(request: Request) -> Response:
        flushed = await state.control(state.engine.flush_cache)
        return Response(FLUSH_CACHE_TEXT, status_code=200 if flushed else 400, media_type="text/plain")

    @app.post("/abort_request")
    @_native
    async def abort_request(request: Request) -> Response:
        body = protocol.validate_model(protocol.AbortRequest, protocol.parse_json_body(await request.body()))
        # Each request's HTTP handler learns of the abort from the engine's final output.
        if body.abort_all:
            state.engine.abort_all()
        elif body.rid:
            # A rid given to an n > 1 or batch request names its samples' rids (`rid_0`, `rid_1`,
            # ...: protocol.expand_rids); aborting it aborts them all (docs/native_api.md).
            for rid in [body.rid, *(r for r in state.inflight if _is_sample_of(r, body.rid))]:
                state.engine.abort(rid)
        else:
            raise ProtocolError("rid is required (or abort_all: true).")
        return Response(status_code=200)


async def _engine_progress(state: ServerState, deadline: float) -> list[tuple[int, bool]] | None:
    """Each engine's (with `--dp-size`, each replica's) count of steps and whether it has work,
    read between two of its steps; None where an engine keeps no count or does not answer
    before `deadline`."""
    stats = getattr(state.engine, "stats", None)
    if stats is None:
        return None
    try:
        call = asyncio.get_running_loop().run_in_executor(_HEALTH_CALLS, stats)
        answer = await asyncio.wait_for(call, max(deadline - time.monotonic(), 0.0))
    except Exception:  # no answer in time, or an engine gone: the check's own request decides
        return None
    engines = answer.get("replicas") or [answer]
    if any(engine.get("num_steps") is None for engine in engines):
        return None
    return [(e["num_steps"], e.get("num_running_reqs", 0) + e.get("num_queue_reqs", 0) > 0) for e in engines]


def _stepped_on(before: list[tuple[int, bool]], now: list[tuple[int, bool]]) -> bool:
    """Whether an engine, and every engine with work, has finished a step begun since `before`
    (two steps later: the loop dispatches a step before it reads the previous one)."""
    stepped = [steps >= was + 2 for (was, _), (steps, _) in zip(before, now, strict=True)]
    return any(stepped) and all(done or not busy for done, (_, busy) in zip(stepped, now, strict=True))


def _is_sample_of(rid: str, parent: str) -> bool:
    """Whether `rid` is one of the rids `protocol.expand_rids` makes from the rid `parent`."""
    return rid.startswith(parent + "_") and rid[len(parent) + 1 :].isdigit()


async def _health_generate(state: ServerState) -> bool:
    """Whether the engine works: one greedy token (or one embedding) through it within
    HEALTH_CHECK_TIMEOUT, or, while that request waits its turn, the engine's steps going on.

    Under load the check's own request queues behind the others (for as long as the running ones
    take, at --max-running-requests), and a load balancer's probe must not evict a server for
    being busy. As the reference answers once any output arrives after the check began, this
    answers once every engine with work (each replica, with `--dp-size`) has finished a step begun
    after it: a replica that hangs keeps the answer from coming."""
    if state.draining:
        return False
    deadline = time.monotonic() + HEALTH_CHECK_TIMEOUT
    before = await _engine_progress(state, deadline)
    kind: RequestKind = state.embedding_kind or "generate"
    request = EngineRequest(
        rid=f"HEALTH_CHECK_{protocol.new_rid()}",
        input_ids=[0],
        sampling_params=SamplingParams(max_new_tokens=1 if kind == "generate" else 0, temperature=0.0),
        kind=kind,
    )
    group = RequestGroup(state, [request], internal=True)
    try:
        group.start()
    except ProtocolError as exc:
        logger.warning("Health check could not start: %s", exc.message)
        return False

    async def first_output() -> RequestOutput:
        async for _, output in group.outputs():
            return output
        raise RuntimeError("no output")

    own = asyncio.ensure_future(first_output())
    try:
        while (remaining := deadline - time.monotonic()) > 0:
            await asyncio.wait({own}, timeout=min(HEALTH_CHECK_POLL_S, remaining))
            if own.done():
                return own.exception() is None and own.result().error is None
            if before is not None:
                now = await _engine_progress(state, deadline)
                if now is not None and _stepped_on(before, now):
                    return True
        logger.warning("Health check failed: no output within %.0f s.", HEALTH_CHECK_TIMEOUT)
        return False
    finally:
        own.cancel()
        group.abort_unfinished()


# ============================================================================ control routes


def _add_control_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/update_weights_from_disk")
    @_native
    async def update_weights_from_disk(request: Request) -> Response:
        body = protocol.validate_model(
            protocol.UpdateWeightsFromDiskRequest, protocol.parse_json_body(await request.body())
        )
        update = state.engine_method("update_weights_from_disk")
        # No timeout here: a large checkpoint may take minutes to read, and the swap must not be abandoned.
        success, message, num_paused = await asyncio.to_thread(update, body.model_path, body.load_format)
        answer = protocol.UpdateWeightsFromDiskResponse(
            success=success, message=message, num_paused_requests=num_paused
        )
        return json_response(answer.model_dump(), 200 if success else 400)

    def text_route(path: str, text: str, method_name: str) -> None:
        @app.api_route(path, methods=["GET", "POST"], name=method_name)
        @_native
        async def route(request: Request) -> Response:
            method = state.engine_method(method_name)
            await state.control(method)
            return Response(text, media_type="text/plain")

    text_route(
        "/start_expert_distribution_record",
        "Start recording the expert distribution.\n",
        "start_expert_distribution_record",
    )
    text_route(
        "/stop_expert_distribution_record",
        "Stop recording the expert distribution.\n",
        "stop_expert_distribution_record",
    )
    text_route(
        "/dump_expert_distribution_record",
        "Dump expert distribution record.\n",
        "dump_expert_distribution_record",
    )
    text_route("/stop_profile", "Stop profiling. This will take some time.\n", "stop_profile")

    @app.api_route("/start_profile", methods=["GET", "POST"])
    @_native
    async def start_profile(request: Request) -> Response:
        data = protocol.parse_json_body(await request.body(), allow_empty=True)
        body = protocol.validate_model(protocol.ProfileRequest, data if data is not None else {})
        method = state.engine_method("start_profile")
        await state.control(method, body.output_dir, body.num_steps)
        return Response("Start profiling.\n", media_type="text/plain")

    @app.get("/metrics")
    @_native
    async def metrics(request: Request) -> Response:
        if state.metrics is None:
            return native_error("Metrics are disabled: launch the server with --enable-metrics.", 404)
        stats = await state.control(state.engine.stats)
        return Response(state.metrics.render(stats), media_type=METRICS_CONTENT_TYPE)


# ============================================================================ OpenAI API


def _require_tokenizer(state: ServerState, what: str) -> Any:
    if state.tokenizer is None:
        raise ProtocolError(f"{what} needs a tokenizer, and this server runs with --skip-tokenizer-init.")
    return state.tokenizer


def _usage_event(response_cls: type, rid: str, created: int, model: str, usage: Any) -> bytes:
    """The final OpenAI stream event that carries only the usage (`stream_options.include_usage`)."""
    event = response_cls(id=rid, created=created, model=model, choices=[], usage=usage)
    return b"data: " + event.model_dump_json().encode() + b"\n\n"


def _usage(
    state: ServerState, outputs: list[RequestOutput | None], n: int, with_completion: bool = True
) -> protocol.UsageInfo:
    """Usage of a call: prompt tokens counted once per prompt, completion tokens per sample.

    `outputs` is in request order `[p0 x n, p1 x n, ...]`; an entry is None for a sample that never finished.
    """
    per_prompt = [
        next((o for o in outputs[start : start + n] if o is not None), None)
        for start in range(0, len(outputs), n)
    ]
    prompt_tokens = sum(o.prompt_tokens for o in per_prompt if o is not None)
    completion_tokens = (
        sum(o.completion_tokens for o in outputs if o is not None) if with_completion else None
    )
    details = None
    if state.args.enable_cache_report:
        details = {"cached_tokens": sum(o.cached_tokens for o in per_prompt if o is not None)}
    return protocol.UsageInfo(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + (completion_tokens or 0),
        prompt_tokens_details=details,
    )


def _openai_requests(
    state: ServerState,
    prompt_ids: list[list[int]],
    texts: list[str | None],
    sampling: dict[str, Any],
    n: int,
    *,
    stream: bool,
    top_logprobs: int | None,
    logprob_start_len: int = -1,
    rid: str | None = None,
) -> list[EngineRequest]:
    """Engine requests `[p0 x n, p1 x n, ...]` of an OpenAI call."""
    params = protocol.parse_openai_sampling(sampling)
    rids = protocol.expand_rids(rid, len(prompt_ids), n)
    requests = []
    for i, ids in enumerate(prompt_ids):
        protocol.check_token_ids("prompt", ids, state.info.vocab_size)
        for j in range(n):
            requests.append(
                EngineRequest(
                    rid=rids[i * n + j],
                    input_ids=list(ids),
                    sampling_params=params.for_sample(j),
                    stream=stream,
                    return_logprob=top_logprobs is not None,
                    logprob_start_len=logprob_start_len,
                    top_logprobs_num=top_logprobs or 0,
                    return_text_in_logprobs=True,
                    text=texts[i],
                )
            )
    return requests


class _TextDeltas:
    """What has been sent of each choice, so a stream sends only the new text and logprobs."""

    def __init__(self, count: int) -> None:
        self.text_len = [0] * count
        self.logprob_len = [0] * count
        self.logprob_text_len = [0] * count  # the text of the logprob tokens sent: their offsets
        self.started = [False] * count

    def text(self, index: int, text: str) -> str:
        sent = self.text_len[index]
        if len(text) <= sent:
            return ""  # a stop string was trimmed from text already sent: nothing more to say
        self.text_len[index] = len(text)
        return text[sent:]

    def logprobs(self, index: int, total: int) -> tuple[int, int]:
        start = self.logprob_len[index]
        self.logprob_len[index] = total
        return start, total


def _completion_logprobs(
    state: ServerState,
    entries: list[tuple[float | None, int]],
    top: list[list[tuple[float, int]] | None],
    text_offset: int,
) -> protocol.CompletionLogprobs:
    """The legacy completions logprobs object for some tokens."""
    decode = state.token_texts
    assert decode is not None
    result = protocol.CompletionLogprobs()
    offset = text_offset
    for position, (logprob, token_id) in enumerate(entries):
        token = decode.decode([token_id])
        result.tokens.append(token)
        result.token_logprobs.append(logprob)
        result.text_offset.append(offset)
        offset += len(token)
        candidates = top[position] if position < len(top) else None
        if not candidates:
            result.top_logprobs.append(None)
            continue
        best = {decode.decode([cid]): clp for clp, cid in candidates}
        if logprob is not None:  # the chosen token too, as OpenAI's: up to logprobs + 1 entries
            best.setdefault(token, logprob)
        result.top_logprobs.append(best)
    return result


def _chat_logprobs(
    state: ServerState,
    entries: list[tuple[float | None, int]],
    top: list[list[tuple[float, int]]],
) -> protocol.ChatLogprobs:
    """The chat logprobs object for some output tokens."""
    decode = state.token_texts
    assert decode is not None

    def top_entry(logprob: float | None, token_id: int) -> protocol.TopLogprob:
        token = decode.decode([token_id])
        return protocol.TopLogprob(token=token, bytes=list(token.encode("utf-8")), logprob=logprob)

    content = []
    for position, (logprob, token_id) in enumerate(entries):
        candidates = top[position] if position < len(top) else []
        chosen = top_entry(logprob, token_id)
        content.append(
            protocol.ChatTokenLogprob(
                **chosen.model_dump(),
                top_logprobs=[top_entry(clp, cid) for clp, cid in candidates or []],
            )
        )
    return protocol.ChatLogprobs(content=content)


def _apply_chat_template(state: ServerState, body: protocol.ChatCompletionRequest) -> tuple[list[int], str]:
    """Prompt ids and text of a chat request, through the tokenizer's (or --chat-template's) template."""
    tokenizer = _require_tokenizer(state, "Chat completion")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ProtocolError("The tokenizer has no chat template: launch the server with --chat-template.")
    messages = body.template_messages()
    kwargs: dict[str, Any] = dict(body.chat_template_kwargs or {})
    if body.tools and body.tool_choice != "none":
        # The template shows them; a call comes back as text unless tool_choice forces calls.
        kwargs["tools"] = body.tools
    continue_final = body.continue_final_message and messages[-1]["role"] == "assistant"
    try:
        prompt = tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=not continue_final,
            continue_final_message=continue_final,
            **kwargs,
        )
    except Exception as exc:  # jinja2 raises TemplateError (and the template itself may raise anything)
        raise ProtocolError(f"Failed to apply the chat template: {exc}", param="messages") from exc
    return list(tokenizer.encode(prompt, add_special_tokens=False)), prompt


def _add_openai_routes(app: FastAPI, state: ServerState) -> None:
    def model_name(requested: str | None) -> str:
        return requested or state.args.served_model_name

    def served_card() -> protocol.ModelCard:
        name = state.args.served_model_name
        return protocol.ModelCard(id=name, root=name, max_model_len=state.info.context_length)

    @app.get("/v1/models")
    async def models() -> Response:
        return json_response(protocol.ModelList(data=[served_card()]).model_dump())

    @app.get("/v1/models/{model:path}")
    async def model_card(model: str) -> Response:
        """One model's card (the SDK's `models.retrieve`); this server serves one model."""
        card = served_card()
        if model != card.id:
            return openai_error(
                f"The model '{model}' does not exist; this server serves '{card.id}'.", 404, "model"
            )
        return json_response(card.model_dump())

    @app.post("/v1/completions")
    @_openai
    async def completions(request: Request) -> Response:
        body = protocol.validate_model(
            protocol.CompletionRequest, protocol.parse_json_body(await request.body())
        )
        body.check_supported()
        if not state.info.is_generation:
            raise not_generating("/v1/completions")
        _require_tokenizer(state, "A completion")
        prompts, _ = protocol.split_openai_prompts(body.prompt)
        prompt_ids: list[list[int]] = []
        texts: list[str | None] = []
        for prompt in prompts:
            if isinstance(prompt, str):
                tokenize = state.tokenize
                if tokenize is None:
                    raise ProtocolError("A text prompt needs a tokenizer: send token ids.", param="prompt")
                prompt_ids.append(tokenize(prompt))
                texts.append(prompt)
            else:
                prompt_ids.append(list(prompt))
                texts.append(None)
            if not prompt_ids[-1]:
                raise ProtocolError("The prompt cannot be empty.", param="prompt")
        echo_logprobs = body.echo and body.logprobs is not None
        requests = _openai_requests(
            state,
            prompt_ids,
            texts,
            body.sampling_dict(body.max_tokens),
            body.n,
            stream=body.stream,
            top_logprobs=body.logprobs,
            logprob_start_len=0 if echo_logprobs else -1,
            rid=body.rid,
        )
        echoes = [
            (text if text is not None else state.tokenizer.decode(ids)) if body.echo else ""
            for text, ids in zip(texts, prompt_ids, strict=True)
        ]
        group = state.start(requests)
        name = model_name(body.model)
        if body.stream:
            return GroupEventStream(_stream_completions(state, body, group, echoes, name), group)
        outputs = await collect_outputs(group, request)
        if outputs is None:
            return _client_gone()
        failed = _first_error(outputs)
        if failed is not None:
            return openai_error(failed.error, failed.error_status)
        choices = []
        for index, output in enumerate(outputs):
            echo = echoes[index // body.n]
            logprobs = None
            if body.logprobs is not None:
                entries = list(output.output_token_logprobs or [])
                top = list(output.output_top_logprobs or [])
                if echo_logprobs:
                    entries = list(output.input_token_logprobs or []) + entries
                    top = list(output.input_top_logprobs or []) + top
                logprobs = _completion_logprobs(state, entries, top, 0)
            choices.append(
                protocol.CompletionChoice(
                    index=index,
                    text=echo + (output.text or ""),
                    logprobs=logprobs,
                    finish_reason=protocol.finish_reason_type(output.finish_reason),
                    matched_stop=protocol.matched_stop(output.finish_reason),
                )
            )
        response = protocol.CompletionResponse(
            id=outputs[0].rid, model=name, choices=choices, usage=_usage(state, list(outputs), body.n)
        )
        return json_response(response.model_dump())

    @app.post("/v1/chat/completions")
    @_openai
    async def chat_completions(request: Request) -> Response:
        body = protocol.validate_model(
            protocol.ChatCompletionRequest, protocol.parse_json_body(await request.body())
        )
        body.check_supported()
        if not state.info.is_generation:
            raise not_generating("/v1/chat/completions")
        prompt_ids, prompt = _apply_chat_template(state, body)
        top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
        requests = _openai_requests(
            state,
            [prompt_ids],
            [prompt],
            body.sampling_dict(body.max_new_tokens()),
            body.n,
            stream=body.stream,
            top_logprobs=top_logprobs,
            rid=body.rid,
        )
        group = state.start(requests)
        name = model_name(body.model)
        if body.stream:
            return GroupEventStream(_stream_chat(state, body, group, name), group)
        outputs = await collect_outputs(group, request)
        if outputs is None:
            return _client_gone()
        failed = _first_error(outputs)
        if failed is not None:
            return openai_error(failed.error, failed.error_status)
        forced = body.forced_tool_schema is not None
        parser = _tool_parser(state, body)
        reasoner = _reasoning_parser(state, body)
        choices = []
        for index, output in enumerate(outputs):
            text, reasoning = output.text or "", None
            if reasoner is not None:
                split = reasoner.split(text)
                text, reasoning = split.content, split.reasoning or None
            content, calls = _tool_calls_in(text, forced, parser)
            message = protocol.ChatMessageOut(content=content, reasoning_content=reasoning, tool_calls=calls)
            logprobs = None
            if body.logprobs:
                entries = list(output.output_token_logprobs or [])
                logprobs = _chat_logprobs(state, entries, list(output.output_top_logprobs or []))
            finish = "tool_calls" if calls else protocol.finish_reason_type(output.finish_reason)
            choices.append(
                protocol.ChatChoice(
                    index=index,
                    message=message,
                    logprobs=logprobs,
                    finish_reason=finish,
                    matched_stop=protocol.matched_stop(output.finish_reason),
                )
            )
        response = protocol.ChatCompletionResponse(
            id=outputs[0].rid, model=name, choices=choices, usage=_usage(state, list(outputs), body.n)
        )
        return json_response(response.model_dump())

    @app.post("/v1/embeddings")
    @_openai
    async def embeddings(request: Request) -> Response:
        body = protocol.validate_model(
            protocol.EmbeddingRequest, protocol.parse_json_body(await request.body())
        )
        kind = state.embedding_kind
        if kind is None:
            raise ProtocolError(NOT_EMBEDDING_MODEL)
        size = state.info.embedding_size
        if body.dimensions is not None and body.dimensions != size:
            # The model's own size is what a client asking for it gets (the reference refuses any
            # `dimensions` on a model not trained to be cut short, Matryoshka-style: none here is).
            raise ProtocolError(
                f"dimensions {body.dimensions} is not supported: this model's embeddings have "
                f"{size} dimensions, and it cannot shorten them.",
                param="dimensions",
            )
        prompts, _ = protocol.split_openai_prompts(body.input, param="input")
        tokenize = state.tokenize
        prompt_ids: list[list[int]] = []
        texts: list[str | None] = []
        for prompt in prompts:
            if isinstance(prompt, str):
                if tokenize is None:
                    raise ProtocolError("A text input needs a tokenizer: send token ids.", param="input")
                prompt_ids.append(tokenize(prompt))
                texts.append(prompt)
            else:
                prompt_ids.append(list(prompt))
                texts.append(None)
        expanded = protocol.embedding_requests(prompt_ids, texts, False, kind, None, state.info.vocab_size)
        group = state.start(expanded.requests)
        outputs = await collect_outputs(group, request)
        if outputs is None:
            return _client_gone()
        failed = _first_error(outputs)
        if failed is not None:
            return openai_error(failed.error, failed.error_status)
        data = []
        for index, output in enumerate(outputs):
            vector = output.embedding or []
            if body.encoding_format == "base64":
                encoded: list[float] | str = base64.b64encode(
                    np.asarray(vector, dtype="<f4").tobytes()
                ).decode()
            else:
                encoded = vector
            data.append(protocol.EmbeddingObject(embedding=encoded, index=index))
        response = protocol.EmbeddingResponse(
            data=data,
            model=model_name(body.model),
            usage=_usage(state, list(outputs), 1, with_completion=False),
        )
        payload = response.model_dump()
        payload["usage"].pop("completion_tokens", None)
        return json_response(payload)


async def _stream_openai(
    state: ServerState,
    body: protocol.CompletionRequest | protocol.ChatCompletionRequest,
    group: RequestGroup,
    name: str,
    response_cls: type,
    choices_for: Callable[[int, RequestOutput], list[Any]],
) -> AsyncIterator[bytes]:
    """The SSE both OpenAI routes share: each output's choices (from `choices_for`) as chunks,
    engine errors as error events (`{"error": {...}}`, as the reference sends them and the openai
    client raises them), the usage chunk when asked, then [DONE] (`GroupEventStream` aborts what
    a client leaving mid-stream leaves running)."""
    finals: list[RequestOutput | None] = [None] * len(group.requests)
    created = int(time.time())
    stream_id = group.requests[0].rid  # one id for every chunk of the stream, as OpenAI's
    async for index, output in group.outputs():
        if output.error:
            yield sse_event({"error": openai_error_body(output.error, output.error_status)})
            continue
        if output.finished:
            finals[index] = output
        options = body.stream_options
        running = _usage(state, [output], 1) if options and options.continuous_usage_stats else None
        for choice in choices_for(index, output):
            message = response_cls(id=stream_id, created=created, model=name, choices=[choice], usage=running)
            yield b"data: " + message.model_dump_json().encode() + b"\n\n"
    if body.stream_options is not None and body.stream_options.include_usage:
        usage = _usage(state, finals, body.n)
        yield _usage_event(response_cls, stream_id, created, name, usage)
    yield SSE_DONE


def _stream_completions(
    state: ServerState,
    body: protocol.CompletionRequest,
    group: RequestGroup,
    echoes: list[str],
    name: str,
) -> AsyncIterator[bytes]:
    """SSE of /v1/completions: text deltas per choice (the echoed prompt first), logprobs as asked."""
    deltas = _TextDeltas(len(group.requests))

    def choices_for(index: int, output: RequestOutput) -> list[protocol.CompletionChoice]:
        prefix = ""
        first = not deltas.started[index]
        if first:
            deltas.started[index] = True
            prefix = echoes[index // body.n]
        text = prefix + deltas.text(index, output.text or "")
        logprobs = None
        if body.logprobs is not None:
            entries = list(output.output_token_logprobs or [])
            start, end = deltas.logprobs(index, len(entries))
            entries, top = entries[start:end], list(output.output_top_logprobs or [])[start:end]
            if first and body.echo:  # the echoed prompt's logprobs lead, as in the whole response
                entries = list(output.input_token_logprobs or []) + entries
                top = list(output.input_top_logprobs or []) + top
            logprobs = _completion_logprobs(state, entries, top, deltas.logprob_text_len[index])
            deltas.logprob_text_len[index] += sum(len(token) for token in logprobs.tokens)
        if not output.finished and not text and (logprobs is None or not logprobs.tokens):
            return []
        finish = output.finish_reason if output.finished else None
        return [
            protocol.CompletionChoice(
                index=index,
                text=text,
                logprobs=logprobs,
                finish_reason=protocol.finish_reason_type(finish),
                matched_stop=protocol.matched_stop(finish),
            )
        ]

    return _stream_openai(state, body, group, name, protocol.CompletionStreamResponse, choices_for)


def _tool_parser(state: ServerState, body: protocol.ChatCompletionRequest) -> Any:
    """The `--tool-call-parser` reading this request's answers: with tools, and tool_choice auto."""
    name = state.args.tool_call_parser
    if name is None or not body.tools or body.tool_choice not in (None, "auto"):
        return None
    return PARSERS[name](body.tool_names)


def _reasoning_parser(state: ServerState, body: protocol.ChatCompletionRequest) -> Any:
    """The `--reasoning-parser` splitting this request's thinking out, unless it asks for none
    (`separate_reasoning: false`)."""
    name = state.args.reasoning_parser
    if name is None or not body.separate_reasoning:
        return None
    # A grammar applies from the answer's first token: a constrained answer does not start inside
    # a thinking section, whatever the template opened.
    return ReasoningParser(REASONING_PARSERS[name] and not body.is_constrained())


def _tool_calls_in(text: str, forced: bool, parser: Any) -> tuple[str | None, list[dict[str, Any]] | None]:
    """A chat answer's content and tool calls: calls forced by tool_choice (`forced_tool_schema`),
    or written in the model's format (`parser`), or none (the whole text is content)."""
    if forced:
        calls = protocol.forced_tool_calls(text)
        return (None, calls) if calls else (text, None)
    parsed = parser.parse_offered(text) if parser is not None else None
    if parsed is None:
        return text, None
    content, pairs = parsed
    return content or None, protocol.openai_tool_calls(pairs)


def _stream_chat(
    state: ServerState, body: protocol.ChatCompletionRequest, group: RequestGroup, name: str
) -> AsyncIterator[bytes]:
    """SSE of /v1/chat/completions: a role chunk per choice, then content deltas, logprobs as asked.
    Tool calls come whole at the answer's end, as one delta with every call: forced ones
    (`forced_tool_schema`; all the text is held back, and sent as text if it was cut short) and
    those a `--tool-call-parser` reads (text is held back from where a call may begin). With a
    `--reasoning-parser`, the thinking goes out as `reasoning_content` deltas first."""
    deltas = _TextDeltas(len(group.requests))
    thinking = _TextDeltas(len(group.requests))
    forced = body.forced_tool_schema is not None
    parser = _tool_parser(state, body)
    reasoner = _reasoning_parser(state, body)

    def choices_for(index: int, output: RequestOutput) -> list[protocol.ChatStreamChoice]:
        choices = []
        if not deltas.started[index]:
            deltas.started[index] = True
            role = protocol.DeltaMessage(role="assistant", content="")
            choices.append(protocol.ChatStreamChoice(index=index, delta=role))
        full = output.text or ""
        reasoning = ""
        if reasoner is not None:
            split = reasoner.split(full, output.finished)
            reasoning, full = thinking.text(index, split.reasoning), split.content
        visible, calls = full, None
        if forced or parser is not None:
            if output.finished:
                calls = _tool_calls_in(full, forced, parser)[1]
            if calls or not output.finished:
                visible = "" if forced else full[: parser.hold_from(full)]
        text = deltas.text(index, visible)
        logprobs = None
        if body.logprobs:
            entries = list(output.output_token_logprobs or [])
            start, end = deltas.logprobs(index, len(entries))
            top = list(output.output_top_logprobs or [])[start:end]
            logprobs = _chat_logprobs(state, entries[start:end], top)
        if not output.finished and not text and not reasoning and (logprobs is None or not logprobs.content):
            return choices
        finish = output.finish_reason if output.finished else None
        tool_calls = [{"index": i, **call} for i, call in enumerate(calls)] if calls else None
        delta = protocol.DeltaMessage(
            content=text or None, reasoning_content=reasoning or None, tool_calls=tool_calls
        )
        choices.append(
            protocol.ChatStreamChoice(
                index=index,
                delta=delta,
                logprobs=logprobs,
                finish_reason="tool_calls" if calls else protocol.finish_reason_type(finish),
                matched_stop=protocol.matched_stop(finish),
            )
        )
        return choices

    return _stream_openai(state, body, group, name, protocol.ChatCompletionStreamResponse, choices_for)
