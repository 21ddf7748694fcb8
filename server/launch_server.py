"""`python -m server.launch_server --model-path PATH [flags]`: start the engine's process, serve HTTP.

The engine (model, scheduler) runs in a process of its own (server/engine_worker.py);
this one tokenizes, checks requests and does the HTTP.

Readiness is announced (`The server is fired up and ready to roll!`, the line
SGLang's tooling waits for) only after one real request has gone through the
whole HTTP stack, so the first client does not pay for compilation. SIGTERM or
Ctrl-C drains: the listening socket closes (new connections are refused), running
requests may finish for up to SGLAX_DRAIN_TIMEOUT seconds, then the rest are
aborted and the engine stops.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import orjson
import uvicorn

from runtime.server_args import ServerArgs, make_parser

logger = logging.getLogger("sglax.launch_server")

READY_MESSAGE = "The server is fired up and ready to roll!"
DRAIN_TIMEOUT = float(os.environ.get("SGLAX_DRAIN_TIMEOUT", "30"))
ABORT_GRACE = 5  # seconds after the drain for aborted requests' last events to reach their clients
WARMUP_TIMEOUT = float(os.environ.get("SGLAX_WARMUP_TIMEOUT", "600"))
# How long a thread may hold the GIL while another waits (CPython's default is 5 ms), in both
# processes: the engine's scheduler thread shares it with the output sender, the event loop with
# the engine client's reader. Measured when the scheduler and the event loop shared one process:
# serving a tiny model at batch 64 on the 2-core box (host-bound, as a GPU's loop is), five
# alternating pairs: 7167 -> 10306 output tok/s on average (4 of 5 pairs better); a CPU-bound
# SmolLM2 run: 376 / 371 tok/s, unchanged.
GIL_SWITCH_INTERVAL_S = 0.0005
LOG_FORMAT = "[%(asctime)s] %(levelname)s %(name)s: %(message)s"
LOG_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def configure_logging(level: str) -> None:
    """Timestamped lines for our loggers and uvicorn's alike (uvicorn's own config is turned off)."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, datefmt=LOG_DATE_FORMAT, force=True)


class DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the app to refuse new work as soon as an exit signal arrives."""

    def __init__(self, config: uvicorn.Config, on_exit: Any) -> None:
        super().__init__(config)
        self._on_exit = on_exit
        self.warmup_failed = False

    def base_url(self, server_args: ServerArgs) -> str:
        """The URL to reach this server, with the real port when --port 0 let the OS pick one."""
        if server_args.port != 0 or not self.servers:
            return server_args.url
        port = self.servers[0].sockets[0].getsockname()[1]
        host = "127.0.0.1" if server_args.host in ("0.0.0.0", "") else server_args.host
        return f"http://{host}:{port}"

    def handle_exit(self, sig: int, frame: Any) -> None:
        if not self.should_exit:
            logger.info("Received signal %d: draining (up to %.0f s), then exiting.", sig, DRAIN_TIMEOUT)
            self._on_exit()
        super().handle_exit(sig, frame)


def _warmup_request(server_args: ServerArgs, is_generation: bool) -> tuple[str, dict[str, Any]]:
    """The route and body of the warm-up request: a short generation, or one embedding."""
    if is_generation:
        body: dict[str, Any] = {"sampling_params": {"temperature": 0, "max_new_tokens": 8}}
        route = "/generate"
    else:
        body = {}
        route = "/encode"
    if server_args.skip_tokenizer_init:
        body["input_ids"] = [10, 11, 12]
    else:
        body["text"] = "The capital city of France is"
    if server_args.context_length is not None and server_args.context_length < 64:
        body.pop("text", None)  # a tiny context still takes one token in and one out
        body["input_ids"] = [10]
        body.get("sampling_params", {})["max_new_tokens"] = 1
    return route, body


def _post(url: str, body: dict[str, Any], api_key: str | None, timeout: float) -> None:
    """POST JSON with the standard library (the runtime does not depend on `requests`)."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=orjson.dumps(body), headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        response.read()


def _announce_when_ready(server: DrainingServer, server_args: ServerArgs, is_generation: bool) -> None:
    """Wait for uvicorn to listen, warm up through HTTP, then log the readiness line."""
    while not server.started:
        if server.should_exit:
            return
        time.sleep(0.05)
    if server_args.warmup:
        route, body = _warmup_request(server_args, is_generation)
        start = time.perf_counter()
        try:
            _post(server.base_url(server_args) + route, body, server_args.api_key, WARMUP_TIMEOUT)
        except (urllib.error.URLError, OSError) as exc:  # HTTPError (a non-2xx answer) is a URLError
            logger.error("Warm-up request to %s failed: %s. Shutting down.", route, exc)
            server.warmup_failed = True
            server.should_exit = True
            return
        logger.info("Warm-up done in %.2f s.", time.perf_counter() - start)
    logger.info(READY_MESSAGE)


