"""Issue 8, profiling: /start_profile and /stop_profile on a real server write jax.profiler traces.

A trace is a TensorBoard profile-plugin run (`plugins/profile/<run>/<host>.xplane.pb`)
plus `<host>.trace.json.gz` (Chrome trace format, which Perfetto opens); the test
opens the JSON trace and finds the serving step, `ModelRunner._forward_fn`, in it.
docs/profiling.md says how to look at a trace.
"""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import fixture_spec as spec
from tests.conftest import fixture_path
from tests.server_helpers import ServerProcess, generate_ids, start_server, wait_idle

STEP_FUNCTION = "_forward_fn"
TRACE_WAIT = 60
START_TEXT = "Start profiling.\n"
STOP_TEXT = "Stop profiling. This will take some time.\n"
PROMPT = [101, 2048, 4096, 777, 31000]


@pytest.fixture(scope="module")
def default_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the server traces when /start_profile names no output_dir (SGLAX_PROFILE_DIR)."""
    return tmp_path_factory.mktemp("default-profile-dir")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, default_dir: Path) -> Iterator[ServerProcess]:
    running = start_server(
        fixture_path(spec.TINY_LLAMA),
        log_dir=tmp_path_factory.mktemp("profile-log"),
        env={"SGLAX_PROFILE_DIR": str(default_dir)},
    )
    try:
        generate_ids(running, PROMPT, 4)  # compile outside the traces
        yield running
    finally:
        running.stop()


def trace_files(directory: Path) -> list[Path]:
    return sorted(
        p for pattern in ("*.xplane.pb", "*.trace.json.gz") for p in directory.rglob(pattern) if p.is_file()
    )


def wait_for_trace(directory: Path) -> Path:
    """The `*.trace.json.gz` under `directory`, once it and its xplane.pb are written."""
    deadline = time.monotonic() + TRACE_WAIT
    while True:
        found = trace_files(directory)
        jsons = [p for p in found if p.name.endswith(".trace.json.gz")]
        planes = [p for p in found if p.name.endswith(".xplane.pb")]
        if jsons and planes and all(p.stat().st_size > 0 for p in found):
            assert len(jsons) == 1, f"one trace expected under {directory}, found {jsons}"
            assert planes[0].parent == jsons[0].parent, found
            # TensorBoard's profile plugin layout: <logdir>/plugins/profile/<run>/.
            assert (
                jsons[0].parent.parent.name == "profile" and jsons[0].parent.parent.parent.name == "plugins"
            )
            return jsons[0]
        assert time.monotonic() < deadline, (
            f"no trace under {directory} after {TRACE_WAIT} s: {sorted(directory.rglob('*'))}"
        )
        time.sleep(0.2)


def read_trace(path: Path) -> list[dict[str, Any]]:
    with gzip.open(path, "rt") as handle:
        trace = json.load(handle)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e for e in events if isinstance(e, dict)]


def step_spans(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Outermost complete events of the step function (JAX nests a same-named span inside)."""
    spans = sorted(
        (e for e in events if e.get("ph") == "X" and STEP_FUNCTION in str(e.get("name", ""))),
        key=lambda e: (e["tid"], e["ts"], -e["dur"]),
    )
    outer: list[dict[str, Any]] = []
    for span in spans:
        last = outer[-1] if outer else None
        if last and last["tid"] == span["tid"] and span["ts"] + span["dur"] <= last["ts"] + last["dur"]:
            continue
        outer.append(span)
    return outer


def start(server: ServerProcess, body: dict[str, Any] | None) -> Any:
    return server.post("/start_profile", body)


