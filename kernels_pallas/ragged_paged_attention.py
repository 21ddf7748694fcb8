"""Attention over a flat, ragged token axis that reads K/V from a paged pool.

One call serves a whole scheduled batch: one-token decode rows first, then
prefill chunks (each possibly on top of a cached prefix). The XLA reference
below is the production path on CPU, so it treats the two kinds of rows apart:
decode rows attend without a causal mask, prefill rows are gathered into a
`[prefill_seqs, max_prefill_q_len]` block with a causal mask, and neither pays
for the other's padding. The page gather is bounded by the page-table width,
which the scheduler buckets to the batch's longest sequence.

`ragged_paged_attention_mgpu` is the Mosaic GPU kernel with the same contract
(Hopper: wgmma, TMA, a producer warpgroup), and `ragged_paged_attention` the
dispatcher the models call: the kernel on a GPU with JAX >= 0.11, the
reference elsewhere. Design and testing: docs/kernels.md.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from kernels_pallas._backend import pl, plgpu, resolve_backend, sm_count
from kernels_pallas.float32_parts import (
    SPLIT_PARTS,
    as_operands,
    as_operands_outside_kernel,
    num_parts,
    operand_dtype,
    product_terms,
    swizzled,
)
from kernels_pallas.pool_storage import from_pool, to_pool

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
    k_pool: jax.Array,
    v_pool: jax.Array,
    layer: jax.Array,
    k: jax.Array,
    v: jax.Array,
    meta: AttentionMetadata,
) -> tuple[jax.Array, jax.Array]:
    """Scatter one layer's new K/V (`[T, kv_heads, head_dim]`) into their pool slots, in place.

    Indexed by (layer, page, offset) on the pool's own shape: a reshape around the
    scatter lets XLA's CPU backend turn a one-token write into whole-pool copies.
    """
    page_size = k_pool.shape[2]
    pages, offsets = meta.write_slots // page_size, meta.write_slots % page_size
    k_pool = k_pool.at[layer, pages, offsets].set(to_pool(k, k_pool.dtype), mode="promise_in_bounds")
    v_pool = v_pool.at[layer, pages, offsets].set(to_pool(v, v_pool.dtype), mode="promise_in_bounds")
    return k_pool, v_pool


def _gather_pages(pool: jax.Array, layer: jax.Array, page_table: jax.Array) -> jax.Array:
    """`[S, P]` page ids -> `[S, P * page_size, kv_heads, head_dim]` for one layer."""
    pages = from_pool(pool[layer, page_table])
    seqs, width, page_size, kv_heads, head_dim = pages.shape
    return pages.reshape(seqs, width * page_size, kv_heads, head_dim)


def _softmax_parts(scores: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`exp(scores - peak)` where `mask` holds (0 elsewhere), and its sum over the last axis.

    The caller divides the value product by the sum: that touches head_dim numbers
    per query instead of one per key (batch-32 decode attention at 300 tokens of
    context, 30 layers: 38 -> 37 ms on the 2-core box). A fully masked row (a padding
    sequence) sums to 1 instead of 0, so it gives zeros instead of NaN.
    """
    scores = jnp.where(mask, scores, MASK_VALUE)
    peak = jnp.max(scores, axis=-1, keepdims=True)
    weights = jnp.where(mask, jnp.exp(scores - peak), 0.0)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    return weights, jnp.where(denom == 0.0, 1.0, denom)


# Up to this many decode rows, decode attention reads K/V in the pages' own layout (see below).
FEW_DECODE_ROWS = 2


def _decode_attention(q, k_pool, v_pool, layer, meta, sm_scale):
    """Rows `[0, num_decode_seqs)`: one query token per sequence, no causal mask needed.

    The gathered keys are the left operand (`K . q`, scores as `[seqs, kv_heads,
    keys, group]`): XLA then moves whole head_dim rows of K into the batched
    layout instead of transposing K element by element into a right operand.
    """
    num_decode = meta.num_decode_seqs
    if num_decode <= FEW_DECODE_ROWS:
        return _decode_attention_few_rows(q, k_pool, v_pool, layer, meta, sm_scale)
    kv_heads, head_dim = k_pool.shape[3], q.shape[-1]
    q_rows = q[:num_decode].astype(jnp.float32).reshape(num_decode, kv_heads, -1, head_dim)
    page_table = meta.page_table[:num_decode]
    keys = _gather_pages(k_pool, layer, page_table).astype(jnp.float32)  # [seqs, kv_len, kv_heads, d]
    values = _gather_pages(v_pool, layer, page_table).astype(jnp.float32)
    scores = lax.dot_general(keys, q_rows, (((3,), (3,)), ((0, 2), (0, 1)))) * sm_scale
    visible = jnp.arange(keys.shape[1])[None, :] < meta.kv_lens[:num_decode, None]
    weights, denom = _softmax_parts(jnp.swapaxes(scores, 2, 3), visible[:, None, None, :])
    out = lax.dot_general(weights, values, (((3,), (1,)), ((0, 1), (0, 2))))  # [seqs, kv_heads, group, d]
    return (out / denom).reshape(num_decode, -1, head_dim)


