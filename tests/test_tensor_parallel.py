"""Tensor parallelism (`--tp-size`): the weights' layout, and real servers split over two devices.

The servers run on two CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=2`, as
DESIGN.md says a CPU tests multi-device serving) and are checked against HF's outputs on the
same weights: greedy tokens, every prompt position's logprobs, reward scores, and a weight swap.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from models.layers import DecoderConfig, GatedMLP
from models.registry import architecture_of, get_model_class
from models.tensor_parallel import (
    group_for_shards,
    partition_spec,
    tensor_parallel_mesh,
    unsupported_reason,
)
from runtime.engine import Engine
from runtime.weights import load_config
from tests import fixture_spec as spec
from tests.conftest import greedy_agrees, load_reference, prompts_of
from tests.server_helpers import (
    ServerProcess,
    expert_counts_of,
    generate_batch_ids,
    greedy_params,
    start_server,
    wait_idle,
)

SMALL = ("--max-total-tokens", "4096", "--max-running-requests", "32")  # the server's warm-up on
TWO_DEVICES, THREE_DEVICES = (
    {"XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}"}
    for n in (2, 3)
)
LOGPROB_TOL = 1e-4  # norm-wise, of the logprob scale (TEST_MODELS.md)
SCORE_RTOL = 1e-3


# ----------------------------------------------------------------------------- the layout


def test_grouped_gate_up_columns_give_the_checkpoint_order_result() -> None:
    """`GatedMLP` reading its gate/up kernel grouped for two shards computes what it computes on
    the checkpoint's column order with one."""
    mlp = GatedMLP(8, 6, "silu", jnp.float32, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (5, 8))
    expected = mlp(x)
    state = nnx.state(mlp)
    pure = nnx.to_pure_dict(state)
    nnx.replace_by_pure_dict(state, group_for_shards({"mlp": pure}, _cfg_with(intermediate=6), 2)["mlp"])
    nnx.update(mlp, state)
    assert not np.allclose(pure["gate_up_proj"]["kernel"], nnx.to_pure_dict(state)["gate_up_proj"]["kernel"])
    np.testing.assert_allclose(mlp(x, shards=2), expected, rtol=1e-6, atol=1e-6)


def _cfg_with(intermediate: int, heads: int = 2, kv_heads: int = 2) -> DecoderConfig:
    cfg = _cfg_of(spec.TINY_QWEN2)
    return dataclasses.replace(cfg, intermediate_size=intermediate, num_heads=heads, num_kv_heads=kv_heads)


def _cfg_of(model: str) -> DecoderConfig:
    config = load_config(str(spec.models_dir() / model))
    return get_model_class(architecture_of(config)).config_from_hf(config)


def test_grouping_puts_each_shards_heads_together() -> None:
    """q/k/v columns of two shards: shard 0 holds the first half of each part, in order."""
    cfg = _cfg_with(intermediate=4, heads=4, kv_heads=2)
    d = cfg.head_dim
    q, kv = 4 * d, 2 * d
    columns = np.arange(q + 2 * kv, dtype=np.float32)[None, :]
    grouped = group_for_shards({"qkv_proj": {"kernel": columns}}, cfg, 2)["qkv_proj"]["kernel"][0]
    half_q, half_kv = q // 2, kv // 2
    shard0 = np.concatenate(
        [columns[0, :half_q], columns[0, q : q + half_kv], columns[0, q + kv : q + kv + half_kv]]
    )
    np.testing.assert_array_equal(grouped[: len(shard0)], shard0)
    assert sorted(grouped.tolist()) == columns[0].tolist()
    assert group_for_shards({"qkv_proj": {"kernel": columns}}, cfg, 1)["qkv_proj"]["kernel"] is columns


