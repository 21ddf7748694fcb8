"""Real servers for the HTTP tests: `python -m server.launch_server` in a subprocess on loopback.

    server = start_server(model_folder, "--is-embedding", log_dir=tmp, cwd=tmp)
    try:
        requests.post(server.url + "/encode", json={"text": "hi"})
    finally:
        server.stop()

Each server gets a free port on 127.0.0.1, a small KV pool (the machine is
shared), its own process group (so `stop` ends everything it started) and a log
file; a server that dies or never answers fails the test with the tail of that
log. Test modules start one server per module (`scope="module"` fixtures) and
stop it in the fixture's finalizer.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import requests

from server.utils import find_free_port, terminate_process, wait_for_server
from tests.fixture_spec import compile_level_flags

REPO_ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = float(os.environ.get("SGLAX_TEST_STARTUP_TIMEOUT", "300"))
REQUEST_TIMEOUT = 300
LOG_TAIL = 4000
# Small by default: several servers, torch references and other test runs share 24 GB and two cores.
DEFAULT_FLAGS: tuple[str, ...] = ("--max-total-tokens", "4096", "--max-running-requests", "32", "--no-warmup")
EXPERT_CSV_GLOB = "expert_distribution_rank0_timestamp*.csv"  # written in the server's working directory
EXPERT_CSV_HEADER = ["layer_id", "expert_id", "count"]


@dataclass
class ServerProcess:
    """A running server: its base URL, the process and the file its output goes to."""

    url: str
    process: subprocess.Popen
    log_path: Path
    argv: list[str] = field(default_factory=list)

    def log_tail(self, size: int = LOG_TAIL) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "<no log>"
        return text[-size:]

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM (the server drains), then SIGKILL after a grace period; the whole process group."""
        terminate_process(self.process, timeout=15)

    def get(self, route: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", REQUEST_TIMEOUT)
        return requests.get(self.url + route, **kwargs)

    def post(self, route: str, body: Any = None, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", REQUEST_TIMEOUT)
        return requests.post(self.url + route, json=body, **kwargs)


def start_server(
    model_path: str | os.PathLike,
    *flags: str,
    log_dir: str | os.PathLike,
    cwd: str | os.PathLike | None = None,
    defaults: Sequence[str] = DEFAULT_FLAGS,
    timeout: float = STARTUP_TIMEOUT,
    env: dict[str, str] | None = None,
) -> ServerProcess:
    """Launch a server and wait until /v1/models answers; raises with the log tail if it does not.

    `cwd` is the server's working directory (where it writes expert-distribution
    CSVs); the repository stays importable from anywhere through PYTHONPATH. `env`
    adds variables to the server's environment.
    """
    port = find_free_port("127.0.0.1")
    argv = [
        sys.executable,
        "-m",
        "server.launch_server",
        "--model-path",
        str(model_path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *defaults,
        *compile_level_flags(model_path),
        *flags,
    ]
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), full_env.get("PYTHONPATH", "")) if p)
    log_path = Path(log_dir) / f"server-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            argv,
            cwd=str(cwd) if cwd is not None else str(REPO_ROOT),
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    server = ServerProcess(f"http://127.0.0.1:{port}", process, log_path, argv)
    try:
        wait_for_server(server.url, timeout=timeout, process=process)
    except (RuntimeError, TimeoutError) as exc:
        server.stop()
        raise RuntimeError(
            f"{exc}\ncommand: {' '.join(argv)}\n--- server log ---\n{server.log_tail()}"
        ) from exc
    return server


def greedy_params(max_new_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"temperature": 0, "max_new_tokens": max_new_tokens, **extra}


