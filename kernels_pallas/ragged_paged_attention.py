"""Attention over a flat, ragged token axis that reads K/V from a paged pool.

One call serves a whole scheduled batch: one-token decode rows first, then
prefill chunks (each possibly on top of a cached prefix). The XLA reference
below is the production path on CPU, so it treats the two kinds of rows apart:
decode rows attend without a causal mask, prefill rows are gathered into a
`[prefill_seqs, max_prefill_q_len]` block with a causal mask, and neither pays
for the other's padding. The page gather is bounded by the page-table width,
which the scheduler buckets to the batch's longest sequence.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from kernels_pallas._backend import pl, plgpu, resolve_backend

# Finite, so that a fully masked row gives zeros instead of NaN from (-inf) - (-inf).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["cu_q_lens", "kv_lens", "page_table", "write_slots", "num_tokens"],
    meta_fields=["num_decode_seqs", "max_prefill_q_len"],
)
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Where each token of a flat batch belongs; see docs/architecture.md for the contract."""

    cu_q_lens: jax.Array  # int32[S + 1]
    kv_lens: jax.Array  # int32[S]
    page_table: jax.Array  # int32[S, P]
    write_slots: jax.Array  # int32[T]
    num_tokens: jax.Array  # int32[]
    num_decode_seqs: int
    max_prefill_q_len: int


def write_kv(
    k_pool: jax.Array, v_pool: jax.Array, layer: jax.Array, k: jax.Array, v: jax.Array, meta: AttentionMetadata
) -> tuple[jax.Array, jax.Array]:
    """Scatter one layer's new K/V (`[T, kv_heads, head_dim]`) into their pool slots, in place."""
    num_layers, num_pages, page_size, kv_heads, head_dim = k_pool.shape
    flat_shape = (num_layers, num_pages * page_size, kv_heads, head_dim)
    k_flat = k_pool.reshape(flat_shape).at[layer, meta.write_slots].set(k.astype(k_pool.dtype))
    v_flat = v_pool.reshape(flat_shape).at[layer, meta.write_slots].set(v.astype(v_pool.dtype))
    return k_flat.reshape(k_pool.shape), v_flat.reshape(v_pool.shape)


def _gather_pages(pool: jax.Array, layer: jax.Array, page_table: jax.Array) -> jax.Array:
    """`[S, P]` page ids -> `[S, P * page_size, kv_heads, head_dim]` for one layer."""
    pages = pool[layer, page_table]
    seqs, width, page_size, kv_heads, head_dim = pages.shape
    return pages.reshape(seqs, width * page_size, kv_heads, head_dim)


def _masked_softmax_attend(scores: jax.Array, mask: jax.Array, values: jax.Array, spec: str) -> jax.Array:
    scores = jnp.where(mask, scores, MASK_VALUE)
    peak = jnp.max(scores, axis=-1, keepdims=True)
    weights = jnp.where(mask, jnp.exp(scores - peak), 0.0)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    weights = weights / jnp.where(denom == 0.0, 1.0, denom)
    return jnp.einsum(spec, weights, values.astype(jnp.float32))


def _decode_attention(q, k_pool, v_pool, layer, meta, sm_scale):
    """Rows `[0, num_decode_seqs)`: one query token per sequence, no causal mask needed."""
    num_decode = meta.num_decode_seqs
    kv_heads = k_pool.shape[3]
    q_rows = q[:num_decode].astype(jnp.float32)
    q_rows = q_rows.reshape(num_decode, kv_heads, -1, q.shape[-1])
    page_table = meta.page_table[:num_decode]
    keys = _gather_pages(k_pool, layer, page_table)
    values = _gather_pages(v_pool, layer, page_table)
    scores = jnp.einsum("shgd,skhd->shgk", q_rows, keys.astype(jnp.float32)) * sm_scale
    kv_pos = jnp.arange(keys.shape[1])
    mask = (kv_pos[None, :] < meta.kv_lens[:num_decode, None])[:, None, None, :]
    out = _masked_softmax_attend(scores, mask, values, "shgk,skhd->shgd")
    return out.reshape(num_decode, -1, q.shape[-1])


def _prefill_attention(q, k_pool, v_pool, layer, meta, sm_scale):
    """Sequences after the decode rows: gathered to `[seqs, max_q, ...]`, causal over the cached prefix."""
    num_decode = meta.num_decode_seqs
    max_q = meta.max_prefill_q_len
    num_tokens, num_heads, head_dim = q.shape
    kv_heads = k_pool.shape[3]
    q_start = meta.cu_q_lens[num_decode:-1]
    q_len = meta.cu_q_lens[num_decode + 1 :] - q_start
    kv_lens = meta.kv_lens[num_decode:]
    offsets = jnp.arange(max_q)
    valid_q = offsets[None, :] < q_len[:, None]
    token_index = jnp.where(valid_q, q_start[:, None] + offsets[None, :], num_tokens)
    q_rows = q.at[token_index].get(mode="fill", fill_value=0).astype(jnp.float32)
    q_rows = q_rows.reshape(*token_index.shape, kv_heads, -1, head_dim)
    page_table = meta.page_table[num_decode:]
    keys = _gather_pages(k_pool, layer, page_table)
    values = _gather_pages(v_pool, layer, page_table)
    scores = jnp.einsum("sqhgd,skhd->shgqk", q_rows, keys.astype(jnp.float32)) * sm_scale
    kv_pos = jnp.arange(keys.shape[1])
    q_pos = (kv_lens - q_len)[:, None] + offsets[None, :]
    mask = (kv_pos[None, None, :] <= q_pos[:, :, None]) & valid_q[:, :, None]
    out = _masked_softmax_attend(scores, mask[:, None, None], values, "shgqk,skhd->sqhgd")
    out = out.reshape(*token_index.shape, num_heads, head_dim)
    return token_index, out


def ragged_paged_attention_reference(
    q: jax.Array,
    k_pool: jax.Array,
    v_pool: jax.Array,
    layer: jax.Array,
    meta: AttentionMetadata,
    sm_scale: float,
) -> jax.Array:
    """XLA reference: `q[T, q_heads, head_dim]` -> `[T, q_heads, head_dim]`; padding rows give zeros."""
    num_tokens, num_heads, head_dim = q.shape
    out = jnp.zeros((num_tokens, num_heads, head_dim), jnp.float32)
    if meta.num_decode_seqs > 0:
        out = out.at[: meta.num_decode_seqs].set(_decode_attention(q, k_pool, v_pool, layer, meta, sm_scale))
    if meta.page_table.shape[0] > meta.num_decode_seqs and meta.max_prefill_q_len > 0:
        token_index, rows = _prefill_attention(q, k_pool, v_pool, layer, meta, sm_scale)
        out = out.at[token_index].set(rows, mode="drop")
    return out.astype(q.dtype)
