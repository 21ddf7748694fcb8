"""XLA profiler traces of the serving steps, on demand (/start_profile, /stop_profile).

`jax.profiler` writes a TensorBoard profile-plugin run (`plugins/profile/<run>/*.xplane.pb`
plus a `*.trace.json.gz` that Perfetto opens) under the output directory.
Start and stop run on the scheduler thread between two steps, so a trace
holds whole steps; with `num_steps` the trace stops by itself. A trace is held
in host memory until it is written (1.5-2 MB a decode step of SmolLM2 on a
CPU), so one left running would take the server down: it is stopped and written
once it has used a fifth of the host memory that was free when it started
(writing one took 2.4 times its size again: a 4.2 GB trace, 10 GB more while
written), and the memory goes back to the system after the write.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import jax

from runtime.host_memory import host_available_bytes, release_freed_memory
from runtime.paths import NOT_PROFILING, default_profile_dir

logger = logging.getLogger(__name__)

# Steps between two looks at the host's free memory while a trace runs (reading it takes ~20 us).
MEMORY_CHECK_STEPS = 32


class StepProfiler:
    """At most one trace at a time; counts steps when asked to stop by itself."""

    def __init__(self) -> None:
        self.output_dir: str | None = None
        self.steps_left: int | None = None
        self.steps_traced = 0
        self.memory_floor = 0  # bytes: the trace stops when the host has less free
        self.stopped_for_memory: str | None = None  # where the last trace so stopped was written

    @property
    def active(self) -> bool:
        return self.output_dir is not None

    def start(self, output_dir: str | None, num_steps: int | None) -> str:
        if self.active:
            raise ValueError("Profiling is already in progress. Call /stop_profile first.")
        if num_steps is not None and num_steps < 1:
            raise ValueError(f"num_steps must be at least 1, got {num_steps}.")
        directory = output_dir or default_profile_dir()
        try:
            Path(directory).mkdir(parents=True, exist_ok=True)
            # jax writes only at stop_trace: an existing directory that takes no files (read-only,
            # /proc) must fail here, as the client's mistake, not at the stop.
            with tempfile.TemporaryFile(dir=directory):
                pass
        except OSError as exc:  # a file in the way, no permission: the client's path, a 400
            raise ValueError(f"Cannot write a trace to {directory}: {exc.strerror or exc}.") from exc
        jax.profiler.start_trace(directory, create_perfetto_trace=True)
        self.output_dir, self.steps_left, self.steps_traced = directory, num_steps, 0
        self.stopped_for_memory = None
        self.memory_floor = host_available_bytes() * 4 // 5
        logger.info("Profiling started: trace goes to %s", directory)
        return directory

    def stop(self) -> str:
        if not self.active:
            message = f"{NOT_PROFILING} Call /start_profile first."
            if self.stopped_for_memory:
                message += (
                    " The last trace stopped by itself when it held a fifth of the host memory free at its"
                    f" start; it is written under {self.stopped_for_memory}."
                )
            raise ValueError(message)
        directory, self.output_dir, self.steps_left = self.output_dir, None, None
        try:
            jax.profiler.stop_trace()
        except Exception as exc:  # the directory went away or turned read-only since the start
            _forget_unwritten_trace()
            raise ValueError(f"The trace could not be written to {directory}: {exc}") from exc
        finally:
            release_freed_memory()  # the trace and its export's copies, gigabytes on a long trace
        logger.info("Profiling stopped: trace written under %s", directory)
        return directory

    def step_done(self) -> None:
        """Called after each dispatched step; ends a `num_steps` trace when its count runs out,
        and any trace once the host's free memory falls below `memory_floor`."""
        if not self.active:
            return
        self.steps_traced += 1
        if self.steps_left is not None:
            self.steps_left -= 1
            if self.steps_left <= 0:
                self._stop_unattended("after its steps")
                return
        if self.steps_traced % MEMORY_CHECK_STEPS == 0 and host_available_bytes() < self.memory_floor:
            logger.warning(
                "Profiling stopped after %d steps: the trace held a fifth of the host memory free "
                "when it started",
                self.steps_traced,
            )
            self.stopped_for_memory = self._stop_unattended("for lack of memory")

    def _stop_unattended(self, why: str) -> str | None:
        """Stop with nobody waiting on the answer: the trace's directory, or None when the trace
        was lost (logged; serving goes on)."""
        try:
            return self.stop()
        except ValueError:
            logger.exception("Profiling stopped %s, but the trace was lost", why)
            return None


def _forget_unwritten_trace() -> None:
    """End jax's trace after its export failed.

    `jax.profiler.stop_trace` forgets its session only after writing it, so a failed write
    would refuse every later `start_trace` ("Profile has already been started"). jax has no
    public call for this (0.10 and 0.11 alike).
    """
    try:
        from jax._src import profiler as jax_profiler

        jax_profiler._profile_state.reset()
    except Exception:  # a jax without it: later traces may be refused, serving goes on
        logger.exception("jax's profiler state could not be reset")