def _decode_attention_few_rows(q, k_pool, v_pool, layer, meta, sm_scale):
    """Decode rows of a batch of at most FEW_DECODE_ROWS, with K/V in the pages' own layout.

    The gathered pages are used as `[seqs, kv_len * kv_heads, head_dim]` (a plain
    copy, no transpose into a per-head batched layout), every q head scores
    against every kv head's keys, and the softmax masks out the other heads.
    That is kv_heads times the score and value FLOPs, which at one or two rows
    costs less than the transposes: on the 2-core box (SmolLM2-135M) a batch-1
    decode step at 256 tokens of context 20 -> 18 ms, at 1024 tokens 29 -> 20 ms;
    from four rows on the batched layout wins.
    """
    num_decode = meta.num_decode_seqs
    num_heads, head_dim = q.shape[1:]
    kv_heads = k_pool.shape[3]
    page_table = meta.page_table[:num_decode]
    kv_len = page_table.shape[1] * k_pool.shape[2]
    keys = _gather_pages(k_pool, layer, page_table).astype(jnp.float32).reshape(num_decode, -1, head_dim)
    values = _gather_pages(v_pool, layer, page_table).astype(jnp.float32).reshape(num_decode, -1, head_dim)
    q_rows = q[:num_decode].astype(jnp.float32)
    scores = lax.dot_general(q_rows, keys, (((2,), (2,)), ((0,), (0,)))) * sm_scale  # [seqs, heads, keys]
    scores = scores.reshape(num_decode, kv_heads, -1, kv_len * kv_heads)  # keys: (position, kv head)
    own_head = jnp.arange(kv_heads)[:, None] == jnp.arange(kv_heads)[None, :]
    visible = jnp.arange(kv_len)[None, :] < meta.kv_lens[:num_decode, None]
    mask = (visible[:, None, :, None] & own_head[None, :, None, :]).reshape(num_decode, kv_heads, 1, -1)
    weights, denom = _softmax_parts(scores, mask)
    weights = weights.reshape(num_decode, num_heads, kv_len * kv_heads)
    out = lax.dot_general(weights, values, (((2,), (1,)), ((0,), (0,))))  # [seqs, heads, d]
    return out / denom.reshape(num_decode, num_heads, 1)


def _batched_matmul(a: jax.Array, b: jax.Array, contract_b: int) -> jax.Array:
    """`a[S, H, M, K]` times `b[S, H, ...]` (contracting its axis `contract_b`), batched over (S, H)."""
    return lax.dot_general(a, b, (((3,), (contract_b,)), ((0, 1), (0, 1))))


def _right_aligned_pages(
    page_table: jax.Array, kv_lens: jax.Array, page_size: int
) -> tuple[jax.Array, jax.Array]:
    """Each row's page ids shifted so that its last page is the table's last column, and the
    position of column 0's first token (negative where the columns run before the sequence)."""
    width = page_table.shape[1]
    first = (kv_lens - 1) // page_size - (width - 1)
    columns = first[:, None] + jnp.arange(width)[None, :]
    pages = jnp.take_along_axis(page_table, jnp.clip(columns, 0, width - 1), axis=1)
    return pages, first * page_size


