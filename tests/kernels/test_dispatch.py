"""The dispatchers' backend choice. Runs in both venvs: on JAX 0.10 it checks the fallback itself.

On a machine without a GPU (or with JAX < 0.11) "auto" must run the XLA
reference and "pallas" must fall back to it with one warning line; on a GPU
with JAX >= 0.11, "auto" must pick the kernels.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import _backend
from kernels_pallas import moe_routing as moe
from kernels_pallas import ragged_paged_attention as rpa

pytestmark = pytest.mark.kernels
without_gpu = pytest.mark.skipif(_backend.on_gpu(), reason="checks the fallback of a machine with no GPU")
kernels_usable = _backend.on_gpu() and _backend.MOSAIC_GPU_AVAILABLE


def small_attention_inputs() -> tuple:
    q = jnp.asarray(np.random.default_rng(0).standard_normal((4, 2, 64)), jnp.bfloat16)
    pool = jnp.asarray(np.random.default_rng(1).standard_normal((1, 3, 16, 1, 64)), jnp.bfloat16)
    meta = rpa.AttentionMetadata(
        cu_q_lens=jnp.asarray([0, 1, 4], jnp.int32),
        kv_lens=jnp.asarray([20, 3], jnp.int32),
        page_table=jnp.asarray([[1, 2], [0, 0]], jnp.int32),
        write_slots=jnp.zeros((4,), jnp.int32),
        num_tokens=jnp.int32(4),
        num_decode_seqs=1,
        max_prefill_q_len=4,
    )
    return q, pool, pool, jnp.int32(0), meta


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend must be one of"):
        _backend.resolve_backend("triton", "test")


@without_gpu
@pytest.mark.parametrize("backend", ["auto", "pallas", "reference"])
def test_every_backend_runs_the_reference_here(backend):
    args = small_attention_inputs()
    expected = rpa.ragged_paged_attention_reference(*args, 0.125)
    assert np.array_equal(rpa.ragged_paged_attention(*args, 0.125, backend=backend), expected)

    logits = jnp.asarray(np.random.default_rng(2).standard_normal((5, 8)), jnp.float32)
    valid = jnp.asarray([True, True, True, False, False])
    routed = moe.route_tokens(logits, valid, top_k=2, renormalize=True, backend=backend)
    want = moe.route_tokens_reference(logits, valid, top_k=2, renormalize=True)
    for got, expected_leaf in zip(jax.tree.leaves(routed), jax.tree.leaves(want), strict=True):
        assert np.array_equal(got, expected_leaf)

    lhs = jnp.ones((6, 64), jnp.bfloat16)
    rhs = jnp.ones((2, 64, 64), jnp.bfloat16)
    sizes = jnp.asarray([2, 4], jnp.int32)
    product = moe.grouped_matmul(lhs, rhs, sizes, backend)
    assert np.array_equal(product, moe.grouped_matmul_reference(lhs, rhs, sizes))


@without_gpu
def test_forced_pallas_warns_once(caplog):
    _backend._warned.clear()
    args = small_attention_inputs()
    with caplog.at_level(logging.WARNING, logger="kernels_pallas"):
        rpa.ragged_paged_attention(*args, 0.125, backend="pallas")
        rpa.ragged_paged_attention(*args, 0.125, backend="pallas")
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 1 and "falls back to the XLA reference" in lines[0]
    assert "\n" not in lines[0]
    expected = "JAX >= 0.11" if not _backend.MOSAIC_GPU_AVAILABLE else "no GPU"
    assert expected in lines[0]


@without_gpu
def test_auto_is_silent(caplog):
    _backend._warned.clear()
    with caplog.at_level(logging.WARNING, logger="kernels_pallas"):
        rpa.ragged_paged_attention(*small_attention_inputs(), 0.125)
    assert not caplog.records


@pytest.mark.skipif(not _backend.MOSAIC_GPU_AVAILABLE, reason=_backend.UNAVAILABLE_REASON)
def test_auto_gives_decode_only_steps_to_the_reference(monkeypatch):
    """Decode-only steps measured faster in XLA on an H200; "pallas" still forces the kernel there."""
    calls = []

    def kernel(*args, **kwargs):
        calls.append(args[4].max_prefill_q_len)
        return rpa.ragged_paged_attention_reference(*args, **kwargs)

    monkeypatch.setattr(_backend, "on_gpu", lambda: True)
    monkeypatch.setattr(rpa, "ragged_paged_attention_mgpu", kernel)
    q, k_pool, v_pool, layer, meta = small_attention_inputs()
    decode = dataclasses.replace(
        meta,
        cu_q_lens=jnp.asarray([0, 1, 2], jnp.int32),
        write_slots=jnp.zeros((2,), jnp.int32),
        num_tokens=jnp.int32(2),
        num_decode_seqs=2,
        max_prefill_q_len=0,
    )
    rpa.ragged_paged_attention(q[:2], k_pool, v_pool, layer, decode, 0.125)
    assert calls == []
    rpa.ragged_paged_attention(q, k_pool, v_pool, layer, meta, 0.125)
    assert calls == [4]
    rpa.ragged_paged_attention(q[:2], k_pool, v_pool, layer, decode, 0.125, backend="pallas")
    assert calls == [4, 0]


@pytest.mark.skipif(not kernels_usable, reason="needs a GPU and JAX >= 0.11")
def test_auto_picks_the_kernels_on_gpu():
    args = small_attention_inputs()
    assert (
        _backend.resolve_backend("auto", "test", rpa.kernel_unsupported_reason(args[0], args[1])) == "pallas"
    )
    out = np.asarray(rpa.ragged_paged_attention(*args, 0.125), np.float32)
    ref = np.asarray(rpa.ragged_paged_attention_reference(*args, 0.125), np.float32)
    assert np.allclose(out, ref, rtol=2**-7, atol=2**-7)
    # float32 runs as bfloat16 parts in the kernel, held to 1e-5 of the output's scale.
    args32 = (*(x.astype(jnp.float32) for x in args[:3]), *args[3:])
    assert _backend.resolve_backend("auto", "test", rpa.kernel_unsupported_reason(*args32[:2])) == "pallas"
    out = np.asarray(rpa.ragged_paged_attention(*args32, 0.125))
    ref = np.asarray(rpa.ragged_paged_attention_reference(*args32, 0.125))
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()
