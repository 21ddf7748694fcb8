"""MoE routing (top-k gating, token grouping, expert histogram) and the grouped matmul.

The XLA references here are exact on CPU and GPU and serve as the production
path on CPU. Routing returns everything the expert computation needs: the
chosen experts and weights per token, the permutation that groups the
(token, choice) pairs by expert, each expert's group size, and this call's
per-expert selection counts over the real (non-padding) tokens, which the
model runner adds into a device-resident histogram.

Beside each reference sits its Mosaic GPU kernel (`route_tokens_mgpu`,
`grouped_matmul_mgpu`) and the dispatcher the models call (`route_tokens`,
`grouped_matmul`): the kernel on a GPU with JAX >= 0.11, the reference
elsewhere. Design and testing: docs/kernels.md.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from kernels_pallas._backend import pl, plgpu, resolve_backend, sm_count
from kernels_pallas.float32_parts import SPLIT_PARTS, SPLIT_TERMS, as_operands, is_split, swizzled


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


# ----------------------------------------------------------------------------- Mosaic GPU routing kernel
#
# One CTA step routes a block of 64 tokens: softmax over the experts, top-k by
# k rounds of (row max, lowest index holding it, mask it out), the weights
# renormalised when asked, and this block's per-expert counts over its real
# tokens as one row of a `[blocks, E]` output. No atomics: XLA sums the rows.
# The stable sort by expert and the group sizes stay in XLA.

ROUTING_BLOCK = 64  # rows per block: the WGMMA register layout's M granule
_MASKED_LOGIT = -0.7 * float(jnp.finfo(jnp.float32).max)  # padding experts: probability exactly 0


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _routing_kernel_body(
    logits_ref: Any,
    valid_ref: Any,
    weights_ref: Any,
    ids_ref: Any,
    counts_ref: Any,
    logits_smem: Any,
    valid_smem: Any,
    weights_smem: Any,
    ids_smem: Any,
    counts_smem: Any,
    barrier: Any,
    *,
    top_k: int,
    renormalize: bool,
    num_ctas: int,
) -> None:
    """One CTA walks token blocks `cta, cta + num_ctas, ...`."""
    padded_experts = logits_smem.shape[1]
    choices = weights_smem.shape[1]
    layout = plgpu.Layout.WGMMA
    cta = lax.axis_index("cta")
    num_blocks = counts_ref.shape[0]

    @pl.loop(cta, num_blocks, step=num_ctas)
    def _block_loop(block):
        rows = pl.ds(block * ROUTING_BLOCK, ROUTING_BLOCK)
        plgpu.copy_gmem_to_smem(logits_ref.at[rows], logits_smem, barrier)
        plgpu.copy_gmem_to_smem(valid_ref.at[rows], valid_smem, barrier)
        plgpu.barrier_wait(barrier)
        logits = plgpu.load(logits_smem, layout=layout)
        row_valid = plgpu.load(valid_smem, layout=layout).max(axis=1) > 0
        shape = logits.shape

        peak = logits.max(axis=1)
        exps = jnp.exp(logits - lax.broadcast_in_dim(peak, shape, [0]))
        probs = exps / lax.broadcast_in_dim(exps.sum(axis=1), shape, [0])

        expert = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=layout)
        choice = plgpu.broadcasted_iota(jnp.int32, (ROUTING_BLOCK, choices), 1, layout=layout)
        weights = plgpu.layout_cast(jnp.zeros((ROUTING_BLOCK, choices), jnp.float32), layout)
        ids = plgpu.layout_cast(jnp.zeros((ROUTING_BLOCK, choices), jnp.int32), layout)
        hits = plgpu.layout_cast(jnp.zeros(shape, jnp.int32), layout)
        live = lax.broadcast_in_dim(row_valid, shape, [0])
        remaining = probs
        for k in range(top_k):
            best = remaining.max(axis=1)
            # The lowest expert index among equal maxima, as lax.top_k breaks ties.
            holders = jnp.where(remaining == lax.broadcast_in_dim(best, shape, [0]), expert, padded_experts)
            best_id = holders.min(axis=1)
            chosen = expert == lax.broadcast_in_dim(best_id, shape, [0])
            remaining = jnp.where(chosen, -1.0, remaining)  # below every probability, padding included
            hits = hits + jnp.where(chosen & live, 1, 0)
            this_choice = choice == k
            weights = jnp.where(this_choice, lax.broadcast_in_dim(best, weights.shape, [0]), weights)
            ids = jnp.where(this_choice, lax.broadcast_in_dim(best_id, ids.shape, [0]), ids)
        if renormalize:
            total = jnp.where(choice < top_k, weights, 0.0).sum(axis=1)
            weights = weights / lax.broadcast_in_dim(total, weights.shape, [0])

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous block's stores have left SMEM
        weights_smem[...] = weights
        ids_smem[...] = ids
        counts_smem[...] = hits.sum(axis=0)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(weights_smem, weights_ref.at[rows])
        plgpu.copy_smem_to_gmem(ids_smem, ids_ref.at[rows])
        plgpu.copy_smem_to_gmem(counts_smem, counts_ref.at[block])

    plgpu.wait_smem_to_gmem(0)


def route_tokens_mgpu(
    router_logits: jax.Array,
    valid: jax.Array,
    *,
    top_k: int,
    renormalize: bool,
    interpret: Any = None,
    num_ctas: int | None = None,
) -> Routing:
    """The routing kernel plus XLA for the sort and group sizes; the same `Routing` as the reference."""
    num_tokens, num_experts = router_logits.shape
    if not 0 < top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
    padded_experts = _round_up(num_experts, 64)
    choices = _round_up(top_k, 8)
    blocks = -(-num_tokens // ROUTING_BLOCK)
    num_ctas = min(num_ctas or sm_count(), blocks)
    padded_tokens = blocks * ROUTING_BLOCK
    logits = jnp.pad(
        router_logits.astype(jnp.float32),
        ((0, padded_tokens - num_tokens), (0, padded_experts - num_experts)),
        constant_values=_MASKED_LOGIT,
    )
    # Row validity as an 8-wide int tile: the register layout wants columns in multiples of 8.
    valid_tile = jnp.zeros((padded_tokens, 8), jnp.int32).at[:num_tokens, 0].set(valid.astype(jnp.int32))
    kernel = plgpu.kernel(
        functools.partial(_routing_kernel_body, top_k=top_k, renormalize=renormalize, num_ctas=num_ctas),
        out_type=(
            jax.ShapeDtypeStruct((padded_tokens, choices), jnp.float32),
            jax.ShapeDtypeStruct((padded_tokens, choices), jnp.int32),
            jax.ShapeDtypeStruct((blocks, padded_experts), jnp.int32),
        ),
        scratch_types=[
            plgpu.SMEM((ROUTING_BLOCK, padded_experts), jnp.float32),
            plgpu.SMEM((ROUTING_BLOCK, 8), jnp.int32),
            plgpu.SMEM((ROUTING_BLOCK, choices), jnp.float32),
            plgpu.SMEM((ROUTING_BLOCK, choices), jnp.int32),
            plgpu.SMEM((padded_experts,), jnp.int32),
            plgpu.Barrier(num_arrivals=2),
        ],
        grid=(num_ctas,),
        grid_names=("cta",),
        interpret=interpret,
    )
    weights, ids, block_counts = kernel(logits, valid_tile)
    expert_ids = ids[:num_tokens, :top_k]
    flat_ids = expert_ids.reshape(-1)
    sort_order = jnp.argsort(flat_ids, stable=True).astype(jnp.int32)
    group_sizes = jnp.zeros((num_experts,), jnp.int32).at[flat_ids].add(1)
    counts = block_counts.sum(axis=0)[:num_experts]
    return Routing(expert_ids, weights[:num_tokens, :top_k], sort_order, group_sizes, counts)


# ----------------------------------------------------------------------------- Mosaic GPU grouped matmul
#
# `lhs[M, K]` is sorted by group; XLA cuts the rows into work items, one per
# (group, 64-row block) pair that overlaps, plus items for rows past the last
# group (ragged_dot gives zeros there). A persistent grid walks (item, N tile)
# pairs: a pipelined K loop of wgmmas over that block and the group's `rhs`,
# then a ladder of TMA stores (64, 32, ..., 1 rows) writes exactly the item's
# rows, so items sharing a block never overwrite each other. Float32 operands
# run as bfloat16 parts (float32_parts.py): each K step's tiles are split into
# SMEM by the warpgroup, then six wgmmas.

_G_GROUP, _G_BLOCK, _G_ROW_LO, _G_ROW_HI, _G_ZERO, _G_VALID = range(6)


def _plan_groups(group_sizes: jax.Array, num_rows: int, block_m: int) -> jax.Array:
    """int32[items, 6] work table; the item count bound is static: blocks + groups."""
    num_groups = group_sizes.shape[0]
    ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), num_rows)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    # Segment num_groups is the zero tail [sum(group_sizes), num_rows).
    starts = jnp.concatenate([starts, ends[-1:]])
    ends = jnp.concatenate([ends, jnp.full((1,), num_rows, jnp.int32)])
    first_block = starts // block_m
    blocks = jnp.where(ends > starts, (ends - 1) // block_m - first_block + 1, 0)
    item_end = jnp.cumsum(blocks)
    max_items = -(-num_rows // block_m) + num_groups
    item = jnp.arange(max_items, dtype=jnp.int32)
    segment = jnp.minimum(jnp.searchsorted(item_end, item, side="right"), num_groups).astype(jnp.int32)
    block = first_block[segment] + item - (item_end[segment] - blocks[segment])
    row_lo = jnp.maximum(starts[segment], block * block_m)
    row_hi = jnp.minimum(ends[segment], block * block_m + block_m)
    columns = [
        jnp.minimum(segment, num_groups - 1),
        block,
        row_lo,
        row_hi,
        (segment == num_groups).astype(jnp.int32),
        (item < item_end[-1]).astype(jnp.int32),
    ]
    return jnp.stack(columns, axis=1).astype(jnp.int32)


def _store_rows(out_smem: Any, out_ref: Any, smem_row: Any, row: Any, count: Any, column: Any) -> None:
    """Store `count` (1..block_m) rows from `out_smem[smem_row:]` to `out_ref[row:, column:]`.

    TMA boxes have static shapes, so the rows go as a sum of power-of-two runs
    (the bits of `count`), one predicated store per run size.
    """
    block_m, block_n = out_smem.shape

    def store(offset: Any, size: int) -> None:
        plgpu.copy_smem_to_gmem(
            out_smem.at[pl.ds(smem_row + offset, size)],
            out_ref.at[pl.ds(row + offset, size), pl.ds(column, block_n)],
        )

    done = jnp.int32(0)
    size = 1 << (block_m.bit_length() - 1)
    while size >= 1:
        # pl.when rather than the copy's `predicate=`, which the GPU interpreter does not run.
        pl.when((count & size) != 0)(functools.partial(store, done, size))
        done = done + (count & size)
        size //= 2


def _grouped_matmul_body(
    work_ref: Any,
    lhs_ref: Any,
    rhs_ref: Any,
    out_ref: Any,
    out_smem: Any,
    *part_smem: Any,
    block_m: int,
    block_n: int,
    block_k: int,
    num_ctas: int,
) -> None:
    """One CTA walks (item, N tile) pairs `cta, cta + num_ctas, ...`.

    `part_smem` (float32 only) holds the lhs and rhs part buffers.
    """
    num_items = work_ref.shape[0]
    n_tiles = out_ref.shape[1] // block_n
    k_steps = lhs_ref.shape[1] // block_k
    total = num_items * n_tiles
    cta = lax.axis_index("cta")

    @pl.loop(cta, total, step=num_ctas)
    def _tile_loop(flat):
        item = flat // n_tiles
        n_tile = flat % n_tiles

        @pl.when(work_ref[item, _G_VALID] != 0)
        def _tile():
            group = work_ref[item, _G_GROUP]
            block = work_ref[item, _G_BLOCK]
            row_lo = work_ref[item, _G_ROW_LO]
            row_count = work_ref[item, _G_ROW_HI] - row_lo
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's stores have left SMEM

            @pl.when(work_ref[item, _G_ZERO] == 0)
            def _product():
                def accumulate(acc_ref):
                    def split_step(lhs_smem: Any, rhs_smem: Any) -> None:
                        lhs_parts, rhs_parts = part_smem
                        lhs = as_operands(plgpu.load(lhs_smem, layout=plgpu.Layout.WGMMA), jnp.float32)
                        rhs = as_operands(plgpu.load(rhs_smem, layout=plgpu.Layout.WGMMA), jnp.float32)
                        plgpu.wgmma_wait(0)  # the previous step's wgmmas are done reading the parts
                        for i in range(SPLIT_PARTS):
                            lhs_parts.at[i][...] = lhs[i]
                            rhs_parts.at[i][...] = rhs[i]
                        plgpu.commit_smem()
                        for i, j in SPLIT_TERMS:
                            plgpu.wgmma(acc_ref, lhs_parts.at[i], rhs_parts.at[j])

                    def step(_, lhs_smem: Any, rhs_smem: Any) -> None:
                        if part_smem:
                            split_step(lhs_smem, rhs_smem)
                        else:
                            plgpu.wgmma(acc_ref, lhs_smem, rhs_smem)

                    transforms = swizzled(jnp.float32) if part_smem else ()
                    plgpu.emit_pipeline(
                        step,
                        grid=(k_steps,),
                        in_specs=[
                            plgpu.BlockSpec(
                                (block_m, block_k),
                                lambda k: (block, k),
                                transforms=transforms,
                                delay_release=1,
                            ),
                            plgpu.BlockSpec(
                                (block_k, block_n),
                                lambda k: (k, n_tile),
                                transforms=transforms,
                                delay_release=1,
                            ),
                        ],
                        max_concurrent_steps=max(2, min(4, k_steps)),
                    )(lhs_ref, rhs_ref.at[group])
                    return acc_ref[...]

                acc = pl.run_scoped(accumulate, plgpu.ACC((block_m, block_n), jnp.float32))
                out_smem[...] = acc.astype(out_smem.dtype)

            @pl.when(work_ref[item, _G_ZERO] != 0)
            def _zeros():
                zeros = jnp.zeros((block_m, block_n), out_smem.dtype)
                out_smem[...] = plgpu.layout_cast(zeros, plgpu.Layout.WGMMA)

            plgpu.commit_smem()
            _store_rows(out_smem, out_ref, row_lo - block * block_m, row_lo, row_count, n_tile * block_n)

    plgpu.wait_smem_to_gmem(0)


def grouped_matmul_unsupported_reason(lhs: jax.Array, rhs: jax.Array, block_k: int = 64) -> str:
    """Why the kernel cannot take these operands ('' when it can); the dispatcher then uses XLA."""
    if lhs.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32) or rhs.dtype != lhs.dtype:
        return f"needs bfloat16/float16/float32 operands of one dtype, got {lhs.dtype}/{rhs.dtype}"
    if lhs.shape[1] % block_k or rhs.shape[2] % 64:
        return f"needs K % {block_k} == 0 and N % 64 == 0, got K={lhs.shape[1]}, N={rhs.shape[2]}"
    return ""


def grouped_matmul_mgpu(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    interpret: Any = None,
    num_ctas: int | None = None,
    block_m: int = 64,
    block_n: int | None = None,
    block_k: int = 64,
    out_dtype: Any = None,
) -> jax.Array:
    """Mosaic GPU grouped matmul with the reference's contract; f32 accumulation.

    `out_dtype` (default `lhs.dtype`) may be float32 to keep the accumulator's precision.
    Float32 operands run as bfloat16 parts, with 64-wide N tiles (SMEM for the parts).
    """
    reason = grouped_matmul_unsupported_reason(lhs, rhs, block_k)
    if reason:
        raise ValueError(f"grouped_matmul_mgpu {reason}")
    num_rows, depth = lhs.shape
    num_groups, depth_rhs, width = rhs.shape
    if depth_rhs != depth or group_sizes.shape != (num_groups,):
        raise ValueError(f"mismatched lhs {lhs.shape}, rhs {rhs.shape}, group_sizes {group_sizes.shape}")
    split = is_split(lhs.dtype)
    if block_n is None:
        block_n = 128 if width % 128 == 0 and not split else 64
    num_ctas = num_ctas or sm_count()
    out_dtype = jnp.dtype(out_dtype or lhs.dtype)
    work = _plan_groups(group_sizes, num_rows, block_m)
    padded_rows = _round_up(num_rows, block_m)
    # Whole blocks, so that no TMA reads past the end of lhs.
    lhs_padded = jnp.pad(lhs, ((0, padded_rows - num_rows), (0, 0)))
    kernel = plgpu.kernel(
        functools.partial(
            _grouped_matmul_body, block_m=block_m, block_n=block_n, block_k=block_k, num_ctas=num_ctas
        ),
        out_type=jax.ShapeDtypeStruct((num_rows, width), out_dtype),
        scratch_types=[
            plgpu.SMEM((block_m, block_n), out_dtype),
            *(
                [
                    plgpu.SMEM(
                        (SPLIT_PARTS, block_m, block_k), jnp.bfloat16, transforms=swizzled(jnp.bfloat16)
                    ),
                    plgpu.SMEM(
                        (SPLIT_PARTS, block_k, block_n), jnp.bfloat16, transforms=swizzled(jnp.bfloat16)
                    ),
                ]
                if split
                else []
            ),
        ],
        grid=(num_ctas,),
        grid_names=("cta",),
        interpret=interpret,
    )
    return kernel(work, lhs_padded, rhs)


def route_tokens(
    router_logits: jax.Array, valid: jax.Array, *, top_k: int, renormalize: bool, backend: str = "auto"
) -> Routing:
    """Top-k routing: the Mosaic GPU kernel on a GPU with JAX >= 0.11, else the XLA reference.

    backend: "auto", "pallas" (falls back with a one-line warning where the
    kernel cannot run) or "reference".
    """
    if resolve_backend(backend, "route_tokens") == "pallas":
        return route_tokens_mgpu(router_logits, valid, top_k=top_k, renormalize=renormalize)
    return route_tokens_reference(router_logits, valid, top_k=top_k, renormalize=renormalize)


def grouped_matmul(
    lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, backend: str = "auto"
) -> jax.Array:
    """`lhs[M, K]` sorted by group times `rhs[G, K, N]`: the Mosaic GPU kernel where it runs, else XLA."""
    reason = grouped_matmul_unsupported_reason(lhs, rhs)
    if resolve_backend(backend, "grouped_matmul", reason) == "pallas":
        return grouped_matmul_mgpu(lhs, rhs, group_sizes)
    return grouped_matmul_reference(lhs, rhs, group_sizes)
