"""Tensor parallelism for the decoders: which weights each device holds, and in what column order.

The layers are split over the `tp` axis of a device mesh as Megatron splits them, and XLA's SPMD
partitioner inserts the collectives (DESIGN.md, "Scale beyond one device"):

- the fused q/k/v and gate/up kernels by output column (each device computes its own heads and
  its own part of the MLP's intermediate), the o and down projections by input row (each device
  adds its part, and XLA all-reduces the sum): one all-reduce per attention block and one per
  MLP block;
- the KV pool by KV head, so each device keeps the KV of its own heads;
- an untied LM head by vocabulary column, the embedding table by vocabulary row (a lookup reads
  the rows a device holds, zeros elsewhere, and XLA all-reduces the `[T, H]` sum; tied to the LM
  head, each device computes its vocabulary's logits): a vocabulary that does not split evenly
  stays whole;
- a mixture-of-experts layer's experts by intermediate (each device holds every expert's slice,
  as for the dense MLP), or with expert parallelism (`by_expert`, `--ep-size`) by expert (each
  device holds whole experts, a block of E / N); either way the experts run per device under
  `shard_map` and their parts are all-reduced (`models/qwen2_moe.py`), and the shared expert
  splits as a dense MLP;
- the rest (norms, the router, classifier heads) whole on every device.

A fused kernel holds its parts side by side (`[q | k | v]`, `[gate | up]`, each expert's too), so
cutting its columns into equal blocks would hand a device some of q and some of k.
`group_for_shards` reorders the columns so that each device's block is its own parts in order
(`[q_0 k_0 v_0 | q_1 k_1 v_1]`); the model splits a block the same way (`Attention`, `GatedMLP`
with `shards`, an expert's block split in two halves). With one device the order is the
checkpoint's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from models.layers import TP_AXIS, DecoderConfig, Params

# (parent module, leaf) -> the axis, counted from the end, that devices split
_SPLIT_AXIS = {
    ("qkv_proj", "kernel"): -1,
    ("qkv_proj", "bias"): -1,
    ("gate_up_proj", "kernel"): -1,
    ("gate_up_proj", "bias"): -1,
    ("o_proj", "kernel"): -2,
    ("down_proj", "kernel"): -2,
    ("lm_head", "kernel"): -1,
    ("embed_tokens", "embedding"): -2,  # [V, H] by vocabulary row
    ("experts", "gate_up_proj"): -1,  # [E, H, 2I]: each expert's intermediate, as gate_up above
    ("experts", "down_proj"): -2,  # [E, I, H]
}
_BY_EXPERT = {("experts", "gate_up_proj"): -3, ("experts", "down_proj"): -3}  # expert parallelism


def unsupported_reason(cfg: DecoderConfig, shards: int, by_expert: bool = False) -> str | None:
    """Why these layers cannot be split over `shards` devices, or None when they can; `by_expert`:
    MoE experts split by expert (expert parallelism) rather than by intermediate."""
    counts = [
        ("attention heads", cfg.num_heads),
        ("KV heads", cfg.num_kv_heads),
        ("MLP intermediate size", cfg.intermediate_size),
    ]
    if cfg.moe is not None:
        counts += [
            ("experts", cfg.moe.num_experts)
            if by_expert
            else ("experts' intermediate size", cfg.moe.intermediate_size),
            ("shared expert's intermediate size", cfg.moe.shared_expert_intermediate_size),
        ]
    for name, count in counts:
        if count % shards:
            return f"its {name} ({count}) cannot be split evenly over {shards} devices"
    return None


def _group_columns(array: Any, sizes: Sequence[int], shards: int) -> Any:
    """The last axis's parts (`sizes`, side by side) reordered shard by shard: shard s holds the
    s-th 1/shards of each part, in the parts' order."""
    xp = np if isinstance(array, np.ndarray) else jnp
    lead = array.shape[:-1]
    parts = xp.split(array, np.cumsum(sizes)[:-1].tolist(), axis=-1)
    blocks = [part.reshape(*lead, shards, -1) for part in parts]
    return xp.concatenate(blocks, axis=-1).reshape(*lead, -1)


