"""The Mosaic GPU routing and grouped matmul kernels against their XLA references, on CPU.

Numerics under the GPU interpreter, plus the CUDA lowering check for an
abstract H100; inputs are random and fresh each run (the seed is printed).
Unwritten kernel output is NaN (floats) or INT_MAX (ints) under the
interpreter, so a row the kernel forgets shows up as a mismatch.

Routing is float32 end to end: ids, sort order, group sizes and counts must
match exactly, weights to 1e-5 relative. The grouped matmul takes bf16/f16
operands (wgmma's f32 mode is tf32 and needs a K-major rhs) and accumulates in
f32: with a float32 output it must match `ragged_dot(preferred_element_type=
float32)` to 1e-5 relative; with the operands' dtype as output, to one
rounding of that dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.kernels.support import (
    H100,
    lower_for_h100,
    race_params,
    races_found,
    relative_error,
    skip_without_mosaic_gpu,
)

skip_without_mosaic_gpu()

from kernels_pallas import moe_routing as moe  # noqa: E402

pytestmark = pytest.mark.kernels

# (tokens, experts, top_k, renormalize): Qwen1.5-MoE-A2.7B (60 experts, top 4, no renormalisation),
# Mixtral-like (8, top 2, renormalised), Qwen3-MoE-like (128, top 8, renormalised).
ROUTING_CASES = [(100, 60, 4, False), (70, 8, 2, True), (64, 128, 8, True)]


def check_routing(actual: moe.Routing, expected: moe.Routing) -> None:
    for field in ("expert_ids", "sort_order", "group_sizes", "counts"):
        got, want = np.asarray(getattr(actual, field)), np.asarray(getattr(expected, field))
        assert got.shape == want.shape and got.dtype == want.dtype, field
        assert np.array_equal(got, want), f"{field} differs at {np.argwhere(got != want)[:5].tolist()}"
    assert actual.weights.dtype == jnp.float32
    error = relative_error(actual.weights, expected.weights)
    print(f"weights relative error {error:.3g}")
    assert error < 1e-5


def random_valid(rng: np.random.Generator, num_tokens: int) -> jax.Array:
    """Real tokens first, then padding, as the runner lays a batch out."""
    return jnp.asarray(np.arange(num_tokens) < rng.integers(1, num_tokens + 1))


@pytest.mark.parametrize(("num_tokens", "num_experts", "top_k", "renormalize"), ROUTING_CASES)
def test_routing_matches_reference(rng, interpret, num_tokens, num_experts, top_k, renormalize):
    logits = jnp.asarray(rng.standard_normal((num_tokens, num_experts)) * rng.uniform(0.5, 4.0), jnp.float32)
    valid = random_valid(rng, num_tokens)
    route = functools.partial(moe.route_tokens_mgpu, top_k=top_k, renormalize=renormalize)
    actual = jax.jit(functools.partial(route, interpret=interpret, num_ctas=2))(logits, valid)
    check_routing(actual, moe.route_tokens_reference(logits, valid, top_k=top_k, renormalize=renormalize))


def test_routing_ties_and_bf16_logits(rng, interpret):
    """Logits on a coarse grid tie often: the kernel must pick the lowest expert index, as lax.top_k does."""
    logits = jnp.asarray(rng.integers(-2, 3, (90, 16)), jnp.bfloat16)
    valid = random_valid(rng, 90)
    route = functools.partial(moe.route_tokens_mgpu, top_k=3, renormalize=True)
    actual = jax.jit(functools.partial(route, interpret=interpret, num_ctas=3))(logits, valid)
    check_routing(actual, moe.route_tokens_reference(logits, valid, top_k=3, renormalize=True))


@pytest.mark.parametrize(("num_tokens", "num_experts", "top_k", "renormalize"), ROUTING_CASES)
def test_routing_lowers_for_h100(num_tokens, num_experts, top_k, renormalize):
    logits = jnp.zeros((num_tokens, num_experts), jnp.float32)
    route = functools.partial(moe.route_tokens_mgpu, top_k=top_k, renormalize=renormalize, num_ctas=132)
    assert "mosaic_gpu" in lower_for_h100(route, logits, jnp.ones((num_tokens,), bool))


def random_group_sizes(rng: np.random.Generator, num_rows: int, num_groups: int, tail: int) -> jax.Array:
    """Sizes summing to num_rows - tail, with some empty groups and some smaller than a block."""
    cuts = np.sort(rng.integers(0, num_rows - tail + 1, num_groups - 1))
    sizes = np.diff(np.concatenate([[0], cuts, [num_rows - tail]]))
    sizes[rng.integers(num_groups)] = 0  # force an empty group; its rows go to the next
    sizes[-1] += num_rows - tail - sizes.sum()
    return jnp.asarray(sizes, jnp.int32)


# (rows, K, N, groups, dtype, rows past the last group)
MATMUL_CASES = [
    (150, 128, 128, 5, jnp.bfloat16, 7),
    (128, 64, 192, 3, jnp.float16, 0),
    (200, 192, 64, 9, jnp.bfloat16, 0),
    (150, 128, 128, 5, jnp.float32, 7),  # float32 as bfloat16 parts
]


@pytest.mark.parametrize(("rows", "depth", "width", "groups", "dtype", "tail"), MATMUL_CASES)
def test_grouped_matmul_matches_ragged_dot(rng, interpret, rows, depth, width, groups, dtype, tail):
    lhs = jnp.asarray(rng.standard_normal((rows, depth)), dtype)
    rhs = jnp.asarray(rng.standard_normal((groups, depth, width)), dtype)
    group_sizes = random_group_sizes(rng, rows, groups, tail)
    print(f"group sizes {np.asarray(group_sizes).tolist()}")
    kernel = functools.partial(moe.grouped_matmul_mgpu, interpret=interpret, num_ctas=3)

    exact = jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)
    wide = np.asarray(jax.jit(functools.partial(kernel, out_dtype=jnp.float32))(lhs, rhs, group_sizes))
    assert not np.isnan(wide).any(), "NaN in the kernel's output: a row was never written"
    error = relative_error(wide, exact)
    print(f"float32 output: relative error {error:.3g}")
    assert error < 1e-5
    assert np.all(wide[rows - tail :] == 0.0), "rows past the last group must be zeros, as in ragged_dot"

    if dtype == jnp.float32:
        return  # the output above is already in the input dtype
    narrow = jax.jit(kernel)(lhs, rhs, group_sizes)
    expected = moe.grouped_matmul_reference(lhs, rhs, group_sizes)
    assert narrow.dtype == expected.dtype
    narrow, expected = np.asarray(narrow, np.float64), np.asarray(expected, np.float64)
    eps = float(jnp.finfo(dtype).eps)
    # One rounding of the output, plus float32 accumulation-order noise, which is absolute (it follows
    # the size of the products, not of a result that cancels to near zero): scale it by the largest output.
    atol = 1e-6 * float(np.abs(expected).max())
    assert np.all(np.abs(narrow - expected) <= eps * np.abs(expected) + atol)


def test_no_races(rng, interpreter_only):
    """SMEM reuse across a CTA's blocks/tiles (outputs staged in SMEM, then TMA-stored) is synchronised."""
    logits = jnp.asarray(rng.standard_normal((200, 60)), jnp.float32)
    route = functools.partial(moe.route_tokens_mgpu, top_k=4, renormalize=True, num_ctas=1)
    jax.block_until_ready(
        jax.jit(functools.partial(route, interpret=race_params()))(logits, jnp.ones((200,), bool))
    )
    assert not races_found()
    kernel = functools.partial(moe.grouped_matmul_mgpu, num_ctas=1, interpret=race_params())
    for dtype in (jnp.bfloat16, jnp.float32):  # float32 also rewrites its part buffers every K step
        lhs = jnp.asarray(rng.standard_normal((200, 128)), dtype)
        rhs = jnp.asarray(rng.standard_normal((3, 128, 128)), dtype)
        jax.block_until_ready(jax.jit(kernel)(lhs, rhs, random_group_sizes(rng, 200, 3, 5)))
        assert not races_found()