@pytest.mark.parametrize(
    ("path", "shape", "expected"),
    [
        (("model", "layers", "self_attn", "qkv_proj", "kernel"), (2, 8, 12), PartitionSpec(None, None, "tp")),
        (("model", "layers", "self_attn", "qkv_proj", "bias"), (2, 12), PartitionSpec(None, "tp")),
        (("model", "layers", "self_attn", "o_proj", "kernel"), (2, 8, 8), PartitionSpec(None, "tp", None)),
        (("model", "layers", "mlp", "down_proj", "kernel"), (2, 6, 8), PartitionSpec(None, "tp", None)),
        (("model", "layers", "input_layernorm", "weight"), (2, 8), PartitionSpec()),
        (("model", "embed_tokens", "embedding"), (100, 8), PartitionSpec("tp", None)),
        (("model", "embed_tokens", "embedding"), (101, 8), PartitionSpec()),
        (("lm_head", "kernel"), (8, 100), PartitionSpec(None, "tp")),
        (("lm_head", "kernel"), (8, 101), PartitionSpec()),  # a vocabulary that does not split
        (("score_head", "kernel"), (8, 1), PartitionSpec()),
    ],
)
def test_partition_specs(path: tuple[str, ...], shape: tuple[int, ...], expected: PartitionSpec) -> None:
    keys = tuple(jax.tree_util.DictKey(name) for name in path)
    assert partition_spec(keys, shape, 2) == expected
    assert partition_spec(keys, shape, 2, by_expert=True) == expected  # no experts among these


@pytest.mark.parametrize(
    ("leaf", "shape", "by_intermediate", "by_expert"),
    [
        (
            "gate_up_proj",
            (2, 8, 64, 64),
            PartitionSpec(None, None, None, "tp"),
            PartitionSpec(None, "tp", None, None),
        ),
        (
            "down_proj",
            (2, 8, 32, 64),
            PartitionSpec(None, None, "tp", None),
            PartitionSpec(None, "tp", None, None),
        ),
    ],
)
def test_experts_split_by_intermediate_or_by_expert(
    leaf: str, shape: tuple[int, ...], by_intermediate: PartitionSpec, by_expert: PartitionSpec
) -> None:
    keys = tuple(jax.tree_util.DictKey(name) for name in ("model", "layers", "mlp", "experts", leaf))
    assert partition_spec(keys, shape, 2) == by_intermediate
    assert partition_spec(keys, shape, 2, by_expert=True) == by_expert


def test_whole_experts_keep_their_column_order() -> None:
    """Grouped per device by intermediate, an expert's `[gate | up]` columns are reordered; split by
    expert, each device holds whole experts, in the checkpoint's order. The shared expert is
    grouped by its own intermediate size either way."""
    cfg = _cfg_of(spec.TINY_QWEN2_MOE)
    experts = np.arange(2 * 8 * 2 * 32, dtype=np.float32).reshape(2, 8, 1, 64)
    shared = np.arange(2 * 128, dtype=np.float32).reshape(2, 1, 128)
    tree = {
        "mlp": {"experts": {"gate_up_proj": experts}, "shared_expert": {"gate_up_proj": {"kernel": shared}}}
    }
    split = group_for_shards(tree, cfg, 2)["mlp"]
    assert not np.array_equal(split["experts"]["gate_up_proj"], experts)
    np.testing.assert_array_equal(split["experts"]["gate_up_proj"][..., :16], experts[..., :16])  # gate_0
    np.testing.assert_array_equal(split["experts"]["gate_up_proj"][..., 16:32], experts[..., 32:48])  # up_0
    whole = group_for_shards(tree, cfg, 2, by_expert=True)["mlp"]
    assert whole["experts"]["gate_up_proj"] is experts
    for grouped in (split, whole):
        kernel = grouped["shared_expert"]["gate_up_proj"]["kernel"]
        np.testing.assert_array_equal(kernel[..., 32:64], shared[..., 64:96])  # up_0 after gate_0


