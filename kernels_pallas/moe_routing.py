"""MoE routing (top-k gating, token grouping, expert histogram) and the grouped matmul.

The XLA references here are exact on CPU and GPU and serve as the production
path on CPU. Routing returns everything the expert computation needs: the
chosen experts and weights per token, the permutation that groups the
(token, choice) pairs by expert, each expert's group size, and this call's
per-expert selection counts over the real (non-padding) tokens, which the
model runner adds into a device-resident histogram.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["expert_ids", "weights", "sort_order", "group_sizes", "counts"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class Routing:
    expert_ids: jax.Array  # int32[T, k]
    weights: jax.Array  # float32[T, k]
    sort_order: jax.Array  # int32[T * k]: flat (token, choice) indices grouped by expert
    group_sizes: jax.Array  # int32[E]: pairs per expert, padding tokens included
    counts: jax.Array  # int32[E]: selections by real tokens only


def route_tokens_reference(
    router_logits: jax.Array, valid: jax.Array, *, top_k: int, renormalize: bool
) -> Routing:
    """Softmax over experts, top-k, optional renormalisation (Qwen-MoE's `norm_topk_prob`)."""
    num_experts = router_logits.shape[-1]
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    weights, expert_ids = jax.lax.top_k(probs, top_k)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    flat_ids = expert_ids.reshape(-1)
    sort_order = jnp.argsort(flat_ids, stable=True).astype(jnp.int32)
    group_sizes = jnp.zeros((num_experts,), jnp.int32).at[flat_ids].add(1)
    real = jnp.repeat(valid.astype(jnp.int32), top_k)
    counts = jnp.zeros((num_experts,), jnp.int32).at[flat_ids].add(real)
    return Routing(expert_ids.astype(jnp.int32), weights, sort_order, group_sizes, counts)


def grouped_matmul_reference(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """`lhs[M, K]` sorted by group, `rhs[G, K, N]`, `group_sizes[G]` -> `[M, N]`."""
    return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32).astype(lhs.dtype)
