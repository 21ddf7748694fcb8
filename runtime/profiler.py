"""XLA profiler traces of the serving steps, on demand (/start_profile, /stop_profile).

`jax.profiler` writes a TensorBoard profile-plugin run (`plugins/profile/<run>/*.xplane.pb`
plus a `*.trace.json.gz` that Perfetto opens) under the output directory.
Start and stop run on the scheduler thread between two steps, so a trace
holds whole steps; with `num_steps` the trace stops by itself.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import jax

logger = logging.getLogger(__name__)


def default_profile_dir() -> str:
    return os.environ.get("SGLAX_PROFILE_DIR") or str(Path(tempfile.gettempdir()) / "sglax_profile")


class StepProfiler:
    """At most one trace at a time; counts steps when asked to stop by itself."""

    def __init__(self) -> None:
        self.output_dir: str | None = None
        self.steps_left: int | None = None

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
        self.output_dir, self.steps_left = directory, num_steps
        logger.info("Profiling started: trace goes to %s", directory)
        return directory

    def stop(self) -> str:
        if not self.active:
            raise ValueError("Profiling is not in progress. Call /start_profile first.")
        directory, self.output_dir, self.steps_left = self.output_dir, None, None
        try:
            jax.profiler.stop_trace()
        except Exception as exc:  # the directory went away or turned read-only since the start
            _forget_unwritten_trace()
            raise ValueError(f"The trace could not be written to {directory}: {exc}") from exc
        logger.info("Profiling stopped: trace written under %s", directory)
        return directory

    def step_done(self) -> None:
        """Called after each dispatched step; ends a `num_steps` trace when its count runs out."""
        if self.steps_left is None:
            return
        self.steps_left -= 1
        if self.steps_left <= 0:
            try:
                self.stop()
            except ValueError:  # nobody is waiting on this stop: log it; serving goes on
                logger.exception("Profiling stopped after its steps, but the trace was lost")


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
