"""The background compiler's bookkeeping (runtime/step_programs.py), with a stand-in compile.

The real compile runs in tests/test_engine.py; here a slow or failing function
shows what the queue, the wait and the shutdown do around it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from runtime.batch import StepShape
from runtime.step_programs import StepPrograms

HELD = StepShape(decode=8, prefill_seqs=0, prefill_tokens=0, max_q=0, width=16)


def decode_shape(rows: int, width: int = 16) -> StepShape:
    return StepShape(decode=rows, prefill_seqs=0, prefill_tokens=0, max_q=0, width=width)


def test_a_held_step_borrows_and_its_program_arrives():
    compiled = []
    programs = StepPrograms(lambda shape: compiled.append(shape) or f"program {shape.key}")
    try:
        programs.note_compiled(HELD)
        need = decode_shape(4)
        assert programs.shape_for(need) == HELD
        assert programs.shape_for(need) == HELD  # queued once
        assert programs.wait(timeout=10)
        assert compiled == [need]
        assert programs.shape_for(need) == need and programs.programs(need) == "program (4, 4, 16, 4, 0)"
        assert programs.shape_for(decode_shape(2)) == need  # the cheapest holder
        assert programs.shape_for(decode_shape(1)) == decode_shape(1)  # 4x its tokens: compiles inline
    finally:
        programs.close()


def test_a_failed_background_compile_leaves_the_shape_to_compile_inline():
    def fail(shape: StepShape) -> None:
        raise RuntimeError("no")

    programs = StepPrograms(fail)
    try:
        programs.note_compiled(HELD)
        need = decode_shape(4)
        assert programs.shape_for(need) == HELD
        assert programs.wait(timeout=10)
        assert programs.shape_for(need) == need and programs.programs(need) is None
    finally:
        programs.close()


def test_close_drops_the_queue_and_finishes_the_compile_in_flight():
    started, finished = threading.Event(), []

    def slow(shape: StepShape) -> str:
        started.set()
        time.sleep(0.3)
        finished.append(shape)
        return "program"

    programs = StepPrograms(slow)
    programs.note_compiled(decode_shape(64, width=32))
    for rows in range(33, 64):  # 31 shapes queued, 9 s of compiling
        programs.shape_for(decode_shape(rows, width=32))
    assert started.wait(10)
    began = time.monotonic()
    programs.close()
    assert time.monotonic() - began < 2
    assert len(finished) == 1
    assert programs.wait(timeout=1)  # closed: nothing left to wait for
    programs.close()  # a second close is harmless
    assert programs.shape_for(decode_shape(40, width=32)) == decode_shape(40, width=32)


def test_wait_gives_up_at_its_timeout():
    release = threading.Event()
    programs = StepPrograms(lambda shape: release.wait(10))
    try:
        programs.note_compiled(HELD)
        programs.shape_for(decode_shape(4))
        assert not programs.wait(timeout=0.2)
        release.set()
        assert programs.wait(timeout=10)
    finally:
        programs.close()


def test_disabled_never_borrows():
    programs = StepPrograms(lambda shape: "program", enabled=False)
    try:
        programs.note_compiled(HELD)
        assert programs.shape_for(decode_shape(4)) == decode_shape(4)
    finally:
        programs.close()


def test_a_shape_compiled_inline_has_its_companions_compiled_here():
    """What a step may run after an inline-compiled forward (the samplers of its row count)
    compiles on this thread; the wait and the pending count include it, and a failure is logged."""
    release, done = threading.Event(), []

    def companions(shape: StepShape) -> None:
        release.wait(10)
        if shape == decode_shape(2):
            raise RuntimeError("no")
        done.append((shape, threading.current_thread().name))

    programs = StepPrograms(lambda shape: None, compile_companions=companions)
    try:
        programs.note_compiled(HELD)
        assert programs.num_pending == 0  # until its step has run its own sampler
        programs.compile_companions_of(HELD)
        programs.compile_companions_of(decode_shape(2))
        assert programs.num_pending == 2 and not programs.wait(timeout=0.1)
        release.set()
        assert programs.wait(timeout=10) and programs.num_pending == 0
        assert done == [(HELD, "step-compiler")]
    finally:
        programs.close()


class HeldCompile:
    """A stand-in compile that holds until released: `started` once it runs, `compiled` after."""

    def __init__(self) -> None:
        self.started, self.release = threading.Event(), threading.Event()
        self.compiled: list[StepShape] = []

    def __call__(self, shape: StepShape) -> str:
        self.started.set()
        self.release.wait(10)
        self.compiled.append(shape)
        return f"program {shape.key}"


@contextlib.contextmanager
def held_programs() -> Iterator[tuple[HeldCompile, StepPrograms]]:
    """A `StepPrograms` whose compiles hold until released; released and closed at the end."""
    held = HeldCompile()
    programs = StepPrograms(held)
    try:
        yield held, programs
    finally:
        held.release.set()
        programs.close()


def test_a_prepared_shape_is_waited_for_not_compiled_twice():
    """A shape asked for ahead (`prepare`) that a step needs while this thread compiles it, with
    nothing compiled to hold it: the step waits for it and runs its programs."""
    with held_programs() as (held, programs):
        wider = decode_shape(4, width=24)
        programs.prepare(wider)
        programs.prepare(wider)  # queued once
        assert programs.num_pending == 1 and held.started.wait(10)
        threading.Timer(0.3, held.release.set).start()
        began = time.monotonic()
        assert programs.shape_for(wider) == wider
        assert time.monotonic() - began >= 0.25
        assert programs.programs(wider) == "program (4, 4, 24, 4, 0)" and held.compiled == [wider]
        programs.prepare(wider)  # compiled: nothing to do
        programs.note_compiled(HELD)
        programs.prepare(HELD)
        assert programs.wait(timeout=1) and held.compiled == [wider]


def test_a_prepared_shape_still_queued_compiles_inline_and_leaves_the_queue():
    """Waiting for a shape queued behind others could take several compiles: it compiles inline
    (one), and this thread then skips it."""
    with held_programs() as (held, programs):
        first, behind = decode_shape(64, width=24), decode_shape(2, width=24)
        programs.prepare(first)
        programs.prepare(behind)
        assert held.started.wait(10)
        began = time.monotonic()
        assert programs.shape_for(behind) == behind  # no wait: the caller compiles it
        assert time.monotonic() - began < 0.2
        programs.note_compiled(behind)
        held.release.set()
        assert programs.wait(timeout=10) and held.compiled == [first]


def test_shapes_asked_for_ahead_compile_before_those_of_steps_that_borrowed():
    """A borrowing step has a program that runs it; a shape asked for ahead has none yet, and its
    first step would compile inline if it were still queued: it goes first."""
    with held_programs() as (held, programs):
        busy, borrowed, ahead = decode_shape(64, width=24), decode_shape(4), decode_shape(64, width=28)
        programs.prepare(busy)
        assert held.started.wait(10)
        programs.note_compiled(HELD)
        assert programs.shape_for(borrowed) == HELD
        programs.prepare(ahead)
        held.release.set()
        assert programs.wait(timeout=10)
        assert held.compiled == [busy, ahead, borrowed]


def test_jobs_aside_run_in_order_and_close_drops_the_queued_ones():
    ran: list[str] = []
    with held_programs() as (held, programs):
        programs.prepare(decode_shape(2))
        assert held.started.wait(10)
        programs.compile_aside("a job", lambda: ran.append("first"))
        programs.compile_aside("another", lambda: ran.append("second"))
        assert programs.num_pending == 3 and not programs.wait(timeout=0.1)
        held.release.set()
        assert programs.wait(timeout=10) and ran == ["first", "second"] and programs.num_pending == 0
        held.release.clear()
        held.started.clear()
        programs.prepare(decode_shape(4))
        assert held.started.wait(10)
        programs.compile_aside("queued at close", lambda: ran.append("dropped"))
        threading.Timer(1.0, held.release.set).start()  # the compile in flight ends after close drains
        programs.close()
        programs.compile_aside("after close", lambda: ran.append("late"))
        assert ran == ["first", "second"] and programs.num_pending == 0


def test_close_wakes_a_step_waiting_for_a_prepared_shape():
    with held_programs() as (held, programs):
        programs.prepare(decode_shape(2))  # in flight until released
        assert held.started.wait(10)
        threading.Timer(0.3, programs.close).start()
        threading.Timer(0.6, held.release.set).start()
        began = time.monotonic()
        assert programs.shape_for(decode_shape(2)) == decode_shape(2)
        assert 0.25 <= time.monotonic() - began < 0.55  # woken by close, before the compile ends
