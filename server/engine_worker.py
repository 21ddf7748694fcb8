"""The engine's process: an `Engine` served over one pipe to the HTTP process.

Why a process of its own: the scheduler thread's host work sits between two
device steps, and in one process it shares the GIL with the event loop, which
writes every stream's event of every step (64 a step at batch 64). On a GPU the
served batch-64 step took about twice the bare one, and the event loop's share
of that is what this split removes (docs/benchmarks.md). Here the scheduler's
process does nothing else; a step's outputs cross the pipe in one message or a
few (the sender takes what has arrived when it wakes), and the HTTP process
does the HTTP.

The pipe carries tuples whose first item says what they are:
- to the engine: (SUBMIT, EngineRequest), (ABORT, rid), (ABORT_ALL,),
  (CALL, call_id, method name, args), (SHUTDOWN,);
- from the engine: (READY, server_args, RequestLimits) or (FAILED, message, expected),
  then (OUTPUTS, [OutputDelta, ...]) (runtime/output_deltas.py) and
  (REPLY, call_id, ok, value or (type name, message)).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from runtime.io_struct import EngineRequest
from runtime.output_deltas import OutputDelta
from runtime.server_args import ServerArgs

logger = logging.getLogger("sglax.engine_worker")

ORPHAN_POLL_S = 0.5

SUBMIT, ABORT, ABORT_ALL, CALL, SHUTDOWN = "submit", "abort", "abort_all", "call", "shutdown"
READY, FAILED, OUTPUTS, REPLY = "ready", "failed", "outputs", "reply"
# The engine methods the HTTP process may call; each answers between two steps or, for a
# weight update, after the running requests have finished.
CONTROL_METHODS = frozenset(
    {
        "flush_cache",
        "stats",
        "get_server_info",
        "start_expert_distribution_record",
        "stop_expert_distribution_record",
        "dump_expert_distribution_record",
        "take_expert_histogram",
        "start_profile",
        "stop_profile",
        "update_weights_from_disk",
    }
)


def run_engine_worker(
    conn: Connection, server_args: ServerArgs, parent_pid: int, visible_devices: str | None = None
) -> None:
    """The engine process's entry point: build the engine, then serve the pipe until told to stop.

    `parent_pid` is the HTTP process's id, passed in: the parent may die before this starts.
    `visible_devices`: the GPUs this engine may use (`CUDA_VISIBLE_DEVICES`, set before JAX
    starts), for one replica of several (`--dp-size`)."""
    if visible_devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible_devices
    from server.launch_server import GIL_SWITCH_INTERVAL_S, configure_logging

    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    configure_logging(server_args.log_level)
    # The HTTP process owns the signals: it drains on SIGTERM or Ctrl-C (a terminal's Ctrl-C, or a
    # signal to the process group, reaches this process too), then stops this one through the pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    started = threading.Event()
    watch = threading.Thread(target=_exit_if_orphaned, args=(parent_pid, started), name="orphan-watch")
    watch.daemon = True
    watch.start()
    from runtime.engine import Engine

    try:
        engine = Engine(server_args)
    except (ValueError, FileNotFoundError) as exc:  # a wrong path or an unservable model
        conn.send((FAILED, str(exc), True))
        _leave_the_other_nodes(server_args)
        return
    except Exception as exc:
        logger.exception("The engine failed to start")
        conn.send((FAILED, f"{type(exc).__name__}: {exc}", False))
        _leave_the_other_nodes(server_args)
        return
    finally:
        started.set()
    EngineWorker(engine, conn).serve()


def _leave_the_other_nodes(server_args: ServerArgs) -> None:
    """Node 0 of several that failed to start exits at once: JAX's exit would wait for the other
    nodes, which wait for this one (`runtime/multi_node.py`)."""
    if server_args.nnodes > 1:
        from runtime import multi_node

        multi_node.abandon(1)


def _exit_if_orphaned(parent_pid: int, started: threading.Event) -> None:
    """While the engine loads (minutes, maybe, holding a GPU), nothing reads the pipe: if the HTTP
    process dies meanwhile, exit rather than load on for nobody. Once serving, the pipe's end says it."""
    while os.getppid() == parent_pid:
        if started.wait(ORPHAN_POLL_S):
            return
    os._exit(1)


