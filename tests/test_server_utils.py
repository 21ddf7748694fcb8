"""The notebook helpers: reference launch lines map to ours, process trees end, waits time out."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from server.utils import find_free_port, server_argv, terminate_process, wait_for_server


@pytest.mark.parametrize(
    "command",
    [
        "python3 -m sglang.launch_server --model-path /m --host 0.0.0.0",
        "python -m sglang.launch_server --model-path /m --host 0.0.0.0",
        "python -m server.launch_server --model-path /m --host 0.0.0.0",
        "python3 -m sglang.launch_server \\\n --model-path /m \\\n --host 0.0.0.0",
    ],
)
def test_reference_launch_lines_run_our_server(command: str) -> None:
    assert server_argv(command) == [
        sys.executable,
        "-m",
        "server.launch_server",
        "--model-path",
        "/m",
        "--host",
        "0.0.0.0",
    ]


def test_other_commands_run_as_given() -> None:
    assert server_argv("echo 'a b'") == ["echo", "a b"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0): check its state.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_terminate_process_ends_the_tree(tmp_path) -> None:
    child_pid_file = tmp_path / "child.pid"
    script = (
        "import subprocess, sys, time, signal\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"  # the leader ignores SIGTERM: SIGKILL must follow
        f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(child_pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(60)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    deadline = time.monotonic() + 20
    while not child_pid_file.exists() or not child_pid_file.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child_pid = int(child_pid_file.read_text())
    start = time.monotonic()
    terminate_process(process, timeout=1.0)
    assert process.poll() is not None
    assert time.monotonic() - start < 10
    deadline = time.monotonic() + 5
    while _alive(child_pid):
        assert time.monotonic() < deadline, "child survived"
        time.sleep(0.05)


def test_wait_for_server_times_out() -> None:
    port = find_free_port("127.0.0.1")
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        wait_for_server(f"http://127.0.0.1:{port}", timeout=1.5)
    assert time.monotonic() - start < 10


def test_wait_for_server_notices_a_dead_process() -> None:
    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    process.wait()
    with pytest.raises(RuntimeError, match="code 3"):
        wait_for_server("http://127.0.0.1:9", timeout=30, process=process)


def test_the_server_process_takes_short_gil_slices() -> None:
    """The server's scheduler thread and event loop share the GIL: `main` shortens its slices
    before anything else (launch_server.GIL_SWITCH_INTERVAL_S)."""
    from server import launch_server

    before = sys.getswitchinterval()
    try:
        with pytest.raises(SystemExit):
            launch_server.main(["--help"])
        assert sys.getswitchinterval() == pytest.approx(launch_server.GIL_SWITCH_INTERVAL_S)
        assert launch_server.GIL_SWITCH_INTERVAL_S < before
    finally:
        sys.setswitchinterval(before)
