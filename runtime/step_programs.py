"""Steps of a shape with no program yet: borrow a compiled one that holds them, compile theirs aside.

Which steps meet which shapes depends on how requests arrive, so a serving run
keeps meeting shapes its warm-up did not compile. Compiling inline stalls every
running request (0.5-2.5 s a program on the 2-core box and on an H200; an H200
serving run met two in its measured pass and its TTFT was 4.2 s); a step padded
to a larger compiled program costs a little more on that step alone. So a step
whose shape a compiled program holds (`batch.borrowable_shape`) runs padded to
it, while its own programs compile on this module's thread and serve the next
step of that shape. A step that nothing compiled holds runs the part of its
rows that a compiled program holds, if any (the scheduler's choice:
`has_program`), while its own shape compiles here; else it compiles inline.
On a CPU a step borrows a program at most MAX_BORROW_FACTOR larger (the padding
costs it compute); elsewhere any larger one (a step there takes milliseconds).

Some shapes can be seen coming: a decode batch's contexts grow into the next
page-table width. The scheduler asks for those ahead (`prepare`), and they
compile before the queued shapes of steps that borrowed (those have a program
that runs them; an H200's first burst queued five such shapes ahead of the next
widths, whose steps then compiled inline); so do the shapes of steps that run
split meanwhile. A step whose shape is compiling here when it arrives, with no
part that a program holds, waits for it rather than compiling it a second time
inline; one whose shape is still queued compiles inline, and the queue then
skips it.
"""

from __future__ import annotations

import atexit
import dataclasses
import itertools
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from runtime.batch import MAX_BORROW_FACTOR, StepShape, borrowable_shape

logger = logging.getLogger(__name__)

# The queue's tiers, first served first: a stop, shapes asked for ahead, everything else.
_STOP, _AHEAD, _LATER = range(3)