def generate_ids(
    server: ServerProcess, input_ids: list[int], max_new_tokens: int, **sampling: Any
) -> tuple[list[int], dict[str, Any]]:
    """Greedy output token ids of one prompt (read from output_token_logprobs) and the whole answer."""
    body = {
        "input_ids": [int(t) for t in input_ids],
        "sampling_params": greedy_params(max_new_tokens, **sampling),
        "return_logprob": True,
    }
    r = server.post("/generate", body)
    assert r.status_code == 200, f"/generate answered {r.status_code}: {r.text[:500]}"
    answer = r.json()
    ids = [int(entry[1]) for entry in answer["meta_info"]["output_token_logprobs"]]
    return ids, answer


def generate_batch_ids(
    server: ServerProcess, prompts: list[list[int]], max_new_tokens: int, **sampling: Any
) -> list[list[int]]:
    """Greedy output token ids of several prompts sent as one batch (EOS ignored)."""
    body = {
        "input_ids": prompts,
        "sampling_params": greedy_params(max_new_tokens, ignore_eos=True, **sampling),
        "return_logprob": True,
    }
    r = server.post("/generate", body)
    assert r.status_code == 200, f"/generate answered {r.status_code}: {r.text[:500]}"
    return [[int(entry[1]) for entry in answer["meta_info"]["output_token_logprobs"]] for answer in r.json()]


def wait_idle(server: ServerProcess, timeout: float = 120) -> dict[str, Any]:
    """/get_server_info once nothing runs, waits or compiles in the background (a finished HTTP answer
    may precede the bookkeeping; a borrowed step's own programs may still be compiling)."""
    deadline = time.monotonic() + timeout
    while True:
        info = server.get("/get_server_info").json()
        busy = ("num_running_reqs", "num_queue_reqs", "num_pending_compiles")
        if all(info.get(name, 0) == 0 for name in busy):
            return info
        assert time.monotonic() < deadline, f"server not idle after {timeout} s: {info}"
        time.sleep(0.1)


# ----------------------------------------------------------------------------- the expert record


def text_route(server: ServerProcess, route: str, expected: str) -> None:
    r = server.post(route)
    assert r.status_code == 200, f"{route}: {r.status_code} {r.text[:300]}"
    assert r.text == expected, (route, r.text)


def start_record(server: ServerProcess) -> None:
    text_route(server, "/start_expert_distribution_record", "Start recording the expert distribution.\n")


def stop_record(server: ServerProcess) -> None:
    text_route(server, "/stop_expert_distribution_record", "Stop recording the expert distribution.\n")


def dump_record(server: ServerProcess, workdir: Path) -> tuple[Path, np.ndarray]:
    """Dump, then read the one new CSV in the server's working directory as int[layers, experts]."""
    before = set(workdir.glob(EXPERT_CSV_GLOB))
    text_route(server, "/dump_expert_distribution_record", "Dump expert distribution record.\n")
    new = sorted(set(workdir.glob(EXPERT_CSV_GLOB)) - before)
    assert len(new) == 1, (
        f"expected one new {EXPERT_CSV_GLOB} in {workdir}, found {new} (all: {sorted(workdir.iterdir())})"
    )
    path = new[0]
    stamp = path.name.removeprefix("expert_distribution_rank0_timestamp").removesuffix(".csv")
    float(stamp)  # the reference writes time.time()
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == EXPERT_CSV_HEADER, rows[0]
    body = [tuple(int(x) for x in row) for row in rows[1:]]
    layers = max(r[0] for r in body) + 1
    experts = max(r[1] for r in body) + 1
    assert [(r[0], r[1]) for r in body] == [(layer, e) for layer in range(layers) for e in range(experts)], (
        "one row per layer and expert, in order"
    )
    counts = np.zeros((layers, experts), np.int64)
    for layer, expert, count in body:
        counts[layer, expert] = count
    return path, counts


def expert_counts_of(server: ServerProcess, prompt: list[int], workdir: Path) -> np.ndarray:
    """The expert record of one prompt's prefill alone (a request for one token on an idle server),
    as int[layers, experts] (`dump_record`)."""
    wait_idle(server)
    start_record(server)
    generate_batch_ids(server, [prompt], 1)
    stop_record(server)
    return dump_record(server, workdir)[1]