def test_layers_that_cannot_split_are_named() -> None:
    moe = _cfg_of(spec.TINY_QWEN2_MOE)  # 4 heads, experts' intermediate 32, shared expert's 64
    assert unsupported_reason(moe, 2) is None
    odd_experts = dataclasses.replace(moe, moe=dataclasses.replace(moe.moe, intermediate_size=30))
    assert (
        unsupported_reason(moe, 3, by_expert=True)
        == "its attention heads (4) cannot be split evenly over 3 devices"
    )
    assert (
        unsupported_reason(moe, 8, by_expert=True)
        == "its attention heads (4) cannot be split evenly over 8 devices"
    )
    six_experts = dataclasses.replace(moe, moe=dataclasses.replace(moe.moe, num_experts=6))
    assert (
        unsupported_reason(six_experts, 4, by_expert=True)
        == "its experts (6) cannot be split evenly over 4 devices"
    )
    assert (
        unsupported_reason(odd_experts, 2, by_expert=True) is None
    )  # whole experts: their intermediate stays
    assert (
        unsupported_reason(odd_experts, 4)
        == "its experts' intermediate size (30) cannot be split evenly over 4 devices"
    )
    gqa8 = _cfg_of(spec.TINY_LLAMA_TIED_GQA8)
    assert unsupported_reason(gqa8, 2) == "its KV heads (1) cannot be split evenly over 2 devices"
    assert unsupported_reason(gqa8, 1) is None


@pytest.mark.skipif(jax.device_count() > 1, reason="this process has several devices")
def test_more_shards_than_devices_is_refused_with_the_cpu_hint() -> None:
    assert tensor_parallel_mesh(1) is None
    with pytest.raises(ValueError, match="--tp-size 2 needs 2 devices; this machine has 1") as exc:
        tensor_parallel_mesh(2)
    assert "xla_force_host_platform_device_count=2" in str(exc.value)


# ----------------------------------------------------------------------------- served on two devices


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def prompt_logprobs(server: ServerProcess, prompt: list[int]) -> np.ndarray:
    """The logprob the server gives each prompt token after the first."""
    body = {
        "input_ids": prompt,
        "sampling_params": greedy_params(1),
        "return_logprob": True,
        "logprob_start_len": 0,
    }
    r = server.post("/generate", body)
    assert r.status_code == 200, r.text
    entries = r.json()["meta_info"]["input_token_logprobs"]
    return np.asarray([entry[0] for entry in entries[1:]], np.float64)


def assert_prompt_logprobs(server: ServerProcess, prompt: list[int], logits: np.ndarray, how: str) -> None:
    """Every position's logprob of the next prompt token against HF's logits there."""
    expected = log_softmax(logits)[np.arange(len(prompt) - 1), prompt[1:]]
    ours = prompt_logprobs(server, prompt)
    err = np.max(np.abs(ours - expected)) / np.max(np.abs(expected))
    assert err < LOGPROB_TOL, f"{how}: prompt logprobs off by {err:.2e} of their scale"