def test_group_plan_covers_rows_once(rng):
    """Items tile [0, M) exactly once, each inside one block and one group (pure XLA, exact)."""
    rows, groups, block = int(rng.integers(1, 400)), int(rng.integers(1, 12)), 64
    group_sizes = random_group_sizes(rng, rows, groups, tail=int(rng.integers(0, min(rows, 10))))
    work = np.asarray(jax.jit(moe._plan_groups, static_argnums=(1, 2))(group_sizes, rows, block))
    live = work[work[:, moe._G_VALID] > 0]
    covered = np.zeros(rows, int)
    ends = np.cumsum(np.asarray(group_sizes))
    for group, blk, lo, hi, zero, _ in live:
        assert blk * block <= lo < hi <= (blk + 1) * block
        covered[lo:hi] += 1
        if not zero:
            assert ends[group] - group_sizes[group] <= lo and hi <= ends[group]
        else:
            assert lo >= ends[-1]
    assert np.all(covered == 1)


@pytest.mark.parametrize(
    ("rows", "depth", "width", "groups", "dtype"),
    [
        (256, 2048, 1408, 60, jnp.bfloat16),
        (256, 1408, 2048, 60, jnp.bfloat16),
        (130, 64, 64, 3, jnp.float16),
        (256, 2048, 1408, 60, jnp.float32),
    ],
    ids=["qwen1.5-moe-up", "qwen1.5-moe-down", "small-f16", "qwen1.5-moe-up-f32"],
)
def test_grouped_matmul_lowers_for_h100(rows, depth, width, groups, dtype):
    lhs = jnp.zeros((rows, depth), dtype)
    rhs = jnp.zeros((groups, depth, width), dtype)
    group_sizes = jnp.zeros((groups,), jnp.int32)
    kernel = functools.partial(moe.grouped_matmul_mgpu, num_ctas=132)
    assert "mosaic_gpu" in lower_for_h100(kernel, lhs, rhs, group_sizes)