def test_profile_num_steps_stops_by_itself(server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "trace"
    num_steps = 3
    wait_idle(server)
    # As the reference's profiler client sends it: the number as text.
    r = start(server, {"output_dir": str(out), "num_steps": str(num_steps)})
    assert r.status_code == 200 and r.text == START_TEXT, r.text
    # Starting twice is a clear 400, and changes nothing of the running trace.
    again = start(server, {"output_dir": str(tmp_path / "other"), "num_steps": 5})
    assert again.status_code == 400, again.text
    assert "already in progress" in again.json()["error"]["message"], again.text
    # A few requests: more steps than num_steps (prefill, then decodes).
    for _ in range(2):
        ids, _ = generate_ids(server, PROMPT, 6)
        assert len(ids) == 6
    trace = wait_for_trace(out)
    assert not (tmp_path / "other").exists()
    spans = step_spans(read_trace(trace))
    assert spans, f"{STEP_FUNCTION} not in {trace}"
    assert len(spans) == num_steps, f"{len(spans)} steps traced, num_steps={num_steps}: {spans}"
    # The xplane (what TensorBoard reads) names the step function too.
    plane = next(trace.parent.glob("*.xplane.pb"))
    assert STEP_FUNCTION.encode() in plane.read_bytes()
    # The trace ended by itself: there is nothing to stop, and a new one can start.
    r = server.post("/stop_profile")
    assert r.status_code == 400 and "not in progress" in r.json()["error"]["message"], r.text


def test_profile_manual_start_and_stop(server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "manual"
    wait_idle(server)
    r = start(server, {"output_dir": str(out)})
    assert r.status_code == 200 and r.text == START_TEXT, r.text
    assert start(server, {"output_dir": str(out)}).status_code == 400
    ids, _ = generate_ids(server, PROMPT, 5)
    assert len(ids) == 5
    time.sleep(0.5)
    assert not trace_files(out), "without num_steps the trace waits for /stop_profile"
    r = server.get("/stop_profile")
    assert r.status_code == 200 and r.text == STOP_TEXT, r.text
    trace = wait_for_trace(out)
    spans = step_spans(read_trace(trace))
    assert len(spans) >= 5, f"5 tokens need a prefill and 4 decodes; traced {len(spans)} steps"
    # The profiler is free again.
    r = server.post("/stop_profile")
    assert r.status_code == 400, r.text


def test_profile_without_a_body_uses_the_default_dir(server: ServerProcess, default_dir: Path) -> None:
    """GET /start_profile with no body, as the reference's scripts call it."""
    wait_idle(server)
    before = set(trace_files(default_dir))
    r = server.get("/start_profile")
    assert r.status_code == 200 and r.text == START_TEXT, r.text
    generate_ids(server, PROMPT, 2)
    r = server.get("/stop_profile")
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + TRACE_WAIT
    while not (set(trace_files(default_dir)) - before) and time.monotonic() < deadline:
        time.sleep(0.2)
    new = sorted(set(trace_files(default_dir)) - before)
    assert any(p.name.endswith(".trace.json.gz") for p in new), new
    trace = next(p for p in new if p.name.endswith(".trace.json.gz"))
    assert step_spans(read_trace(trace))


def test_profile_bad_num_steps(server: ServerProcess, tmp_path: Path) -> None:
    r = start(server, {"output_dir": str(tmp_path), "num_steps": 0})
    assert r.status_code == 400 and "num_steps" in r.json()["error"]["message"], r.text
    r = start(server, {"output_dir": str(tmp_path), "num_steps": "many"})
    assert r.status_code in (400, 422) and "num_steps" in r.text, r.text
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    r = start(server, {"output_dir": str(blocker)})
    assert r.status_code == 400 and "Cannot write a trace" in r.json()["error"]["message"], r.text
    # Nothing started.
    assert server.post("/stop_profile").status_code == 400


def test_profile_dir_that_takes_no_files(server: ServerProcess, tmp_path: Path) -> None:
    """jax writes only when a trace stops. An existing folder that takes no files is refused at
    the start; a folder that goes away mid-trace loses that trace, with a 400 from /stop_profile
    (or a log line when `num_steps` ends it), and serving and profiling go on."""
    if Path("/proc").is_dir():  # exists, and refuses new files even to root
        r = start(server, {"output_dir": "/proc"})
        assert r.status_code == 400 and "Cannot write a trace to /proc" in r.json()["error"]["message"], (
            r.text
        )
        assert server.post("/stop_profile").status_code == 400  # nothing started
    for num_steps in (None, 1):
        out = tmp_path / f"gone-{num_steps}"
        body: dict[str, Any] = {"output_dir": str(out)}
        if num_steps is not None:
            body["num_steps"] = num_steps
        assert start(server, body).status_code == 200
        out.rmdir()
        out.write_text("a file where the trace's folder was")
        if num_steps is None:
            r = server.post("/stop_profile")
            assert r.status_code == 400 and "could not be written" in r.json()["error"]["message"], r.text
        ids, _ = generate_ids(server, PROMPT, 3)  # with num_steps, its first step ends the trace
        assert len(ids) == 3
    again = tmp_path / "again"
    assert start(server, {"output_dir": str(again), "num_steps": 2}).status_code == 200
    generate_ids(server, PROMPT, 3)
    assert step_spans(read_trace(wait_for_trace(again)))


def test_a_trace_left_running_stops_when_it_has_taken_a_fifth_of_the_free_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trace is held in memory until written: one nobody stops is written and ended once the
    host's free memory falls below 4/5 of what it was at the start (the host's figure is
    simulated here; a real run took a 24 GB box to its last gigabyte)."""
    import jax.numpy as jnp

    from runtime import profiler as profiler_module

    free = [10 << 30]
    monkeypatch.setattr(profiler_module, "host_available_bytes", lambda: free[0])
    step_profiler = profiler_module.StepProfiler()
    out = tmp_path / "left-running"
    step_profiler.start(str(out), num_steps=None)
    assert step_profiler.memory_floor == 8 << 30
    x = jnp.ones((64, 64))
    for step in range(1, 3 * profiler_module.MEMORY_CHECK_STEPS + 1):
        (x @ x).block_until_ready()
        if step == profiler_module.MEMORY_CHECK_STEPS + 1:
            free[0] = (8 << 30) - 1  # the trace has grown: just under the floor
        step_profiler.step_done()
        # Checked every MEMORY_CHECK_STEPS steps: it stops at the first check after the fall.
        assert step_profiler.active == (step < 2 * profiler_module.MEMORY_CHECK_STEPS), step
    wait_for_trace(out)
    with pytest.raises(ValueError, match=f"stopped by itself .* written under {out}"):
        step_profiler.stop()  # the client's /stop_profile says what became of its trace
    step_profiler.start(str(tmp_path / "next"), num_steps=1)  # a new trace can start
    step_profiler.step_done()
    assert not step_profiler.active