def _defer_signals_to_exit() -> None:
    """Make SIGTERM/SIGINT harmless outside uvicorn's own handlers.

    uvicorn re-raises the signal it drained on once it returns; with the default
    handlers that would kill the process before the engine is shut down.
    """
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: logger.info("Signal %d received while stopping.", signum))


def _address_in_use(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port, or None if it can, or if only uvicorn can
    tell. Every address the host resolves to is tried, as asyncio binds them: with SO_REUSEADDR
    (a port in TIME_WAIT counts as free), IPv6 sockets IPv6-only. Port 0 picks a free one."""
    if port == 0:
        return None
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return None
    for family, kind, proto, _, address in addresses:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return exc.strerror
    return None


def run_follower(server_args: ServerArgs) -> int:
    """Node N > 0 of several (`--nnodes`): no HTTP server here; this node's share of the model runs
    node 0's steps (`runtime/multi_node.py`) until node 0 stops."""
    from runtime import multi_node
    from runtime.engine import Engine

    try:
        engine = Engine(server_args)
        logger.info("Node %d is following node 0 (%s).", server_args.node_rank, server_args.dist_init_addr)
        engine.follow()
    except (ValueError, FileNotFoundError, TimeoutError) as exc:
        logger.error("Node %d cannot serve %s: %s", server_args.node_rank, server_args.model_path, exc)
        multi_node.abandon(1)
    except Exception:
        logger.exception("Node %d failed", server_args.node_rank)
        multi_node.abandon(1)
    logger.info("Node 0 stopped; node %d stops too.", server_args.node_rank)
    return 0


def run_server(server_args: ServerArgs) -> int:
    """Serve until a signal (or the engine process's death); returns the process exit code."""
    from server.app import create_app
    from server.engine_client import EngineClient, EngineStartError
    from server.replicas import EngineReplicas

    server: DrainingServer | None = None
    engine_died = threading.Event()

    def on_engine_exit() -> None:
        engine_died.set()
        if server is not None:
            server.should_exit = True

    taken = _address_in_use(server_args.host, server_args.port)
    if taken is not None:  # said before the model loads for a minute, not after
        logger.error("Cannot serve on %s:%d: %s", server_args.host, server_args.port, taken)
        return 1
    try:
        replicas = EngineReplicas if server_args.dp_size > 1 else EngineClient
        engine = replicas(server_args, on_exit=on_engine_exit)
    except EngineStartError as exc:
        if exc.expected:  # a wrong path or an unservable model: say so plainly
            logger.error("Cannot serve %s: %s", server_args.model_path, exc)
        else:
            logger.error("The engine failed to start: %s", exc)
        return 1
    try:
        app = create_app(engine)
        state = app.state.sglax

        def begin_drain() -> None:
            state.draining = True
            # What still runs when the drain ends is aborted, so every client gets a final event.
            aborter = threading.Timer(DRAIN_TIMEOUT, engine.abort_all)
            aborter.daemon = True
            aborter.start()

        config = uvicorn.Config(
            app,
            host=server_args.host,
            port=server_args.port,
            log_level=server_args.log_level,
            log_config=None,
            timeout_keep_alive=5,
            timeout_graceful_shutdown=math.ceil(DRAIN_TIMEOUT) + ABORT_GRACE,
        )
        server = DrainingServer(config, begin_drain)
        if engine_died.is_set():
            return 1
        announcer = threading.Thread(
            target=_announce_when_ready,
            args=(server, server_args, bool(engine.model_info.is_generation)),
            name="warmup",
            daemon=True,
        )
        announcer.start()
        _defer_signals_to_exit()
        server.run()
        return 1 if server.warmup_failed or engine_died.is_set() else 0
    finally:
        engine.shutdown()
        logger.info("Engine stopped.")


def main(argv: list[str] | None = None) -> None:
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    parser = make_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        server_args = ServerArgs.from_cli_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        code = (run_follower if server_args.node_rank > 0 else run_server)(server_args)
    except KeyboardInterrupt:  # Ctrl-C before serving began (uvicorn handles it afterwards)
        logger.info("Interrupted while starting; the engine process was stopped.")
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