class EngineWorker:
    """Reads the HTTP process's messages on the main thread; a sender thread returns the outputs."""

    def __init__(self, engine: Any, conn: Connection) -> None:
        self.engine = engine
        self.conn = conn
        self._send_lock = threading.Lock()
        self._outbox: list[OutputDelta] = []
        self._outbox_changed = threading.Condition()
        self._closed = False
        self._sender = threading.Thread(target=self._send_outputs, name="sglax-output-sender", daemon=True)
        self.exit_process: Callable[[int], Any] = os._exit  # no cleanup to wait for: the outputs are sent

    def serve(self) -> None:
        self._sender.start()
        scheduler = getattr(self.engine, "scheduler", None)
        if scheduler is not None:
            threading.Thread(
                target=self.exit_after_crash, args=(scheduler.failed,), name="crash-watch", daemon=True
            ).start()
        self._send((READY, self.engine.server_args, self.engine.request_limits))
        try:
            while True:
                try:
                    message = self.conn.recv()
                except (EOFError, OSError):  # the HTTP process is gone: stop with it
                    logger.warning("The HTTP process closed the pipe; stopping the engine.")
                    break
                kind = message[0]
                if kind == SUBMIT:
                    self._submit(message[1])
                elif kind == ABORT:
                    self.engine.abort(message[1])
                elif kind == ABORT_ALL:
                    self.engine.abort_all()
                elif kind == CALL:
                    # On a thread: a call may wait long (a weight update waits for the running
                    # requests), and submits and aborts must still get through meanwhile.
                    threading.Thread(target=self._call, args=message[1:], daemon=True).start()
                elif kind == SHUTDOWN:
                    break
        finally:
            try:
                self.engine.shutdown()
            finally:
                self._close_outbox()

    def exit_after_crash(self, failed: threading.Event) -> None:
        """Once the scheduler has crashed (a bug, a device out of memory), send the outputs that
        answer the requests it held, then end this process: the HTTP process sees the pipe
        close and stops the server with an error, as the reference's does, for a supervisor to
        restart, instead of serving on with every request failing and /health saying 200."""
        failed.wait()
        logger.error("The scheduler crashed; stopping the engine process (see the traceback above).")
        self._close_outbox()
        self.exit_process(1)

    def _submit(self, request: EngineRequest) -> None:
        try:
            # Outputs as deltas, and the text the HTTP process can make left to it.
            self.engine.submit(request, self._queue_output, deltas=True, detokenize=False)
        except ValueError as exc:
            # Its id is in flight here. The HTTP side refuses ids it has in flight, and it forgets
            # one only after its final output, so this cannot happen; an output for this id would
            # end the other request's stream there.
            logger.error("Request %s dropped: %s", request.rid, exc)

    def _call(self, call_id: int, name: str, args: tuple) -> None:
        try:
            if name not in CONTROL_METHODS:
                raise NotImplementedError(f"{name} is not an engine control method.")
            reply = (REPLY, call_id, True, getattr(self.engine, name)(*args))
        except Exception as exc:
            reply = (REPLY, call_id, False, (type(exc).__name__, str(exc)))
        try:
            self._send(reply)
        except Exception as exc:  # a value that does not pickle: the caller must not wait forever
            self._send((REPLY, call_id, False, ("RuntimeError", f"{name}'s answer cannot be sent: {exc}")))

    # -- outputs: what arrived since the last send, in one message ---------------------------------

    def _queue_output(self, delta: OutputDelta) -> None:
        """On the scheduler thread: keep the output; wake the sender if it is not already awake."""
        with self._outbox_changed:
            self._outbox.append(delta)
            if len(self._outbox) == 1:
                self._outbox_changed.notify()

    def _send_outputs(self) -> None:
        while True:
            with self._outbox_changed:
                while not self._outbox and not self._closed:
                    self._outbox_changed.wait()
                batch, self._outbox = self._outbox, []
            if batch:
                try:
                    self._send((OUTPUTS, batch))
                except Exception:  # an output that does not pickle (a bug): keep serving the rest
                    logger.exception("Outputs of %d requests could not be sent", len(batch))
            elif self._closed:
                return

    def _close_outbox(self) -> None:
        """Send what the sender has not sent yet, then stop it."""
        with self._outbox_changed:
            self._closed = True
            self._outbox_changed.notify()
        self._sender.join(timeout=10)

    def _send(self, message: tuple) -> None:
        try:
            with self._send_lock:
                self.conn.send(message)
        except (BrokenPipeError, OSError):  # the HTTP process is gone; the main loop sees it too
            pass
