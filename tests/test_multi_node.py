"""Several nodes (`--nnodes 2`): two local processes, one CPU device each, serve one model split
over both (DESIGN.md: "On a CPU-only machine both are tested with ... several local processes").

Node 0 is a real server; node 1 is a follower (`--node-rank 1`, no HTTP) that runs node 0's steps
on its device. Checked against HF's outputs on the same weights: greedy tokens, every prompt
position's logprob, the expert record, weight swaps (one that every node refuses), and that the
follower stops cleanly with the server.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from runtime.model_runner import ModelRunner
from runtime.multi_node import COMMAND_PORT_OFFSET, MirroredRunner
from server.utils import find_free_port, terminate_process
from tests import fixture_spec as spec
from tests.conftest import greedy_agrees, load_reference, prompts_of
from tests.server_helpers import (
    REPO_ROOT,
    ServerProcess,
    expert_counts_of,
    generate_batch_ids,
    start_server,
)
from tests.test_tensor_parallel import assert_prompt_logprobs, log_softmax

MODEL = spec.TINY_QWEN2_MOE
# The dispatch thread (on by default off a CPU) and short prefill chunks: a step's forward and the
# previous step's readouts then run side by side (`multi_node.settle`).
NODE_FLAGS = (
    *("--tp-size", "2", "--ep-size", "2", "--nnodes", "2", "--disable-radix-cache"),
    *("--dispatch-thread", "on", "--chunked-prefill-size", "16"),
)
SMALL = ("--max-total-tokens", "4096", "--max-running-requests", "32", "--no-warmup")
FOLLOWER_TOKENS = 2048


def coordinator_address() -> str:
    """A free port for JAX's coordinator whose next port (the command connections') is free too."""
    while True:
        port = find_free_port("127.0.0.1")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port + COMMAND_PORT_OFFSET))
            except OSError:
                continue
        return f"127.0.0.1:{port}"


def start_follower(address: str, log_path: Path) -> subprocess.Popen:
    argv = [
        sys.executable,
        "-m",
        "server.launch_server",
        "--model-path",
        str(spec.models_dir() / MODEL),
        *SMALL,
        *NODE_FLAGS,
        *spec.compile_level_flags(MODEL),  # as start_server gives node 0
        "--max-total-tokens",  # less room here than on node 0: the pool is the size both hold
        str(FOLLOWER_TOKENS),
        "--node-rank",
        "1",
        "--dist-init-addr",
        address,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with log_path.open("wb") as log:
        return subprocess.Popen(
            argv, cwd=str(REPO_ROOT), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, subprocess.Popen, Path]]:
    workdir = tmp_path_factory.mktemp("nodes")
    address = coordinator_address()
    follower = start_follower(address, workdir / "node1.log")
    try:
        server = start_server(
            spec.models_dir() / MODEL,
            *NODE_FLAGS,
            "--node-rank",
            "0",
            "--dist-init-addr",
            address,
            log_dir=workdir,
            cwd=workdir,
            defaults=SMALL,
        )
    except Exception:
        terminate_process(follower, timeout=5)
        raise
    yield server, follower, workdir
    server.stop()
    terminate_process(follower, timeout=5)


def assert_prompt_top_logprobs(server: ServerProcess, prompt: list[int], logits: np.ndarray) -> None:
    """Each prompt position's top-3 logprobs (a `[rows, V]` table, read on node 0 whole) equal HF's:
    the same tokens and values."""
    body = {
        "input_ids": prompt,
        "sampling_params": {"temperature": 0, "max_new_tokens": 1},
        "return_logprob": True,
        "logprob_start_len": 0,
        "top_logprobs_num": 3,
    }
    r = server.post("/generate", body)
    assert r.status_code == 200, r.text
    tops = r.json()["meta_info"]["input_top_logprobs"][1:]
    expected = log_softmax(logits)
    for position, top in enumerate(tops):
        want = np.argsort(-expected[position])[:3]
        assert [entry[1] for entry in top] == want.tolist(), (position, top, want)
        np.testing.assert_allclose([entry[0] for entry in top], expected[position][want], atol=1e-4)


# The runner's public calls that run no device program with the other nodes: a compile (no
# collective), placing weights on this node's own shards, waits and counts.
RUNNER_CALLS_LEFT_LOCAL = {
    "compile_samplers",
    "wait_for_background_compiles",
    "place_params",
    "steps_are_cheap",
    "num_compiled_programs",
    "num_step_programs",
}


def test_every_runner_call_with_device_programs_is_mirrored() -> None:
    """Node 0's `MirroredRunner` hands a call it does not define to its own runner alone; one that
    runs a device program would then run on node 0 only, and its collectives would wait forever for
    the followers. So each public call of the runner is mirrored, or named above as local: a new
    one fails here until it is placed."""
    public = {name for name in vars(ModelRunner) if not name.startswith("_")}
    mirrored = {name for name in vars(MirroredRunner) if not name.startswith("_")}
    assert public - mirrored == RUNNER_CALLS_LEFT_LOCAL
    assert not RUNNER_CALLS_LEFT_LOCAL & mirrored


def test_two_nodes_serve_hf_outputs(nodes: tuple[ServerProcess, subprocess.Popen, Path]) -> None:
    """Greedy tokens of a batch, every prompt position's logprob and top logprobs, and the expert
    record's counts equal HF's, with whole experts on each node's device (`--ep-size 2`)."""
    server, follower, workdir = nodes
    ref = load_reference(MODEL)
    prompts = prompts_of(ref)
    for i, ids in enumerate(generate_batch_ids(server, prompts, len(ref["greedy_0"]))):
        result = greedy_agrees(ids, ref[f"greedy_{i}"], ref[f"greedy_margin_{i}"])
        assert result, f"prompt {i}: {result}"
    assert_prompt_logprobs(server, prompts[2], ref["logits_2"][:-1], "prompt 2")
    assert_prompt_top_logprobs(server, prompts[1], ref["logits_1"][:-1])
    counts = expert_counts_of(server, prompts[1], workdir)
    assert np.array_equal(counts, ref["router_counts_1"]), (counts, ref["router_counts_1"])
    info = server.get("/get_server_info").json()
    assert (info["nnodes"], info["tp_size"]) == (2, 2)
    assert 0 < info["max_total_num_tokens"] <= FOLLOWER_TOKENS, info["max_total_num_tokens"]
    assert follower.poll() is None


