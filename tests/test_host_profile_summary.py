"""scripts/host_profile_summary.py on a py-spy raw recording written here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

RECORDING = """\
thread (1): MainThread;run (app.py:10);send (h.py:3) 30
thread (1): MainThread;run (app.py:10);encode (app.py:20) 10
thread (2): sglax-scheduler;loop (s.py:1);process (s.py:9);output (s.py:40) 45
thread (2): sglax-scheduler;loop (s.py:1);process (s.py:9) 5
thread (2): sglax-scheduler;loop (s.py:1);schedule (s.py:5) 10
not a stack line
"""


def test_summary_shares_by_thread_inclusive_and_self(tmp_path):
    path = tmp_path / "host.txt"
    path.write_text(RECORDING)
    result = subprocess.run(
        [sys.executable, "scripts/host_profile_summary.py", str(path), "--top", "3"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    lines = [line.split() for line in result.stdout.splitlines()]
    assert result.stdout.startswith("100 samples")
    assert "sglax-scheduler: 60 samples (60%)" in result.stdout
    assert "MainThread: 40 samples (40%)" in result.stdout
    assert ["50", "83%", "process"] in lines  # inclusive: the output it calls counts too
    assert ["5", "8%", "process"] in lines  # self: its own frame only
    assert ["30", "75%", "send"] in lines


def test_lines_keep_each_call_site_apart(tmp_path):
    path = tmp_path / "host.txt"
    path.write_text(RECORDING)
    result = subprocess.run(
        [sys.executable, "scripts/host_profile_summary.py", str(path), "--lines"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    lines = [line.split(maxsplit=2) for line in result.stdout.splitlines()]
    assert ["50", "83%", "process (s.py:9)"] in lines
    assert ["10", "17%", "schedule (s.py:5)"] in lines
    assert "  process\n" not in result.stdout


def test_subprocess_recordings_name_each_thread_with_its_process(tmp_path):
    """py-spy --subprocesses: the HTTP process and the engine's child, whose commands hold `;` and `"`."""
    http = 'process 10:"python -m server.launch_server --chat-template {{ "a";b }}"'
    engine = 'process 11:"python -c from multiprocessing.spawn import spawn_main; spawn_main(fd=6)"'
    path = tmp_path / "host.txt"
    path.write_text(
        f"{http};thread (10): MainThread;run (app.py:10);send (h.py:3) 30\n"
        f"{http};{engine};thread (12): sglax-scheduler;loop (s.py:1);process (s.py:9) 70\n"
    )
    result = subprocess.run(
        [sys.executable, "scripts/host_profile_summary.py", str(path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "process 11 thread (12): sglax-scheduler: 70 samples (70%)" in result.stdout
    assert "process 10 thread (10): MainThread: 30 samples (30%)" in result.stdout
    assert "spawn_main" not in result.stdout
