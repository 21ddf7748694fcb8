"""Issue 5 over HTTP: the Qwen2-MoE checkpoint served by a real server, and its expert-distribution record.

- Greedy tokens equal HF transformers' (the fixture's `greedy_<i>`, by conftest's margin rule).
- /start_expert_distribution_record, one request with max_new_tokens=1 on `prompt_<i>`,
  /stop..., /dump... writes `expert_distribution_rank0_timestamp<time>.csv` in the
  server's working directory: header `layer_id,expert_id,count`, one row per layer
  and expert, counts equal to HF's router top-k choices over the prompt (`router_counts_<i>`).

With max_new_tokens=1 the only step is the prefill of every prompt token (the sampled
token is never fed back), so the record holds the prompt's routing exactly. The server
runs with --disable-radix-cache so no prompt token is served from the prefix cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests import fixture_spec as spec
from tests.conftest import fixture_path, greedy_agrees, load_reference
from tests.server_helpers import (
    ServerProcess,
    dump_record,
    generate_batch_ids,
    generate_ids,
    start_record,
    start_server,
    stop_record,
    wait_idle,
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("moe-cwd")


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory, workdir: Path) -> Iterator[ServerProcess]:
    server = start_server(
        fixture_path(spec.TINY_QWEN2_MOE),
        "--disable-radix-cache",
        cwd=workdir,
        log_dir=tmp_path_factory.mktemp("moe-log"),
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def ref() -> dict:
    return load_reference(spec.TINY_QWEN2_MOE)


def test_greedy_tokens_match_hf(moe: ServerProcess, ref: dict) -> None:
    for i in range(ref["num_prompts"]):
        prompt = ref[f"prompt_{i}"].tolist()
        want = ref[f"greedy_{i}"]
        ours, answer = generate_ids(moe, prompt, len(want), ignore_eos=True)
        assert answer["meta_info"]["prompt_tokens"] == len(prompt)
        assert answer["meta_info"]["cached_tokens"] == 0, "the radix cache is disabled"
        result = greedy_agrees(ours, want, ref[f"greedy_margin_{i}"])
        assert result, f"prompt {i}: {result}"


def test_batched_greedy_tokens_match_hf(moe: ServerProcess, ref: dict) -> None:
    """All prompts in one /generate batch: routing of one sequence must not leak into another."""
    prompts = [ref[f"prompt_{i}"].tolist() for i in range(ref["num_prompts"])]
    for i, ours in enumerate(generate_batch_ids(moe, prompts, 16)):
        result = greedy_agrees(ours, ref[f"greedy_{i}"], ref[f"greedy_margin_{i}"])
        assert result, f"prompt {i} in a batch: {result}"


def test_expert_distribution_equals_hf_router(moe: ServerProcess, ref: dict, workdir: Path) -> None:
    num_layers, num_experts = ref["router_counts_0"].shape
    for i in range(ref["num_prompts"]):
        prompt = ref[f"prompt_{i}"].tolist()
        wait_idle(moe)
        start_record(moe)
        generate_ids(moe, prompt, 1)
        stop_record(moe)
        path, counts = dump_record(moe, workdir)
        want = ref[f"router_counts_{i}"]
        assert counts.shape == (num_layers, num_experts), f"{path.name}: shape {counts.shape}"
        top_k = counts.sum(axis=1) / len(prompt)
        assert np.array_equal(counts, want), (
            f"prompt {i} ({len(prompt)} tokens): CSV counts\n{counts}\nHF router top-k counts\n{want}\n"
            f"(selections per token per layer: {top_k})"
        )


def test_record_start_stop_and_reset(moe: ServerProcess, ref: dict, workdir: Path) -> None:
    prompt = ref["prompt_0"].tolist()
    want = ref["router_counts_0"]
    wait_idle(moe)
    # Nothing recorded before a start, and a start clears what an earlier recording left.
    start_record(moe)
    generate_ids(moe, prompt, 1)
    start_record(moe)
    stop_record(moe)
    _, counts = dump_record(moe, workdir)
    assert not counts.any(), f"a start clears the record, got\n{counts}"
    # Recording goes on after a dump (which resets the counts) until stopped.
    start_record(moe)
    generate_ids(moe, prompt, 1)
    _, first = dump_record(moe, workdir)
    generate_ids(moe, prompt, 1)
    generate_ids(moe, prompt, 1)
    stop_record(moe)
    _, second = dump_record(moe, workdir)
    assert np.array_equal(first, want), (first, want)
    assert np.array_equal(second, 2 * want), (second, want)
    # Stopped: requests are not counted.
    generate_ids(moe, prompt, 1)
    _, after_stop = dump_record(moe, workdir)
    assert not after_stop.any(), f"requests after a stop were counted:\n{after_stop}"
