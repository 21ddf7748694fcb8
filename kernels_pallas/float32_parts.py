"""Float32 on Hopper tensor cores, as bfloat16 parts.

wgmma's float32 mode is tf32 (10 mantissa bits) and wants K-major operands,
which neither the V pool (`[.., tokens, head_dim]`) nor an expert's `rhs[K, N]`
is. So a float32 kernel input runs as three bfloat16 parts per value (hi + mid
+ lo carry float32's 24 mantissa bits), and each product sums the six part
products of order <= 2 (hi.hi, hi.mid, mid.hi, mid.mid, hi.lo, lo.hi). On
random attention inputs that lands ~5e-7 of the output's scale from the
float32 reference; the three products of order <= 1 reach ~1.5e-5, one ~4e-3.
The price is six wgmmas per product and SMEM for the parts.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from kernels_pallas._backend import plgpu

SPLIT_PARTS = 3
SPLIT_TERMS = tuple((i, j) for i in range(SPLIT_PARTS) for j in range(SPLIT_PARTS) if i + j < SPLIT_PARTS)


def is_split(dtype: Any) -> bool:
    """Whether a kernel input of `dtype` runs as bfloat16 parts."""
    return jnp.dtype(dtype) == jnp.float32


def operand_dtype(dtype: Any) -> jnp.dtype:
    """The dtype wgmma reads for an input of `dtype`: its own, or bfloat16 for float32."""
    return jnp.dtype(jnp.bfloat16) if is_split(dtype) else jnp.dtype(dtype)


def num_parts(dtype: Any) -> int:
    return SPLIT_PARTS if is_split(dtype) else 1


def product_terms(dtype: Any) -> tuple[tuple[int, int], ...]:
    """The (lhs part, rhs part) products a matmul of `dtype` inputs sums."""
    return SPLIT_TERMS if is_split(dtype) else ((0, 0),)


def as_operands(x: jax.Array, dtype: Any) -> list[jax.Array]:
    """`x` as wgmma operands for an input `dtype`: itself cast, or bfloat16 parts summing to it."""
    if not is_split(dtype):
        return [x.astype(dtype)]
    parts, rest = [], x.astype(jnp.float32)
    for _ in range(SPLIT_PARTS):
        part = rest.astype(jnp.bfloat16)
        parts.append(part)
        rest = rest - part.astype(jnp.float32)
    return parts


def as_operands_outside_kernel(x: jax.Array, dtype: Any) -> list[jax.Array]:
    """`as_operands` for XLA code around a kernel: the parts cut from the float32 bits themselves.

    `as_operands` finds each part's remainder as `rest - f32(bf16(rest))`; XLA's
    GPU pipeline (excess precision allowed, its default) folds that round trip
    to `rest - rest`, which zeroes the mid and lo parts: a native H200 run of
    the float32 attention kernel, whose Q is split here, was off by ~1.5e-3 of
    the output's scale, one bfloat16 product's error. Masking the low 16 bits
    instead gives parts that are truncations, exact in bfloat16, with no
    conversion to fold; hi + mid + lo still equals the float32 value.
    """
    if not is_split(dtype):
        return [x.astype(dtype)]
    parts, rest = [], x.astype(jnp.float32)
    for _ in range(SPLIT_PARTS):
        bits = jax.lax.bitcast_convert_type(rest, jnp.uint32) & jnp.uint32(0xFFFF0000)
        head = jax.lax.bitcast_convert_type(bits, jnp.float32)
        parts.append(head.astype(jnp.bfloat16))
        rest = rest - head
    return parts


def swizzled(dtype: Any) -> tuple:
    """SMEM transforms for 128-byte swizzled rows of `dtype` (what TMA and wgmma read fastest)."""
    return (plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(128))
