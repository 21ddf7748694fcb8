"""The XLA reference attention (the CPU production path) against plain numpy attention, in float32.

Every random batch mixes what the scheduler builds: one-token decode rows,
prefill chunks on top of a cached prefix, sequences ending mid-page, padding
tokens and padding sequences, pages in random order. Slots that no sequence may
see hold V = 1000, so a masking or page-table slip shows as a large error.
"""

from __future__ import annotations

import secrets

import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import ragged_paged_attention as rpa

POISON_V = 1000.0
SM_SCALE = 0.125


def numpy_attention(q, k_pool, v_pool, layer, q_lens, kv_lens, page_table, page_size):
    """One sequence at a time: its K/V read slot by slot, causal over its cached prefix."""
    num_tokens, num_heads, head_dim = q.shape
    group = num_heads // k_pool.shape[3]
    out = np.zeros((num_tokens, num_heads, head_dim))
    start = 0
    for q_len, kv_len, pages in zip(q_lens, kv_lens, page_table, strict=True):
        slots = np.arange(kv_len)
        keys = k_pool[layer, pages[slots // page_size], slots % page_size].astype(np.float64)
        values = v_pool[layer, pages[slots // page_size], slots % page_size].astype(np.float64)
        for i in range(q_len):
            visible = kv_len - q_len + i + 1
            for head in range(num_heads):
                scores = keys[:visible, head // group] @ q[start + i, head] * SM_SCALE
                weights = np.exp(scores - scores.max())
                out[start + i, head] = weights @ values[:visible, head // group] / weights.sum()
        start += q_len
    return out


def random_batch(rng, num_decode, prefills, kv_heads, group, page_size=16, head_dim=32, pad_tokens=3):
    q_lens = [1] * num_decode + [q_len for q_len, _ in prefills] + [0]
    decode_kv = [int(rng.integers(1, 70)) for _ in range(num_decode)]
    kv_lens = decode_kv + [q_len + cached for q_len, cached in prefills] + [0]
    pages_needed = [-(-kv // page_size) for kv in kv_lens]
    num_pages = 1 + sum(pages_needed) + 2
    page_ids = rng.permutation(np.arange(1, num_pages))
    page_table = np.zeros((len(q_lens), max(pages_needed) + 2), np.int32)
    layer = int(rng.integers(2))
    shape = (2, num_pages, page_size, kv_heads, head_dim)
    k_pool = rng.standard_normal(shape).astype(np.float32)
    v_pool = np.full(shape, POISON_V, np.float32)
    used = 0
    for seq, (kv_len, count) in enumerate(zip(kv_lens, pages_needed, strict=True)):
        page_table[seq, :count] = page_ids[used : used + count]
        used += count
        slots = np.arange(kv_len)
        pages = page_table[seq, slots // page_size]
        v_pool[layer, pages, slots % page_size] = rng.standard_normal((kv_len, kv_heads, head_dim))
    num_tokens = sum(q_lens) + pad_tokens
    q = rng.standard_normal((num_tokens, kv_heads * group, head_dim)).astype(np.float32)
    prefill_q = [q_len for q_len, _ in prefills]
    meta = rpa.AttentionMetadata(
        cu_q_lens=jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32),
        kv_lens=jnp.asarray(kv_lens, jnp.int32),
        page_table=jnp.asarray(page_table),
        write_slots=jnp.zeros((num_tokens,), jnp.int32),
        num_tokens=jnp.int32(sum(q_lens)),
        num_decode_seqs=num_decode,
        max_prefill_q_len=int(2 ** np.ceil(np.log2(max(prefill_q)))) if prefill_q else 0,
    )
    expected = numpy_attention(q, k_pool, v_pool, layer, q_lens, kv_lens, page_table, page_size)
    got = rpa.ragged_paged_attention_reference(
        jnp.asarray(q), jnp.asarray(k_pool), jnp.asarray(v_pool), jnp.int32(layer), meta, SM_SCALE
    )
    return np.asarray(got, np.float64), expected


@pytest.mark.parametrize(("kv_heads", "group"), [(2, 1), (2, 3), (1, 8)], ids=["gqa1", "gqa3", "gqa8"])
@pytest.mark.parametrize(
    ("num_decode", "prefills"),
    [
        (5, []),  # decode only
        (0, [(37, 0)]),  # one fresh prefill chunk
        (0, [(20, 45), (1, 0), (16, 16)]),  # chunks over cached prefixes, a one-token chunk
        (4, [(23, 9), (40, 0)]),  # mixed: decode rows then prefill chunks
    ],
    ids=["decode", "prefill", "cached-prefix", "mixed"],
)
def test_reference_matches_numpy(num_decode, prefills, kv_heads, group):
    seed = secrets.randbits(32)
    print(f"seed {seed}")
    got, expected = random_batch(np.random.default_rng(seed), num_decode, prefills, kv_heads, group)
    real = int(sum([1] * num_decode + [q for q, _ in prefills]))
    assert np.all(got[real:] == 0.0), "padding tokens must give zeros"
    relative = np.abs(got - expected).max() / np.abs(expected).max()
    assert relative < 1e-5, relative