@pytest.mark.parametrize(
    "by_expert", [False, True], ids=["tensor-parallel-by-intermediate", "expert-parallel-by-expert"]
)
def test_grouped_matmuls_lower_for_two_h100s(by_expert):
    """Split over devices (`models.qwen2_moe.Experts`) the experts run in `shard_map`, each of two
    H100s on its half of every expert's intermediate (Qwen1.5-MoE's 1408: 704 each; the gate/up
    product by output column, the down product by input row) or on its 30 of the 60 whole
    experts (expert parallelism, its own experts' group sizes); the parts are all-reduced."""
    mesh = jax.sharding.AbstractMesh((2,), ("tp",), abstract_device=jax.sharding.AbstractDevice(**H100))
    spec = jax.sharding.PartitionSpec
    if by_expert:
        specs = (spec(), spec("tp", None, None), spec("tp", None, None), spec("tp"))
    else:
        specs = (spec(), spec(None, None, "tp"), spec(None, "tp", None), spec())

    def experts(lhs, gate_up, down, group_sizes):
        hidden = moe.grouped_matmul_mgpu(lhs, gate_up, group_sizes, num_ctas=132)
        out = moe.grouped_matmul_mgpu(hidden[:, : hidden.shape[1] // 2], down, group_sizes, num_ctas=132)
        return jax.lax.psum(out, "tp")

    split = jax.shard_map(experts, mesh=mesh, in_specs=specs, out_specs=spec())
    shapes = [
        ((256, 2048), jnp.bfloat16),
        ((60, 2048, 2 * 1408), jnp.bfloat16),
        ((60, 1408, 2048), jnp.bfloat16),
        ((60,), jnp.int32),
    ]
    placed = [
        jax.ShapeDtypeStruct(shape, dtype, sharding=jax.sharding.NamedSharding(mesh, s))
        for (shape, dtype), s in zip(shapes, specs, strict=True)
    ]
    with jax.sharding.use_abstract_mesh(mesh):
        hlo = jax.jit(split).trace(*placed).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in hlo and "all_reduce" in hlo
