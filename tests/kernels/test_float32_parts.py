"""The float32 -> bfloat16 parts split that XLA runs around the kernels (float32_parts.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.float32_parts import SPLIT_PARTS, as_operands_outside_kernel

pytestmark = pytest.mark.kernels


def test_parts_are_bfloat16_and_sum_to_the_float32_value(rng):
    scales = np.float32([1e-20, 1e-3, 1.0, 3e4, 1e30])  # lo parts of values near 1e-33 would be subnormal
    x = (rng.standard_normal((5, 257)).astype(np.float32) * scales[:, None]).astype(np.float32)
    parts = jax.jit(lambda v: as_operands_outside_kernel(v, jnp.float32))(jnp.asarray(x))
    assert len(parts) == SPLIT_PARTS and all(part.dtype == jnp.bfloat16 for part in parts)
    total = sum(np.asarray(part, np.float64) for part in parts)
    assert np.array_equal(total, x.astype(np.float64))


def test_split_has_no_bfloat16_round_trip_for_xla_to_fold():
    """XLA's GPU pipeline folds f32(bf16(x)) to x, which would zero the mid and lo parts."""
    jaxpr = jax.make_jaxpr(lambda v: as_operands_outside_kernel(v, jnp.float32))(
        jnp.ones((4, 64), jnp.float32)
    )
    widening = [
        eqn
        for eqn in jaxpr.eqns
        if eqn.primitive.name == "convert_element_type"
        and eqn.invars[0].aval.dtype == jnp.bfloat16
        and eqn.params["new_dtype"] == jnp.float32
    ]
    assert widening == []


def test_other_dtypes_pass_through():
    x = jnp.ones((2, 64), jnp.bfloat16)
    (only,) = as_operands_outside_kernel(x, jnp.bfloat16)
    assert only.dtype == jnp.bfloat16 and np.array_equal(only, x)