def test_weights_swap_on_every_node(nodes: tuple[ServerProcess, subprocess.Popen, Path]) -> None:
    """A swap loads on every node before any swaps: a checkpoint no node can take fails the update
    and every node keeps serving its weights; a good one swaps on both."""
    server, follower, _ = nodes
    ref = load_reference(MODEL)
    prompt = prompts_of(ref)[1]
    r = server.post("/update_weights_from_disk", {"model_path": str(spec.models_dir() / spec.TINY_LLAMA)})
    assert r.status_code == 400 or not r.json()["success"], r.text
    assert "node 1" in r.json()["message"], r.text
    assert_prompt_logprobs(server, prompt, ref["logits_1"][:-1], "after a refused swap")
    r = server.post("/update_weights_from_disk", {"model_path": str(spec.models_dir() / MODEL)})
    assert r.status_code == 200 and r.json()["success"], r.text
    assert_prompt_logprobs(server, prompt, ref["logits_1"][:-1], "swapped in again")
    assert follower.poll() is None


def test_the_follower_stops_with_the_server(nodes: tuple[ServerProcess, subprocess.Popen, Path]) -> None:
    """Node 0 tells the follower to stop when it stops; both leave JAX's processes cleanly (the
    module's last test: it stops the nodes)."""
    server, follower, workdir = nodes
    server.stop()
    assert follower.wait(timeout=60) == 0, (workdir / "node1.log").read_text()[-3000:]
    assert server.process.returncode == 0
