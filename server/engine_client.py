"""The HTTP process's handle on an engine that runs in a process of its own.

It offers the app what `Engine` does (validate, submit with a callback, abort,
the control calls) over the pipe `server/engine_worker.py` serves. Requests are
checked here, against the engine's `RequestLimits`, so a bad one costs no round
trip. A reader thread hands each arriving batch of outputs to the requests'
callbacks and each reply to the control call that waits for it. If the engine
process dies, every request in flight ends with an error and `on_exit` runs.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import multiprocessing
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runtime.detokenizer import StreamedText, scheduler_needs_text
from runtime.io_struct import EngineRequest, OutputCallback, RequestOutput, failed_output
from runtime.output_deltas import DeltaDecoder, OutputDelta
from runtime.paths import path_exists
from runtime.request_checks import check_not_in_flight, check_request
from runtime.server_args import ServerArgs
from runtime.tokenizer import load_tokenizer, tokenize
from server.engine_worker import (
    ABORT,
    ABORT_ALL,
    CALL,
    FAILED,
    OUTPUTS,
    REPLY,
    SHUTDOWN,
    SUBMIT,
    run_engine_worker,
)

logger = logging.getLogger("sglax.engine_client")

SHUTDOWN_TIMEOUT = 60  # seconds for the engine process to stop before it is killed
# Exceptions a control call may raise that keep their type across the pipe (the routes map them
# to a 400 or a 501); anything else arrives as a RuntimeError.
KEPT_EXCEPTIONS: dict[str, type[Exception]] = {
    "ValueError": ValueError,
    "NotImplementedError": NotImplementedError,
}


class EngineStartError(RuntimeError):
    """The engine process could not start; `expected` when the model or its path is at fault."""

    def __init__(self, message: str, expected: bool) -> None:
        super().__init__(message)
        self.expected = expected


def _drop_output(output: RequestOutput) -> None:
    """Where the outputs of a request that already failed on this side go."""


class EngineClient:
    """`Engine`'s serving API, answered by an engine process it starts and stops."""

    def __init__(
        self,
        server_args: ServerArgs,
        on_exit: Callable[[], None] | None = None,
        visible_devices: str | None = None,
    ) -> None:
        """`visible_devices`: the GPUs the engine process may use (`CUDA_VISIBLE_DEVICES`), for
        one replica of several (server/replicas.py); None: all the host's."""
        context = multiprocessing.get_context("spawn")  # a forked JAX runtime is not safe to use
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(
            target=run_engine_worker,
            args=(child_conn, server_args, os.getpid(), visible_devices),
            name="sglax-engine",
        )
        self._process.start()
        logger.info("Engine process %d started.", self._process.pid)
        child_conn.close()  # so that the engine's death reads as the end of the pipe here
        try:
            message = self._start(server_args)
        except BaseException:  # Ctrl-C included: the engine process must not outlive the start
            self._process.kill()
            self._process.join()
            self._conn.close()
            raise
        _, self.server_args, self.request_limits = message
        self.model_info = self.request_limits.model_info
        self.error: str | None = None
        self._on_exit = on_exit
        self._lock = threading.Lock()  # guards the two tables below and the pipe's sending end
        # each request in flight: itself, its callback, and its text where this side makes it
        self._callbacks: dict[str, tuple[EngineRequest, OutputCallback, StreamedText | None]] = {}
        self._calls: dict[int, concurrent.futures.Future] = {}
        self._call_ids = itertools.count()
        self._deltas = DeltaDecoder()  # the reader thread's alone
        self._closing = False
        self._reader = threading.Thread(target=self._read, name="sglax-engine-reader", daemon=True)
        self._reader.start()

    def _start(self, server_args: ServerArgs) -> tuple:
        """Load the tokenizer while the engine process loads the model; its READY message."""
        if not path_exists(server_args.model_path):  # said plainly, before any tokenizer error
            raise EngineStartError(f"model path {server_args.model_path} does not exist", True)
        try:
            self.tokenizer = load_tokenizer(server_args)
        except Exception as exc:
            raise EngineStartError(f"cannot load the tokenizer: {exc}", True) from exc
        try:
            message = self._conn.recv()
        except EOFError:
            self._process.join()
            raise EngineStartError(
                f"the engine process exited (code {self._process.exitcode})", False
            ) from None
        if message[0] == FAILED:
            self._process.join()
            raise EngineStartError(message[1], message[2])
        return message

    # -- requests --------------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        return tokenize(self.tokenizer, text)

    def validate_request(self, req: EngineRequest) -> None:
        check_request(req, self.request_limits)
        check_not_in_flight(req.rid, self._callbacks)

    def submit(self, req: EngineRequest, callback: OutputCallback) -> None:
        """Queue a validated request; `callback` runs on the reader thread for each output."""
        text = None
        if (
            self.tokenizer is not None
            and req.kind == "generate"
            and not scheduler_needs_text(req.sampling_params)
        ):
            text = StreamedText(self.tokenizer, req.sampling_params)  # the engine leaves it to this side
        with self._lock:
            check_not_in_flight(req.rid, self._callbacks)
            self._callbacks[req.rid] = (req, callback, text)
            if self._send_locked((SUBMIT, req)):
                return
            del self._callbacks[req.rid]
        callback(failed_output(req, self.error or "The engine process exited.", reason="engine failed"))

    def abort(self, rid: str) -> None:
        self._send((ABORT, rid))

    def abort_all(self) -> None:
        self._send((ABORT_ALL,))

    # -- control calls (blocking: the app runs them off its event loop) ----------------------------

    def flush_cache(self) -> bool:
        return self._call("flush_cache")

    def stats(self) -> dict[str, Any]:
        return self._call("stats")

    def get_server_info(self) -> dict[str, Any]:
        return self._call("get_server_info")

    def start_expert_distribution_record(self) -> None:
        self._call("start_expert_distribution_record")

    def stop_expert_distribution_record(self) -> None:
        self._call("stop_expert_distribution_record")

    def dump_expert_distribution_record(self, directory: str | Path = ".") -> str:
        return self._call("dump_expert_distribution_record", str(directory))

    def take_expert_histogram(self) -> Any:
        return self._call("take_expert_histogram")

    @property
    def num_in_flight(self) -> int:
        """Requests submitted whose final output has not arrived."""
        with self._lock:
            return len(self._callbacks)

    def start_profile(self, output_dir: str | None = None, num_steps: int | None = None) -> str:
        return self._call("start_profile", output_dir, num_steps)

    def stop_profile(self) -> str:
        return self._call("stop_profile")

    def update_weights_from_disk(
        self, model_path: str, load_format: str | None = None
    ) -> tuple[bool, str, int]:
        success, message, paused = self._call("update_weights_from_disk", model_path, load_format)
        if success:  # the engine's copies changed there; keep this side's in step
            self.model_info.model_path = model_path
            self.server_args.model_path = model_path
        return success, message, paused

    def _call(self, name: str, *args: Any) -> Any:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            call_id = next(self._call_ids)
            self._calls[call_id] = future
            sent = self._send_locked((CALL, call_id, name, args))
            if not sent:
                self._calls.pop(call_id, None)
                raise RuntimeError(self.error or "The engine process is gone.")
        return future.result()

    # -- the pipe ----------------------------------------------------------------------------------

    def _send(self, message: tuple) -> None:
        with self._lock:
            self._send_locked(message)

    def _send_locked(self, message: tuple) -> bool:
        """Send unless the engine is gone (then False); the caller holds the lock."""
        if self.error is not None:
            return False
        try:
            self._conn.send(message)
        except OSError:  # the engine died; the reader is about to find out
            return False
        return True

    def _read(self) -> None:
        """Deliver outputs and replies until the pipe closes (or holds what cannot be read)."""
        try:
            while True:
                message = self._conn.recv()
                if message[0] == OUTPUTS:
                    self._deliver(message[1])
                elif message[0] == REPLY:
                    self._answer(*message[1:])
        except (EOFError, OSError):
            pass
        except Exception:  # a message that does not unpickle: nothing after it can be trusted
            logger.exception("Unreadable message from the engine process; stopping it.")
            self._process.kill()
        self._engine_gone()

    def _deliver(self, deltas: list[OutputDelta]) -> None:
        outputs = [self._deltas.decode(delta) for delta in deltas]
        with self._lock:
            owners = [
                self._callbacks.pop(o.rid, None) if o.finished else self._callbacks.get(o.rid)
                for o in outputs
            ]
        failed: set[str] = set()  # a message may hold several outputs of one request
        for output, owner in zip(outputs, owners, strict=True):
            if owner is None or output.rid in failed:
                continue
            request, callback, text = owner
            if text is not None:
                try:
                    output.text = text.text_of(output.output_ids, output.finished, output.finish_reason)
                except Exception as exc:  # this request fails alone; the engine and the rest go on
                    logger.exception("Cannot make the text of request %s", output.rid)
                    self._fail_one(request, callback, output.finished, f"Cannot detokenize the output: {exc}")
                    failed.add(output.rid)
                    continue
            self._run_callback(callback, output)

    def _fail_one(self, request: EngineRequest, callback: OutputCallback, ended: bool, error: str) -> None:
        """End one request with `error` for its client, and abort it in the engine unless it ended
        there. Its id stays in flight until the engine's final output (the engine refuses an id it
        still runs), and its outputs until then go nowhere."""
        self._run_callback(callback, failed_output(request, error))
        if not ended:
            with self._lock:
                if request.rid in self._callbacks:
                    self._callbacks[request.rid] = (request, _drop_output, None)
            self._send((ABORT, request.rid))

    @staticmethod
    def _run_callback(callback: OutputCallback, output: RequestOutput) -> None:
        try:
            callback(output)
        except Exception:  # one request's handler must not stop every other request's outputs
            logger.exception("Output callback of request %s failed", output.rid)

    def _answer(self, call_id: int, ok: bool, value: Any) -> None:
        with self._lock:
            future = self._calls.pop(call_id, None)
        if future is None:
            return
        if ok:
            future.set_result(value)
        else:
            type_name, message = value
            future.set_exception(KEPT_EXCEPTIONS.get(type_name, RuntimeError)(message))

    def _engine_gone(self) -> None:
        """The pipe closed: end every request and call in flight with an error, once."""
        with self._lock:
            closing = self._closing
            self.error = "The engine process exited."
            callbacks, self._callbacks = self._callbacks, {}
            calls, self._calls = self._calls, {}
        self._process.join(timeout=SHUTDOWN_TIMEOUT)  # only this thread joins it
        error = f"The engine process exited (code {self._process.exitcode})."
        self.error = error
        if not closing:
            logger.error("%s Requests in flight end with an error.", error)
        for request, callback, _ in callbacks.values():
            self._run_callback(callback, failed_output(request, error, reason="engine failed"))
        for future in calls.values():
            future.set_exception(RuntimeError(error))
        if not closing and self._on_exit is not None:
            self._on_exit()

    def shutdown(self) -> None:
        """Stop the engine process (it finishes its current step first) and wait for it."""
        with self._lock:
            self._closing = True
            self._send_locked((SHUTDOWN,))
        self._reader.join(timeout=SHUTDOWN_TIMEOUT)  # it ends once the engine process has exited
        if self._reader.is_alive():
            logger.warning("The engine process did not stop in %d s; killing it.", SHUTDOWN_TIMEOUT)
            self._process.kill()
            self._reader.join()