@pytest.fixture(scope="module")
def qwen2_tp2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """With its warm-up, which compiles the samplers aside from shapes alone (they must meet the
    forward's logits placed as they were compiled for: whole, though the LM head is split)."""
    logs = tmp_path_factory.mktemp("tp-qwen2")
    server = start_server(
        spec.models_dir() / spec.TINY_QWEN2, "--tp-size", "2", log_dir=logs, env=TWO_DEVICES, defaults=SMALL
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def qwen2_one_device() -> Iterator[Engine]:
    model = spec.models_dir() / spec.TINY_QWEN2
    engine = Engine(
        model_path=str(model),
        max_total_tokens=4096,
        random_seed=0,
        xla_backend_optimization_level=spec.compile_level_for(model),
    )
    yield engine
    engine.shutdown()


def test_two_devices_serve_hf_greedy_tokens_and_logprobs(qwen2_tp2: ServerProcess) -> None:
    """Qwen2 (q/k/v bias, GQA 3:1) split over two devices: HF's greedy tokens, several prompts in
    one batch, and HF's logprob at every prompt position."""
    ref = load_reference(spec.TINY_QWEN2)
    prompts = prompts_of(ref)
    for i, ids in enumerate(generate_batch_ids(qwen2_tp2, prompts, len(ref["greedy_0"]))):
        result = greedy_agrees(ids, ref[f"greedy_{i}"], ref[f"greedy_margin_{i}"])
        assert result, f"prompt {i}: {result}"
    for i in (1, 2):
        assert_prompt_logprobs(qwen2_tp2, prompts[i], ref[f"logits_{i}"][:-1], f"prompt {i}")
    info = qwen2_tp2.get("/get_server_info").json()
    assert info["tp_size"] == 2


def test_sampled_and_penalised_requests_draw_as_on_one_device(
    qwen2_tp2: ServerProcess, qwen2_one_device: Engine
) -> None:
    """After greedy steps, seeded sampling (top-p, top-k) and penalties run the general sampler,
    compiled aside: the same draws as one device's, batched together."""
    prompts = prompts_of(load_reference(spec.TINY_QWEN2))
    common = {"max_new_tokens": 10, "ignore_eos": True}
    params = [
        {"temperature": 0.9, "top_p": 0.9, "sampling_seed": 11, **common},
        {"temperature": 0.7, "top_k": 20, "sampling_seed": 5, **common},
        {"temperature": 0.0, "frequency_penalty": 0.8, "repetition_penalty": 1.3, **common},
    ]
    body = {"input_ids": prompts[:3], "sampling_params": params, "return_logprob": True}
    r = qwen2_tp2.post("/generate", body)
    assert r.status_code == 200, r.text
    split = [[entry[1] for entry in answer["meta_info"]["output_token_logprobs"]] for answer in r.json()]
    whole = qwen2_one_device.generate(input_ids=prompts[:3], sampling_params=params, return_logprob=True)
    assert split == [[entry[1] for entry in answer["meta_info"]["output_token_logprobs"]] for answer in whole]


def test_a_weight_swap_keeps_the_split(qwen2_tp2: ServerProcess, tmp_path: Path) -> None:
    """Weights swapped in from disk are split as the loaded ones were: a checkpoint whose LM head
    is doubled gives log_softmax(2 x HF's logits) at every prompt position, and swapping back
    gives HF's again."""
    from safetensors.numpy import load_file, save_file

    ref = load_reference(spec.TINY_QWEN2)
    prompt = prompts_of(ref)[1]
    original = spec.models_dir() / spec.TINY_QWEN2
    doubled = tmp_path / "doubled-head"
    shutil.copytree(original, doubled, ignore=shutil.ignore_patterns("reference.*"))
    tensors = load_file(str(original / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["lm_head.weight"] * np.float32(2.0)
    save_file(tensors, str(doubled / "model.safetensors"), metadata={"format": "pt"})
    try:
        r = qwen2_tp2.post("/update_weights_from_disk", {"model_path": str(doubled)})
        assert r.status_code == 200 and r.json()["success"], r.text
        assert_prompt_logprobs(qwen2_tp2, prompt, 2.0 * ref["logits_1"][:-1], "doubled head")
    finally:
        r = qwen2_tp2.post("/update_weights_from_disk", {"model_path": str(original)})
    assert r.status_code == 200 and r.json()["success"], r.text
    assert_prompt_logprobs(qwen2_tp2, prompt, ref["logits_1"][:-1], "swapped back")


def test_a_tied_head_split_by_vocabulary_over_three_devices(tmp_path: Path) -> None:
    """SmolLM2 (9 heads, 3 KV heads, its embedding table doubling as the LM head) over three
    devices, the table split by vocabulary row: each lookup and each device's logits from its
    rows; HF's greedy tokens in a batch and HF's logprob at every prompt position."""
    ref = load_reference(spec.SMOLLM2)
    prompts = prompts_of(ref)
    server = start_server(
        spec.models_dir() / spec.SMOLLM2, "--tp-size", "3", log_dir=tmp_path, env=THREE_DEVICES
    )
    try:
        longest = max(len(ref[f"greedy_{i}"]) for i in range(len(prompts)))
        for i, ids in enumerate(generate_batch_ids(server, prompts, longest)):
            want = ref[f"greedy_{i}"]
            result = greedy_agrees(ids[: len(want)], want, ref[f"greedy_margin_{i}"])
            assert result, f"prompt {i}: {result}"
        assert_prompt_logprobs(server, prompts[2], ref["logits_2"][:-1], "prompt 2")
    finally:
        server.stop()


def test_unrolled_layers_split_over_two_devices_swap_without_compiling(tmp_path: Path) -> None:
    """`--layer-loop unrolled` under tensor parallelism: HF's logprobs, and a weight swap (placed
    leaf by leaf as the serving weights) that compiles nothing."""
    ref = load_reference(spec.TINY_QWEN2)
    prompt = prompts_of(ref)[1]
    model = spec.models_dir() / spec.TINY_QWEN2
    server = start_server(
        model, "--tp-size", "2", "--layer-loop", "unrolled", log_dir=tmp_path, env=TWO_DEVICES
    )
    try:
        assert_prompt_logprobs(server, prompt, ref["logits_1"][:-1], "unrolled")
        programs = wait_idle(server)["num_compiled_programs"]
        r = server.post("/update_weights_from_disk", {"model_path": str(model)})
        assert r.status_code == 200 and r.json()["success"], r.text
        assert_prompt_logprobs(server, prompt, ref["logits_1"][:-1], "unrolled, swapped")
        assert wait_idle(server)["num_compiled_programs"] == programs
    finally:
        server.stop()


def test_a_reward_model_split_over_two_devices_scores_as_hf(tmp_path: Path) -> None:
    ref = load_reference(spec.TINY_LLAMA_REWARD)
    server = start_server(
        spec.models_dir() / spec.TINY_LLAMA_REWARD, "--tp-size", "2", log_dir=tmp_path, env=TWO_DEVICES
    )
    try:
        conversations = [ref["conv_ids_0"].tolist(), ref["conv_ids_1"].tolist()]
        r = server.post("/classify", {"input_ids": conversations})
        assert r.status_code == 200, r.text
        for i, answer in enumerate(r.json()):
            want = float(ref[f"conv_score_{i}"][0])
            assert abs(answer["embedding"][0] - want) < SCORE_RTOL * abs(want), (i, answer["embedding"], want)
    finally:
        server.stop()


@pytest.mark.parametrize("ep", ["1", "2"], ids=["by-intermediate", "by-expert"])
def test_mixture_of_experts_split_over_two_devices(ep: str, tmp_path: Path) -> None:
    """Qwen2-MoE over two devices, each expert's intermediate split (`--ep-size 1`) or whole
    experts on each (expert parallelism), the shared expert's intermediate split: HF's greedy
    tokens in a batch, HF's logprob at every prompt position (also after the weights
    are swapped in from disk, regrouped as at load), and the expert record's counts equal to HF's
    router choices (the router runs whole on each device, recorded once)."""
    ref = load_reference(spec.TINY_QWEN2_MOE)
    prompts = prompts_of(ref)
    server = start_server(
        spec.models_dir() / spec.TINY_QWEN2_MOE,
        "--tp-size",
        "2",
        "--ep-size",
        ep,
        "--disable-radix-cache",
        log_dir=tmp_path,
        cwd=tmp_path,
        env=TWO_DEVICES,
    )
    try:
        for i, ids in enumerate(generate_batch_ids(server, prompts, len(ref["greedy_0"]))):
            result = greedy_agrees(ids, ref[f"greedy_{i}"], ref[f"greedy_margin_{i}"])
            assert result, f"prompt {i}: {result}"
        for i in (1, 2):
            assert_prompt_logprobs(server, prompts[i], ref[f"logits_{i}"][:-1], f"prompt {i}")
        r = server.post(
            "/update_weights_from_disk", {"model_path": str(spec.models_dir() / spec.TINY_QWEN2_MOE)}
        )
        assert r.status_code == 200 and r.json()["success"], r.text
        assert_prompt_logprobs(server, prompts[2], ref["logits_2"][:-1], "swapped in again")
        counts = expert_counts_of(server, prompts[2], tmp_path)
        assert np.array_equal(counts, ref["router_counts_2"]), (counts, ref["router_counts_2"])
        info = server.get("/get_server_info").json()
        assert (info["tp_size"], info["ep_size"]) == (2, int(ep))
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("model", "tp", "message"),
    [
        (spec.TINY_QWEN2, "4", "--tp-size 4 needs 4 devices; this machine has 2 (cpu)"),
        (spec.MINILM, "2", "--tp-size 2 cannot serve BertModel: encoders run on one device"),
    ],
)
def test_a_split_that_cannot_run_fails_the_launch_saying_why(
    model: str, tp: str, message: str, tmp_path: Path
) -> None:
    with pytest.raises(RuntimeError) as exc:
        start_server(
            spec.models_dir() / model, "--tp-size", tp, log_dir=tmp_path, env=TWO_DEVICES, timeout=120
        )
    assert message in str(exc.value)
