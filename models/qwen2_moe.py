"""Qwen2-MoE (Qwen1.5-MoE-A2.7B): Qwen2's attention with a sparse MLP block.

Each layer's MLP is a softmax router choosing `num_experts_per_tok` of
`num_experts` experts per token (weights optionally renormalised), the chosen
experts run as grouped matmuls over tokens sorted by expert, and a shared
expert is added, scaled by `sigmoid(shared_expert_gate(x))`. The router's
per-expert selection counts over the real tokens come back per layer as
`expert_counts[L, E]` for the expert-distribution recorder.

Configs mixing dense and sparse layers (`decoder_sparse_step > 1`,
`mlp_only_layers`) are refused: the layer scan needs one layer shape.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from kernels_pallas.moe_routing import Routing, grouped_matmul, route_tokens
from models.layers import (
    TP_AXIS,
    CausalLM,
    DecoderConfig,
    Dtype,
    GatedMLP,
    HFTensorReader,
    KernelBackends,
    MoeConfig,
    Params,
    activation,
    config_value,
    linear,
    sigmoid,
)
from models.qwen2 import check_full_attention


def _routed_sum(
    x: jax.Array, routing: Routing, gate_up_proj: jax.Array, down_proj: jax.Array, act: str, backend: str
) -> jax.Array:
    """Each token's chosen experts' outputs, weighted and summed in float32: `[T, H]`.

    The experts' intermediate may be one device's slice of it (tensor parallelism): the result is
    then that device's part of the sum."""
    tokens, top_k = routing.expert_ids.shape
    token_of_pair = routing.sort_order // top_k  # the pairs are (token, choice), flattened
    gate_up = grouped_matmul(x[token_of_pair], gate_up_proj, routing.group_sizes, backend=backend)
    gate, up = jnp.split(gate_up, 2, axis=-1)
    out_sorted = grouped_matmul(activation(act)(gate) * up, down_proj, routing.group_sizes, backend=backend)
    out_pairs = jnp.zeros_like(out_sorted).at[routing.sort_order].set(out_sorted)
    out_pairs = out_pairs.reshape(tokens, top_k, -1)
    return jnp.einsum("tkh,tk->th", out_pairs, routing.weights, preferred_element_type=jnp.float32)


def _own_experts(routing: Routing, num_local: int) -> Routing:
    """Expert parallelism: the routing as this device's block of `num_local` experts sees it.

    The (token, choice) pairs sorted by expert put this device's experts' pairs in one run; the
    sort order is rotated to bring that run first and the group sizes cut to the device's
    experts. The grouped matmuls leave the rows past their groups zero, so every other pair adds
    nothing here (its device adds it)."""
    first = jax.lax.axis_index(TP_AXIS) * num_local
    sizes = routing.group_sizes
    start = jnp.sum(jnp.where(jnp.arange(sizes.shape[0]) < first, sizes, 0))
    own_sizes = jax.lax.dynamic_slice_in_dim(sizes, first, num_local)
    return dataclasses.replace(
        routing, sort_order=jnp.roll(routing.sort_order, -start), group_sizes=own_sizes
    )