def causal_blocks(max_q: int) -> list[tuple[int, int]]:
    """The query blocks a prefill chunk of `max_q` rows is split into, as `(start, stop)` rows.

    A block attends only to the keys that some query of it can see, so the causal
    triangle is skipped block by block. Blocks of 256 rows or more, at most 8: a
    2048-token prompt on the 2-core box spent two thirds of its prefill step in
    attention over the whole square before.
    """
    count = max(
        (n for n in range(1, min(8, max_q // 256) + 1) if max_q % n == 0),
        default=1,
    )
    size = max_q // count
    return [(i * size, (i + 1) * size) for i in range(count)]


def _prefill_attention(q, k_pool, v_pool, layer, meta, sm_scale):
    """Sequences after the decode rows, as `[T, q_heads, head_dim]` (zeros on every other row).

    Each sequence's chunk is gathered into a `[seqs, kv_heads, max_q * group, head_dim]`
    block (the layout XLA's batched matmul takes without transposing the scores) and
    attends causally over its cached prefix. The rows come back by a gather from each
    token to its (sequence, offset): XLA's CPU scatter is element by element.

    Queries and keys are both right-aligned: a chunk's last token is row `max_q - 1`, and a
    sequence's last page is the gathered keys' last page. Row `r` then sees no key past
    `width - max_q + r`, whatever the sequence's prefix and chunk lengths, so each block of
    rows (`causal_blocks`) multiplies against a static prefix of the keys.
    """
    num_decode = meta.num_decode_seqs
    max_q = meta.max_prefill_q_len
    num_tokens, num_heads, head_dim = q.shape
    page_size, kv_heads = k_pool.shape[2], k_pool.shape[3]
    group = num_heads // kv_heads
    cu_q_lens = meta.cu_q_lens[num_decode:]
    kv_lens = meta.kv_lens[num_decode:]
    q_start = cu_q_lens[:-1]
    q_len = cu_q_lens[1:] - q_start
    seqs = q_start.shape[0]
    rows = jnp.arange(max_q)
    pad_rows = max_q - q_len
    real_row = rows[None, :] >= pad_rows[:, None]
    token_index = jnp.where(real_row, q_start[:, None] + rows[None, :] - pad_rows[:, None], num_tokens)
    q_rows = q.at[token_index].get(mode="fill", fill_value=0).astype(jnp.float32)
    q_rows = q_rows * sm_scale  # on the queries: the scale on the scores took a pass over them
    q_rows = q_rows.reshape(seqs, max_q, kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
    q_rows = q_rows.reshape(seqs, kv_heads, max_q * group, head_dim)
    page_table, first_position = _right_aligned_pages(meta.page_table[num_decode:], kv_lens, page_size)
    keys = _gather_pages(k_pool, layer, page_table).astype(jnp.float32).transpose(0, 2, 1, 3)
    values = _gather_pages(v_pool, layer, page_table).astype(jnp.float32).transpose(0, 2, 1, 3)
    width = keys.shape[2]
    q_pos = kv_lens[:, None] - max_q + rows[None, :]
    key_pos = first_position[:, None] + jnp.arange(width)[None, :]
    blocks = []
    for start, stop in causal_blocks(max_q):
        limit = width - (max_q - stop)
        if limit <= 0:  # rows this far ahead of every chunk's end are padding
            blocks.append(jnp.zeros((seqs, kv_heads, (stop - start) * group, head_dim), jnp.float32))
            continue
        seen = key_pos[:, None, :limit]
        mask = (seen <= q_pos[:, start:stop, None]) & (seen >= 0) & real_row[:, start:stop, None]
        mask = jnp.repeat(mask, group, axis=1)[:, None]
        block_q = q_rows[:, :, start * group : stop * group]
        scores = _batched_matmul(block_q, keys[:, :, :limit], contract_b=3)
        weights, denom = _softmax_parts(scores, mask)
        blocks.append(_batched_matmul(weights, values[:, :, :limit], contract_b=2) / denom)
    out = jnp.concatenate(blocks, axis=2)
    out = out.reshape(seqs, kv_heads, max_q, group, head_dim).transpose(0, 2, 1, 3, 4)
    out = out.reshape(seqs, max_q, num_heads, head_dim)

    tokens = jnp.arange(num_tokens)
    seq_of_token = jnp.minimum(jnp.sum(cu_q_lens[None, 1:] <= tokens[:, None], axis=1), seqs - 1)
    offset_of_token = tokens - q_start[seq_of_token]
    in_chunk = (tokens >= cu_q_lens[0]) & (offset_of_token < q_len[seq_of_token])
    row_of_token = jnp.clip(offset_of_token + pad_rows[seq_of_token], 0, max_q - 1)
    return jnp.where(in_chunk[:, None, None], out[seq_of_token, row_of_token], 0.0)


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
    if meta.page_table.shape[0] > meta.num_decode_seqs and meta.max_prefill_q_len > 0:
        out = _prefill_attention(q, k_pool, v_pool, layer, meta, sm_scale)
    else:
        out = jnp.zeros((num_tokens, num_heads, head_dim), jnp.float32)
    if meta.num_decode_seqs > 0:
        out = out.at[: meta.num_decode_seqs].set(_decode_attention(q, k_pool, v_pool, layer, meta, sm_scale))
    return out.astype(q.dtype)


# ----------------------------------------------------------------------------- Mosaic GPU kernel
#
# One launch serves the whole batch. XLA turns the metadata into a work list of
# (sequence, kv head, query tile) items; a persistent grid of `num_ctas` CTAs
# walks it round-robin, longest item first. A tile stacks (query token, q head
# of the kv head's group) into the 64 rows that wgmma's M needs, so a decode row
# with GQA ratio 8 fills 8 rows and a prefill chunk fills 64 // ratio tokens.
# Each item streams its KV in blocks of `block_kv` tokens, gathered page by page
# from the pool by TMA into a ring of SMEM slots that a producer warpgroup keeps
# full across item boundaries, and runs an online softmax in f32. Q tiles are
# gathered into a padded `[items, 64, head_dim]` buffer by XLA and the output
# comes back the same way; both are small next to the KV they read. Float32
# inputs run as bfloat16 parts (float32_parts.py): Q split by XLA (from its bits), each KV
# block and P split by the consumer into SMEM, six wgmmas per product.

# Columns of the int32 work table read by the kernel.
_W_SEQ, _W_KV_HEAD, _W_BASE, _W_Q_COUNT, _W_FULL_BLOCKS, _W_BLOCKS, _W_VALID = range(7)
_WORK_COLUMNS = 7
TILE_ROWS = 64  # wgmma's M granule on Hopper
KERNEL_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Plan:
    """The work list and the index maps that move Q into tiles and the output back."""

    work: jax.Array  # int32[items, _WORK_COLUMNS], real items first
    q_rows: jax.Array  # int32[items, TILE_ROWS, 2]: (token, q head) per tile row; token T = padding
    out_items: jax.Array  # int32[T, q_heads]: work item holding each output row, -1 for padding tokens
    out_rows: jax.Array  # int32[T, q_heads]: the row inside that item


def _plan_work(
    meta: AttentionMetadata, num_tokens: int, num_heads: int, kv_heads: int, block_kv: int
) -> _Plan:
    """Build the work list in XLA; every size here is static (bucketed T, S and page-table width)."""
    group = num_heads // kv_heads
    tile_tokens = TILE_ROWS // group
    num_seqs = meta.kv_lens.shape[0]
    cu = meta.cu_q_lens.astype(jnp.int32)
    q_len = cu[1:] - cu[:-1]
    kv_len = meta.kv_lens.astype(jnp.int32)
    tiles_per_seq = jnp.where(q_len > 0, (q_len + tile_tokens - 1) // tile_tokens, 0)
    tile_end = jnp.cumsum(tiles_per_seq)
    tile_begin = tile_end - tiles_per_seq
    # Sum over sequences of ceil(q_len / tile_tokens) is at most this bound.
    max_tiles = max(1, (num_tokens + num_seqs * (tile_tokens - 1)) // tile_tokens)
    tile = jnp.arange(max_tiles, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(tile_end, tile, side="right"), num_seqs - 1).astype(jnp.int32)
    valid = tile < tile_end[-1]
    q_start = (tile - tile_begin[seq]) * tile_tokens
    q_count = jnp.clip(q_len[seq] - q_start, 0, tile_tokens)
    base = kv_len[seq] - q_len[seq] + q_start  # last kv position row-token 0 may see
    blocks = jnp.where(valid, jnp.maximum(base + q_count + block_kv - 1, 0) // block_kv, 0)
    full_blocks = jnp.clip((base + 1) // block_kv, 0, blocks)

    # Items in canonical order (tile-major, kv head minor), then longest first; padding items last, so
    # each CTA's share (items cta, cta + num_ctas, ...) is real items, then padding.
    per_head = lambda x: jnp.repeat(x, kv_heads)
    heads = jnp.tile(jnp.arange(kv_heads, dtype=jnp.int32), max_tiles)
    columns = [
        per_head(seq),
        heads,
        per_head(base),
        per_head(q_count),
        per_head(full_blocks),
        per_head(blocks),
        per_head(valid.astype(jnp.int32)),
    ]
    work = jnp.stack(columns, axis=1).astype(jnp.int32)
    cost = jnp.where(work[:, _W_VALID] > 0, work[:, _W_BLOCKS] + 1, 0)
    order = jnp.argsort(-cost, stable=True)
    work = work[order]
    num_items = max_tiles * kv_heads
    position = jnp.zeros((num_items,), jnp.int32).at[order].set(jnp.arange(num_items, dtype=jnp.int32))

    # Q tile rows: row r of an item is token q_start + r // group, head kv_head * group + r % group.
    row = jnp.arange(TILE_ROWS, dtype=jnp.int32)
    item_tile = order // kv_heads
    item_head = work[:, _W_KV_HEAD]
    row_token = cu[seq][item_tile][:, None] + q_start[item_tile][:, None] + row[None, :] // group
    row_live = (work[:, _W_VALID, None] > 0) & (row[None, :] // group < work[:, _W_Q_COUNT, None])
    row_live &= row[None, :] < tile_tokens * group
    row_head = item_head[:, None] * group + row[None, :] % group
    q_rows = jnp.stack([jnp.where(row_live, row_token, num_tokens), row_head], axis=-1)

    # Output row of each (token, q head).
    token = jnp.arange(num_tokens, dtype=jnp.int32)
    token_seq = jnp.minimum(jnp.searchsorted(cu[1:], token, side="right"), num_seqs - 1)
    offset = token - cu[token_seq]
    token_tile = tile_begin[token_seq] + offset // tile_tokens
    head = jnp.arange(num_heads, dtype=jnp.int32)
    canonical = token_tile[:, None] * kv_heads + head[None, :] // group
    out_items = jnp.where((token < cu[-1])[:, None], position[jnp.clip(canonical, 0, num_items - 1)], -1)
    out_rows = (offset % tile_tokens)[:, None] * group + head[None, :] % group
    return _Plan(work, q_rows.astype(jnp.int32), out_items, out_rows)


def _attention_kernel_body(
    work_ref: Any,
    page_table_ref: Any,
    layer_ref: Any,
    q_tiles_ref: Any,
    k_pool_ref: Any,
    v_pool_ref: Any,
    out_ref: Any,
    q_smem: Any,
    k_smem: Any,
    v_smem: Any,
    p_smem: Any,
    o_smem: Any,
    q_barriers: Any,
    q_free: Any,
    k_barriers: Any,
    v_barriers: Any,
    kv_free: Any,
    *split_smem: Any,
    sm_scale: float,
    group: int,
    block_kv: int,
    num_stages: int,
    num_ctas: int,
) -> None:
    """One CTA walks work items `cta, cta + num_ctas, ...` with two warpgroups.

    Warpgroup 1 (the producer) only issues TMA: each item's Q tile into one of
    two Q buffers, and the KV blocks of all its items, in order, into a ring of
    `num_stages` slots, waiting for a slot to be freed before reusing it. So
    the next item's Q and first KV blocks load while this item computes, and a
    short decode item does not start cold. Warpgroup 0 (the consumer) runs the
    wgmmas and the online softmax, and frees each buffer when done with it.
    Both walk the same work table, so they agree on every item's block count.

    For float32 (`split_smem` holds K and V part buffers) the consumer also
    splits each KV block into bfloat16 parts in SMEM before its wgmmas, and Q
    arrives already split (`q_smem` is `[2, parts, rows, head_dim]`).
    """
    head_dim = q_smem.shape[-1]
    page_size = k_pool_ref.shape[2]
    table_width = page_table_ref.shape[1]
    rows_per_copy = min(page_size, block_kv)
    copies_per_block = block_kv // rows_per_copy
    blocks_per_page = max(1, page_size // block_kv)
    dtype = k_pool_ref.dtype
    terms = product_terms(dtype)
    cta = lax.axis_index("cta")
    num_items = work_ref.shape[0]
    rounds = -(-num_items // num_ctas)
    stages = jnp.int32(num_stages)

    def item_of(round_index):
        """This CTA's item of a round, a row of the work table to read, and whether it is real."""
        item = round_index * num_ctas + cta
        row = jnp.minimum(item, num_items - 1)
        return row, (item < num_items) & (work_ref[row, _W_VALID] != 0)

    @pl.when(lax.axis_index("wg") == 1)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")
        layer = layer_ref[0]

        def issue_kv_block(seq, kv_head, block, slot):
            """TMA one block of K and V (`copies_per_block` page pieces) into `slot`."""
            for copy in range(copies_per_block):
                if blocks_per_page == 1:
                    column = block * copies_per_block + copy
                    offset = 0
                else:
                    column = block // blocks_per_page
                    offset = (block % blocks_per_page) * block_kv
                # Columns past the table only cover kv positions >= kv_len (masked): keep reads in bounds.
                page = page_table_ref[seq, jnp.minimum(column, table_width - 1)]
                source = (layer, page, pl.ds(offset, rows_per_copy), kv_head)
                target = (slot, pl.ds(copy * rows_per_copy, rows_per_copy))
                plgpu.copy_gmem_to_smem(k_pool_ref.at[source], k_smem.at[target], k_barriers.at[slot])
                plgpu.copy_gmem_to_smem(v_pool_ref.at[source], v_smem.at[target], v_barriers.at[slot])

        def produce_item(round_index, counts):
            issued, items = counts
            item, live = item_of(round_index)
            q_slot = lax.rem(round_index, 2)
            blocks = jnp.where(live, work_ref[item, _W_BLOCKS], 0)

            @pl.when(live)
            def _issue():
                # Real items come first, so round_index - 2 was real and its consumer frees this buffer.
                @pl.when(round_index >= 2)
                def _():
                    plgpu.barrier_wait(q_free.at[q_slot])

                plgpu.copy_gmem_to_smem(q_tiles_ref.at[item], q_smem.at[q_slot], q_barriers.at[q_slot])
                seq = work_ref[item, _W_SEQ]
                kv_head = work_ref[item, _W_KV_HEAD]

                @pl.loop(0, blocks)
                def _blocks(block):
                    count = issued + block
                    slot = lax.rem(count, stages)

                    @pl.when(count >= num_stages)
                    def _():
                        plgpu.barrier_wait(kv_free.at[slot])

                    issue_kv_block(seq, kv_head, block, slot)

            return issued + blocks, items + live.astype(jnp.int32)

        issued, items = lax.fori_loop(0, rounds, produce_item, (jnp.int32(0), jnp.int32(0)))

        # Observe the consumer's last releases, so that no barrier phase is left unobserved at exit
        # (the GPU interpreter checks this; on hardware it costs the idle producer nothing).
        @pl.loop(jnp.maximum(issued - num_stages, 0), issued)
        def _drain_kv(count):
            plgpu.barrier_wait(kv_free.at[lax.rem(count, stages)])

        @pl.loop(jnp.maximum(items - 2, 0), items)
        def _drain_q(round_index):
            plgpu.barrier_wait(q_free.at[lax.rem(round_index, 2)])

    def block_operands(ring_slot: Any, which: int) -> list[Any]:
        """A KV block as wgmma operands: the ring slot, or (float32) its bfloat16 parts in SMEM."""
        if not split_smem:
            return [ring_slot]
        parts_ref = split_smem[which]
        block = plgpu.load(ring_slot, layout=plgpu.Layout.WGMMA)
        for i, part in enumerate(as_operands(block, dtype)):
            parts_ref.at[i][...] = part
        plgpu.commit_smem()
        return [parts_ref.at[i] for i in range(SPLIT_PARTS)]

    @pl.when(lax.axis_index("wg") == 0)
    def _consumer():
        plgpu.set_max_registers(232, action="increase")

        def consume_item(round_index, consumed):
            item, live = item_of(round_index)
            q_slot = lax.rem(round_index, 2)
            base = work_ref[item, _W_BASE]
            full_blocks = work_ref[item, _W_FULL_BLOCKS]
            blocks = jnp.where(live, work_ref[item, _W_BLOCKS], 0)

            @pl.when(live)
            def _compute():
                tile_q = q_smem.at[q_slot]
                plgpu.barrier_wait(q_barriers.at[q_slot])

                def kv_step(block, carry, *, masked: bool):
                    acc, row_max, row_sum = carry
                    slot = lax.rem(consumed + block, stages)
                    plgpu.barrier_wait(k_barriers.at[slot])
                    k_parts = block_operands(k_smem.at[slot], 0)

                    def scores_scope(acc_ref):
                        for i, j in terms:
                            plgpu.wgmma(acc_ref, tile_q.at[i], k_parts[j].transpose((1, 0)))
                        return acc_ref[...]

                    scores = pl.run_scoped(scores_scope, plgpu.ACC((TILE_ROWS, block_kv), jnp.float32))
                    scores = scores * sm_scale
                    if masked:
                        shape = (TILE_ROWS, block_kv)
                        row = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
                        col = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
                        kv_pos = col + block * block_kv
                        row_token = lax.div(row, jnp.int32(group))
                        # A real row's causal limit is below kv_len, so this also masks the tail past kv_len.
                        # Padding rows (zero queries) see finite garbage; their rows are never gathered.
                        visible = kv_pos <= base + row_token
                        scores = jnp.where(visible, scores, MASK_VALUE)
                    new_max = jnp.maximum(row_max, scores.max(axis=1))
                    rescale = jnp.exp(row_max - new_max)
                    probs = jnp.exp(scores - lax.broadcast_in_dim(new_max, scores.shape, [0]))
                    if masked:
                        probs = jnp.where(visible, probs, 0.0)
                    row_sum = row_sum * rescale + probs.sum(axis=1)
                    # wgmma takes A from SMEM here (the GPU interpreter cannot run a register LHS).
                    for i, part in enumerate(as_operands(probs, dtype)):
                        p_smem.at[i][...] = part
                    plgpu.barrier_wait(v_barriers.at[slot])
                    v_parts = block_operands(v_smem.at[slot], 1)  # its commit covers P too
                    if not split_smem:
                        plgpu.commit_smem()

                    def values_scope(acc_ref):
                        for i, j in terms:
                            plgpu.wgmma(acc_ref, p_smem.at[i], v_parts[j])
                        return acc_ref[...]

                    block_out = pl.run_scoped(values_scope, plgpu.ACC((TILE_ROWS, head_dim), jnp.float32))
                    plgpu.barrier_arrive(kv_free.at[slot])  # both wgmmas on this slot have completed
                    acc = acc * lax.broadcast_in_dim(rescale, acc.shape, [0]) + block_out
                    return acc, new_max, row_sum

                rows_layout = plgpu.Layout.WGMMA.reduce(1)
                carry = (
                    plgpu.layout_cast(jnp.zeros((TILE_ROWS, head_dim), jnp.float32), plgpu.Layout.WGMMA),
                    plgpu.layout_cast(jnp.full((TILE_ROWS,), MASK_VALUE, jnp.float32), rows_layout),
                    plgpu.layout_cast(jnp.zeros((TILE_ROWS,), jnp.float32), rows_layout),
                )
                # Blocks every row of the tile sees in full need no mask; the causal edge and the tail do.
                unmasked_step = functools.partial(kv_step, masked=False)
                masked_step = functools.partial(kv_step, masked=True)
                carry = lax.fori_loop(0, full_blocks, unmasked_step, carry)
                acc, _, row_sum = lax.fori_loop(full_blocks, blocks, masked_step, carry)
                plgpu.barrier_arrive(q_free.at[q_slot])
                # A row that sees nothing (metadata with kv_len < q_len) has row_sum 0: zeros, as in XLA.
                row_sum = jnp.where(row_sum == 0.0, 1.0, row_sum)
                out = acc / lax.broadcast_in_dim(row_sum, acc.shape, [0])
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous item's store has left o_smem
                o_smem[...] = out.astype(o_smem.dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_smem, out_ref.at[item])

            return consumed + blocks

        lax.fori_loop(0, rounds, consume_item, jnp.int32(0))
        plgpu.wait_smem_to_gmem(0)


# H100's 227 KiB of SMEM per block, less room for barriers and Mosaic's reduction scratch.
SMEM_BUDGET = 227 * 1024 - 4096


def _smem_bytes(head_dim: int, dtype: Any, block_kv: int, num_stages: int) -> int:
    """Two Q tiles, the K and V rings, the P tile and the output tile (float32: Q, P and the K/V parts)."""
    itemsize, operand = jnp.dtype(dtype).itemsize, operand_dtype(dtype).itemsize
    parts = num_parts(dtype)
    rings = 2 * num_stages * block_kv * head_dim * itemsize
    split = 2 * parts * block_kv * head_dim * operand if parts > 1 else 0
    tiles = parts * operand * (2 * TILE_ROWS * head_dim + TILE_ROWS * block_kv)
    return rings + split + tiles + TILE_ROWS * head_dim * itemsize


def _default_stages(head_dim: int, dtype: Any, block_kv: int) -> int:
    """Three KV blocks in flight where SMEM allows, else two."""
    return 3 if _smem_bytes(head_dim, dtype, block_kv, 3) <= SMEM_BUDGET else 2


def kernel_unsupported_reason(
    q: jax.Array, k_pool: jax.Array, block_kv: int = 64, num_stages: int | None = None
) -> str:
    """Why the Mosaic GPU kernel cannot take these inputs ('' when it can); the dispatcher then uses XLA."""
    num_heads, head_dim = q.shape[1:]
    page_size, kv_heads = k_pool.shape[2:4]
    if q.dtype not in KERNEL_DTYPES or k_pool.dtype != q.dtype:
        return f"needs bfloat16/float16/float32 q and pools of the same dtype, got {q.dtype}/{k_pool.dtype}"
    if head_dim % 64:
        return f"needs head_dim % 64 == 0 (128-byte swizzled SMEM rows), got {head_dim}"
    if page_size % 8 or (block_kv % page_size and page_size % block_kv):
        return f"needs page_size % 8 == 0, dividing or divided by block_kv {block_kv}; got {page_size}"
    num_stages = num_stages or _default_stages(head_dim, q.dtype, block_kv)
    if _smem_bytes(head_dim, q.dtype, block_kv, num_stages) > SMEM_BUDGET:
        return f"needs more than {SMEM_BUDGET} bytes of SMEM at head_dim {head_dim}, {num_stages} stages"
    if num_heads % kv_heads or num_heads // kv_heads > TILE_ROWS:
        return f"needs q_heads a multiple of kv_heads with ratio <= {TILE_ROWS}, got {num_heads}/{kv_heads}"
    return ""


def ragged_paged_attention_mgpu(
    q: jax.Array,
    k_pool: jax.Array,
    v_pool: jax.Array,
    layer: jax.Array,
    meta: AttentionMetadata,
    sm_scale: float,
    *,
    interpret: Any = None,
    num_ctas: int | None = None,
    block_kv: int = 64,
    num_stages: int | None = None,
) -> jax.Array:
    """Mosaic GPU kernel with the reference's contract; `interpret=plgpu.InterpretGPUParams()` runs it on CPU.

    `num_ctas` is the persistent grid (default: the GPU's SM count, 132 on an
    H100 SXM); tests pass 2-4. `num_stages` KV blocks are in flight per CTA
    (default: 3 where SMEM allows, else 2).
    """
    reason = kernel_unsupported_reason(q, k_pool, block_kv, num_stages)
    if reason:
        raise ValueError(f"ragged_paged_attention_mgpu {reason}")
    num_tokens, num_heads, head_dim = q.shape
    num_stages = num_stages or _default_stages(head_dim, q.dtype, block_kv)
    if block_kv % 64 or num_stages < 2:
        raise ValueError(f"need block_kv % 64 == 0 and num_stages >= 2, got {block_kv}, {num_stages}")
    num_ctas = num_ctas or sm_count()
    kv_heads = k_pool.shape[3]
    group = num_heads // kv_heads
    plan = _plan_work(meta, num_tokens, num_heads, kv_heads, block_kv)
    q_tiles = q.at[plan.q_rows[..., 0], plan.q_rows[..., 1]].get(mode="fill", fill_value=0)
    q_tiles = jnp.stack(as_operands_outside_kernel(q_tiles, q.dtype), axis=1)  # [items, parts, rows, D]
    num_items, parts = q_tiles.shape[:2]
    parts_dtype = operand_dtype(q.dtype)
    copies_per_block = block_kv // min(k_pool.shape[2], block_kv)
    body = functools.partial(
        _attention_kernel_body,
        sm_scale=float(sm_scale),
        group=group,
        block_kv=block_kv,
        num_stages=num_stages,
        num_ctas=num_ctas,
    )
    kv_buffer = plgpu.SMEM((num_stages, block_kv, head_dim), q.dtype, transforms=swizzled(q.dtype))
    kv_barriers = plgpu.Barrier(num_arrivals=copies_per_block, num_barriers=num_stages)
    operand_smem = functools.partial(plgpu.SMEM, dtype=parts_dtype, transforms=swizzled(parts_dtype))
    two_tiles = operand_smem((2, parts, TILE_ROWS, head_dim))
    kv_parts = operand_smem((parts, block_kv, head_dim))
    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((num_items, TILE_ROWS, head_dim), q.dtype),
        scratch_types=[
            two_tiles,
            kv_buffer,
            kv_buffer,
            operand_smem((parts, TILE_ROWS, block_kv)),
            plgpu.SMEM((TILE_ROWS, head_dim), q.dtype, transforms=swizzled(q.dtype)),
            plgpu.Barrier(num_barriers=2),
            plgpu.Barrier(num_barriers=2),
            kv_barriers,
            kv_barriers,
            plgpu.Barrier(num_barriers=num_stages),
            *([kv_parts, kv_parts] if parts > 1 else []),
        ],
        grid=(num_ctas,),
        grid_names=("cta",),
        num_threads=2,
        thread_name="wg",
        # Fast exp (ex2.approx): its ~2e-7 relative error is below bf16's rounding of P, and below
        # the 1e-5 the float32 split path is held to.
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
    )
    layer_array = jnp.asarray(layer, jnp.int32).reshape(1)
    out_tiles = kernel(plan.work, meta.page_table.astype(jnp.int32), layer_array, q_tiles, k_pool, v_pool)
    out = out_tiles.at[plan.out_items, plan.out_rows].get(mode="fill", fill_value=0)
    return jnp.where((plan.out_items >= 0)[..., None], out, 0).astype(q.dtype)


def ragged_paged_attention(
    q: jax.Array,
    k_pool: jax.Array,
    v_pool: jax.Array,
    layer: jax.Array,
    meta: AttentionMetadata,
    sm_scale: float,
    backend: str = "auto",
) -> jax.Array:
    """Attention for one flat batch: the Mosaic GPU kernel on a GPU with JAX >= 0.11, else the reference.

    backend: "auto" (pick), "pallas" (the kernel; falls back to the reference
    with a one-line warning where it cannot run), "reference" (XLA).
    "auto" gives decode-only steps to the reference: on an H200 the kernel
    was 1.2-4x slower there and 1.4-3x faster on prefill and mixed steps
    (docs/benchmarks.md, GPU section).
    """
    if backend == "auto" and meta.max_prefill_q_len == 0:
        backend = "reference"
    chosen = resolve_backend(backend, "ragged_paged_attention", kernel_unsupported_reason(q, k_pool))
    if chosen == "pallas":
        return ragged_paged_attention_mgpu(q, k_pool, v_pool, layer, meta, sm_scale)
    return ragged_paged_attention_reference(q, k_pool, v_pool, layer, meta, sm_scale)