class StepPrograms:
    """Which compiled shapes exist, and the thread that compiles the missing ones.

    `compile_shape(shape)` lowers and compiles a shape's programs from their
    shapes alone and returns them; `programs(shape)` hands them back to the
    runner once they are ready.
    """

    def __init__(
        self,
        compile_shape: Callable[[StepShape], Any],
        enabled: bool = True,
        compile_companions: Callable[[StepShape], None] | None = None,
        max_borrow_factor: float | None = MAX_BORROW_FACTOR,
    ) -> None:
        """`compile_companions(shape)`, when given, compiles here what a step of `shape` may run
        after its forward (the samplers of its row count), for shapes whose forward compiled
        inline (`compile_companions_of`). `max_borrow_factor`: how much larger a borrowed
        program may be (None: any larger)."""
        self.enabled = enabled
        self.max_borrow_factor = max_borrow_factor
        self._compile_shape = compile_shape
        self._compile_companions = compile_companions
        self._lock = threading.Lock()
        self._compiled_here = threading.Condition(self._lock)  # a queued shape compiled or failed
        self._compiled: set[StepShape] = set()  # inline (the jit cache) or here
        self._programs: dict[StepShape, Any] = {}
        self._queued: set[StepShape] = set()
        self._compiling: StepShape | None = None  # the shape this thread compiles now
        self._failed: set[StepShape] = set()
        self._jobs_pending = 0  # `compile_aside` jobs queued or running
        # (tier, order of arrival, item): a shape to compile, a job (`compile_aside`) or None (stop);
        # FIFO within a tier
        self._queue: queue.PriorityQueue[tuple[int, int, StepShape | _Job | None]] = queue.PriorityQueue()
        self._arrivals = itertools.count()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="step-compiler", daemon=True)
        self._thread.start()
        # A daemon thread killed inside an XLA compile at exit aborts the process: finish it first.
        atexit.register(_close_at_exit, weakref.ref(self))

    def shape_for(self, need: StepShape) -> StepShape:
        """The shape to pad a step to: its own when compiled or when nothing compiled holds it,
        else the cheapest compiled shape that holds it, while its own compiles here. A shape
        that nothing compiled holds and that this thread is compiling now (`prepare`) is waited
        for: its compile started first, and compiling it inline as well would only slow both."""
        with self._lock:
            if not self.enabled or self._closed or need in self._compiled or need in self._failed:
                return need
            borrowed = borrowable_shape(need, self._compiled, self.max_borrow_factor)
            if borrowed is None:
                if need == self._compiling:
                    self._wait_for(need)
                return need
            first = need not in self._queued
            if first:
                self._queued.add(need)
                self._put(_LATER, need)
        if first:
            logger.info(
                "Step %s runs on the compiled %s while its own programs compile", need.key, borrowed.key
            )
        return borrowed

    def _wait_for(self, need: StepShape) -> None:
        """Under the lock: wait until `need` is compiled here, its compile failed or this thread
        stopped."""
        started = time.monotonic()
        while not (
            need in self._compiled or need in self._failed or self._closed or not self._thread.is_alive()
        ):
            self._compiled_here.wait(timeout=1.0)
        logger.info(
            "Step %s waited %.2f s for its programs compiling aside", need.key, time.monotonic() - started
        )

    def has_program(self, need: StepShape) -> bool:
        """Whether a step of `need` runs without compiling inline: its shape is compiled, or a
        compiled one holds it (`shape_for`). Also true where this thread compiles nothing (steps
        then compile inline anyway: disabled, closed or its thread gone) and for a shape whose
        compile here failed."""
        with self._lock:
            if not self.enabled or self._closed or not self._thread.is_alive():
                return True
            if need in self._compiled or need in self._failed:
                return True
            return borrowable_shape(need, self._compiled, self.max_borrow_factor) is not None

    def is_compiled(self, shape: StepShape) -> bool:
        with self._lock:
            return shape in self._compiled

    def prepare(self, shape: StepShape) -> None:
        """Compile `shape`'s programs here before the queued shapes of steps that borrowed, unless
        compiled or queued: a step about to need it, or one running split until it is ready."""
        with self._lock:
            known = shape in self._compiled or shape in self._queued or shape in self._failed
            if not self.enabled or self._closed or known:
                return
            self._queued.add(shape)
            self._put(_AHEAD, shape)
        logger.info("Compiling step %s ahead of its first step", shape.key)

    def note_compiled(self, shape: StepShape) -> None:
        """A step of `shape` compiled inline."""
        with self._lock:
            self._compiled.add(shape)

    def compile_companions_of(self, shape: StepShape) -> None:
        """Compile here the companions of a shape that compiled inline, once its step has run the
        ones it takes itself (compiled inline too, not twice)."""
        compile_companions = self._compile_companions
        if compile_companions is not None:
            self.compile_aside(f"the samplers of step {shape.key}", lambda: compile_companions(shape))

    def compile_aside(self, what: str, job: Callable[[], None]) -> None:
        """Run `job` on this thread, after the shapes queued before it: work a later step would
        otherwise do inline (programs compiled from their shapes; llguidance's view of the
        tokenizer). `wait` waits for it too. A failure is logged: that work is then done inline
        when first needed, where an error reaches the requests."""
        with self._lock:
            if self._closed:
                return
            self._jobs_pending += 1
        self._put(_LATER, _Job(what, job))

    def _put(self, tier: int, item: StepShape | _Job | None) -> None:
        self._queue.put((tier, next(self._arrivals), item))

    def add(self, shape: StepShape, programs: Any) -> None:
        """Programs for `shape` compiled elsewhere (by the warm-up), to serve its steps."""
        with self._lock:
            self._programs[shape] = programs
            self._compiled.add(shape)
            self._compiled_here.notify_all()

    def programs(self, shape: StepShape) -> Any:
        """The programs compiled here for `shape`, or None."""
        return self._programs.get(shape)

    @property
    def num_compiled_here(self) -> int:
        return len(self._programs)

    @property
    def num_pending(self) -> int:
        """Shapes queued here whose programs are not compiled (nor failed) yet, and jobs not run."""
        with self._lock:
            return len(self._queued - self._compiled - self._failed) + self._jobs_pending

    def _loop(self) -> None:
        while True:
            _, _, item = self._queue.get()
            if item is None:  # close
                return
            if isinstance(item, _Job):
                self._run(item)
                continue
            shape = item
            with self._lock:
                if shape in self._compiled:  # a step compiled it inline while it was queued
                    continue
                self._compiling = shape
            started = time.monotonic()
            try:
                programs = self._compile_shape(shape)
            except Exception:  # its steps then compile inline, where the error reaches the requests
                logger.exception("Background compile of step %s failed; it will compile inline", shape.key)
                with self._lock:
                    self._failed.add(shape)
                    self._compiling = None
                    self._compiled_here.notify_all()
                continue
            self.add(shape, programs)  # before `_compiling` clears: a step then finds it compiled
            with self._lock:
                self._compiling = None
            logger.info("Compiled step %s in the background in %.1f s", shape.key, time.monotonic() - started)

    def _run(self, job: _Job) -> None:
        started = time.monotonic()
        try:
            job.run()
            logger.info("Made %s in the background in %.1f s", job.what, time.monotonic() - started)
        except Exception:
            logger.exception("Making %s in the background failed", job.what)
        finally:
            with self._lock:
                self._jobs_pending -= 1

    def wait(self, timeout: float = 600.0) -> bool:
        """Block until every queued shape is compiled (or failed) and every job has run; False if
        `timeout` passed first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if (
                    self._closed
                    or not self._thread.is_alive()
                    or (self._queued <= self._compiled | self._failed and not self._jobs_pending)
                ):
                    return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        """Drop what is queued, let a compile in flight finish (it cannot be interrupted), stop."""
        with self._lock:
            first, self._closed = not self._closed, True
            self._compiled_here.notify_all()
        if first:
            while True:
                try:
                    _, _, item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, _Job):
                    with self._lock:
                        self._jobs_pending -= 1
            self._put(_STOP, None)
        if threading.current_thread() is not self._thread:  # a second caller (atexit) waits too
            self._thread.join()


@dataclasses.dataclass(frozen=True)
class _Job:
    """Work queued by `compile_aside`, described for the log."""

    what: str
    run: Callable[[], None]


def _close_at_exit(ref: weakref.ReferenceType[StepPrograms]) -> None:
    programs = ref()
    if programs is not None:
        programs.close()