def _fused_parts(names: tuple[str, ...], cfg: DecoderConfig, by_expert: bool) -> list[int] | None:
    """The sizes of the parts side by side in the last axis of the leaf at `names` (keys from the
    tree's root), for a fused kernel a device holds part of; None for any other leaf (whole
    experts, under expert parallelism, keep their order)."""
    head_dim = cfg.head_dim
    if names[-2:] in (("qkv_proj", "kernel"), ("qkv_proj", "bias")):
        return [cfg.num_heads * head_dim, cfg.num_kv_heads * head_dim, cfg.num_kv_heads * head_dim]
    if names[-2:] == ("experts", "gate_up_proj") and cfg.moe is not None:
        return None if by_expert else [cfg.moe.intermediate_size] * 2
    if names[-2:] in (("gate_up_proj", "kernel"), ("gate_up_proj", "bias")):
        shared = cfg.moe is not None and "shared_expert" in names
        size = cfg.moe.shared_expert_intermediate_size if shared else cfg.intermediate_size
        return [size, size]
    return None


def group_for_shards(params: Params, cfg: DecoderConfig, shards: int, by_expert: bool = False) -> Params:
    """A pure parameter tree with its fused kernels' columns grouped for `shards` devices (see the
    module's docstring); the tree as it is for one device. Stacked (`[L, ...]`) or not."""
    if shards == 1:
        return params

    def walk(tree: Any, names: tuple[str, ...]) -> Any:
        if isinstance(tree, dict):
            return {name: walk(value, (*names, name)) for name, value in tree.items()}
        sizes = _fused_parts(names, cfg, by_expert)
        return tree if sizes is None else _group_columns(tree, sizes, shards)

    return walk(params, ())


def partition_spec(
    path: Sequence[Any], shape: Sequence[int], shards: int, by_expert: bool = False
) -> PartitionSpec:
    """How a parameter of `shape` at `path` (keys from the tree's root) is split over the `tp` axis."""
    names = tuple(key.key for key in path if isinstance(key, jax.tree_util.DictKey))  # not nnx's `.value`
    axis = (by_expert and _BY_EXPERT.get(names[-2:])) or _SPLIT_AXIS.get(names[-2:])
    if axis is None or len(shape) < -axis or shape[axis] % shards:
        return PartitionSpec()
    spec: list[str | None] = [None] * len(shape)
    spec[len(shape) + axis] = TP_AXIS
    return PartitionSpec(*spec)


def param_shardings(params: Any, mesh: jax.sharding.Mesh, by_expert: bool = False) -> Any:
    """Each leaf's `NamedSharding` on `mesh`, for a parameter tree (nnx state or pure dict)."""
    shards = mesh.shape[TP_AXIS]
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(mesh, partition_spec(path, leaf.shape, shards, by_expert)), params
    )


def place(tree: Any, shardings: Any) -> Any:
    """`jax.device_put(tree, shardings)`, but a sharding over several hosts' devices (`--nnodes`)
    takes each leaf from this host's own copy: `device_put` would first check that every host
    holds the same values, a collective that every host must join at that moment."""

    def put(leaf: Any, sharding: Any) -> Any:
        if sharding.is_fully_addressable:
            return jax.device_put(leaf, sharding)
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree, shardings)


def tensor_parallel_mesh(shards: int) -> jax.sharding.Mesh | None:
    """A mesh of the first `shards` devices on the `tp` axis; None for one device."""
    if shards == 1:
        return None
    devices = jax.devices()
    if len(devices) < shards:
        hint = (
            f" On a CPU, XLA_FLAGS=--xla_force_host_platform_device_count={shards} makes that many."
            if devices[0].platform == "cpu"
            else ""
        )
        raise ValueError(
            f"--tp-size {shards} needs {shards} devices; this machine has {len(devices)} "
            f"({devices[0].platform}).{hint}"
        )
    return jax.sharding.Mesh(np.array(devices[:shards]), (TP_AXIS,))


def kv_pool_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """The KV pools `[layers, pages, page_size, kv_heads, head_dim]` split by KV head."""
    return NamedSharding(mesh, PartitionSpec(None, None, None, TP_AXIS))  # as XLA writes it back