class Experts(nnx.Module):
    """The routed experts' weights, stacked: `gate_up_proj[E, H, 2I]`, `down_proj[E, I, H]`.

    Split over devices (`models/tensor_parallel.py`), each device runs the experts on what it
    holds and the devices' parts are summed (one all-reduce): under tensor parallelism every
    expert's slice of the intermediate (its gate and up columns, grouped per device, and the
    same rows of down); under expert parallelism whole experts, a block of E / N."""

    def __init__(self, moe: MoeConfig, hidden: int, act: str, dtype: Dtype, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
        size = moe.intermediate_size
        self.gate_up_proj = nnx.Param(init(rngs.params(), (moe.num_experts, hidden, 2 * size), dtype))
        self.down_proj = nnx.Param(init(rngs.params(), (moe.num_experts, size, hidden), dtype))
        self.act = act

    def __call__(self, x: jax.Array, routing: Routing, backends: KernelBackends) -> jax.Array:
        """Weighted sum over each token's chosen experts, `[T, H]`."""
        weights = (self.gate_up_proj[...], self.down_proj[...])
        if backends.mesh is None:
            return _routed_sum(x, routing, *weights, self.act, backends.moe).astype(x.dtype)
        whole, by_expert = PartitionSpec(), backends.experts_by_expert
        split = (
            (PartitionSpec(TP_AXIS, None, None),) * 2
            if by_expert
            else (PartitionSpec(None, None, TP_AXIS), PartitionSpec(None, TP_AXIS, None))
        )

        @functools.partial(
            jax.shard_map, mesh=backends.mesh, in_specs=(whole, whole, *split), out_specs=whole
        )
        def per_device(x, routing, gate_up_proj, down_proj):
            if by_expert:
                routing = _own_experts(routing, gate_up_proj.shape[0])
            part = _routed_sum(x, routing, gate_up_proj, down_proj, self.act, backends.moe)
            return jax.lax.psum(part, TP_AXIS)

        return per_device(x, routing, *weights).astype(x.dtype)


class SparseMoeBlock(nnx.Module):
    """Router + routed experts + sigmoid-gated shared expert (HF `Qwen2MoeSparseMoeBlock`)."""

    def __init__(self, cfg: DecoderConfig, dtype: Dtype, rngs: nnx.Rngs):
        moe = cfg.moe
        assert moe is not None
        self.gate = linear(cfg.hidden_size, moe.num_experts, dtype, rngs)
        self.experts = Experts(moe, cfg.hidden_size, cfg.hidden_act, dtype, rngs)
        self.shared_expert = GatedMLP(
            cfg.hidden_size, moe.shared_expert_intermediate_size, cfg.hidden_act, dtype, rngs
        )
        self.shared_expert_gate = linear(cfg.hidden_size, 1, dtype, rngs)
        self.top_k, self.norm_topk_prob = moe.top_k, moe.norm_topk_prob

    def __call__(
        self, x: jax.Array, valid: jax.Array, backends: KernelBackends
    ) -> tuple[jax.Array, jax.Array]:
        """`(out[T, H], counts int32[E])`; counts cover the `valid` tokens only. The router and its
        choices are the same on every device (its weights are whole)."""
        routing = route_tokens(
            self.gate(x), valid, top_k=self.top_k, renormalize=self.norm_topk_prob, backend=backends.moe
        )
        routed = self.experts(x, routing, backends)
        shared_scale = sigmoid(self.shared_expert_gate(x))
        return routed + shared_scale * self.shared_expert(x, backends.shards), routing.counts


def sparse_moe_block(cfg: DecoderConfig, dtype: Dtype, rngs: nnx.Rngs) -> SparseMoeBlock:
    return SparseMoeBlock(cfg, dtype, rngs)


def qwen2_moe_config(config: Any) -> DecoderConfig:
    """A Qwen2-MoE HF config as the shared decoder's settings; every layer must be sparse."""
    check_full_attention(config)
    num_layers = int(config_value(config, "num_hidden_layers"))
    num_experts = int(config_value(config, "num_experts", 0) or 0)
    step = int(config_value(config, "decoder_sparse_step", 1) or 1)
    mlp_only = set(config_value(config, "mlp_only_layers", None) or [])
    dense = [i for i in range(num_layers) if i in mlp_only or num_experts == 0 or (i + 1) % step != 0]
    if dense:
        raise ValueError(
            f"Qwen2-MoE with dense MLP layers {dense} (num_experts={num_experts}, "
            f"decoder_sparse_step={step}, "
            f"mlp_only_layers={sorted(mlp_only)}) is not supported: every layer must be sparse"
        )
    moe = MoeConfig(
        num_experts=num_experts,
        top_k=int(config_value(config, "num_experts_per_tok")),
        norm_topk_prob=bool(config_value(config, "norm_topk_prob", False)),
        intermediate_size=int(config_value(config, "moe_intermediate_size")),
        shared_expert_intermediate_size=int(config_value(config, "shared_expert_intermediate_size")),
    )
    return DecoderConfig.from_hf(
        config, qkv_bias=bool(config_value(config, "qkv_bias", True)), o_bias=False, moe=moe
    )


def moe_params_from_hf(cfg: DecoderConfig, reader: HFTensorReader, prefix: str) -> Params:
    """One layer's `SparseMoeBlock` params; experts stored per expert or fused (transformers 5)."""
    moe = cfg.moe
    assert moe is not None
    hidden, size, num = cfg.hidden_size, moe.intermediate_size, moe.num_experts
    if reader.has(f"{prefix}experts.gate_up_proj"):
        gate_up = reader.take(f"{prefix}experts.gate_up_proj", (num, 2 * size, hidden)).transpose(0, 2, 1)
        down = reader.take(f"{prefix}experts.down_proj", (num, hidden, size)).transpose(0, 2, 1)
    else:

        def expert(e: int, name: str, rows: int, cols: int) -> np.ndarray:
            return reader.take(f"{prefix}experts.{e}.{name}.weight", (rows, cols)).T

        gate_up = np.stack(
            [
                np.concatenate(
                    [expert(e, "gate_proj", size, hidden), expert(e, "up_proj", size, hidden)], axis=1
                )
                for e in range(num)
            ]
        )
        down = np.stack([expert(e, "down_proj", hidden, size) for e in range(num)])
    return {
        "gate": reader.linear(f"{prefix}gate", hidden, num),
        "experts": {"gate_up_proj": gate_up, "down_proj": down},
        "shared_expert": reader.gated_mlp(
            f"{prefix}shared_expert.", hidden, moe.shared_expert_intermediate_size
        ),
        "shared_expert_gate": reader.linear(f"{prefix}shared_expert_gate", hidden, 1),
    }


class Qwen2MoeForCausalLM(CausalLM):
    """HF `Qwen2MoeForCausalLM`: returns per-layer expert selection counts with the hidden states."""

    architecture = "Qwen2MoeForCausalLM"
    config_from_hf = staticmethod(qwen2_moe_config)
    mlp_factory = staticmethod(sparse_moe_block)
    mlp_params_from_hf = staticmethod(moe_params_from_hf)
