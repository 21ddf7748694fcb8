"""The XLA reference attention (the CPU production path) against plain numpy attention, in float32.

Every random batch mixes what the scheduler builds (`tests/attention_batch.py`):
one-token decode rows, prefill chunks on top of a cached prefix, sequences
ending mid-page, padding tokens and sequences, pages in random order, and
poisoned V where no sequence may look.
"""

from __future__ import annotations

import secrets

import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import ragged_paged_attention as rpa
from tests.attention_batch import Batch, build_batch

SM_SCALE = 0.125


def numpy_attention(batch: Batch) -> np.ndarray:
    """One sequence at a time: its K/V read slot by slot, causal over its cached prefix."""
    q = np.asarray(batch.q, np.float64)
    k_pool, v_pool = np.asarray(batch.k_pool, np.float64), np.asarray(batch.v_pool, np.float64)
    layer = int(batch.layer)
    cu_q_lens, kv_lens = np.asarray(batch.meta.cu_q_lens), np.asarray(batch.meta.kv_lens)
    page_table = np.asarray(batch.meta.page_table)
    page_size, group = k_pool.shape[2], q.shape[1] // k_pool.shape[3]
    out = np.zeros_like(q)
    for seq, kv_len in enumerate(kv_lens):
        start, q_len = cu_q_lens[seq], cu_q_lens[seq + 1] - cu_q_lens[seq]
        slots = np.arange(kv_len)
        pages, offsets = page_table[seq, slots // page_size], slots % page_size
        keys, values = k_pool[layer, pages, offsets], v_pool[layer, pages, offsets]
        for i in range(q_len):
            visible = kv_len - q_len + i + 1
            for head in range(q.shape[1]):
                scores = keys[:visible, head // group] @ q[start + i, head] * SM_SCALE
                weights = np.exp(scores - scores.max())
                out[start + i, head] = weights @ values[:visible, head // group] / weights.sum()
    return out


@pytest.mark.parametrize(("kv_heads", "group"), [(2, 1), (2, 3), (1, 8)], ids=["gqa1", "gqa3", "gqa8"])
@pytest.mark.parametrize(
    ("num_decode", "prefills"),
    [
        (5, []),  # decode only
        (1, []),  # one decode row: the few-rows layout (rpa.FEW_DECODE_ROWS)
        (2, [(23, 9)]),  # two decode rows and a chunk
        (0, [(37, 0)]),  # one fresh prefill chunk
        (0, [(20, 45), (1, 0), (16, 16)]),  # chunks over cached prefixes, a one-token chunk
        (4, [(23, 9), (40, 0)]),  # mixed: decode rows then prefill chunks
        # Chunks long enough for causal query blocks (rpa.causal_blocks): a fresh chunk whose
        # keys are fewer than its padded rows, and long and short chunks over long prefixes.
        (0, [(513, 0)]),
        (3, [(600, 300), (20, 900), (1, 0)]),
        # Chunks of a power of two and of one row more, over prefixes mid-page and 1000 deep.
        (2, [(300, 0), (129, 0), (256, 5), (257, 130), (1, 1000)]),
    ],
    ids=[
        "decode",
        "decode-1",
        "few-decodes-mixed",
        "prefill",
        "cached-prefix",
        "mixed",
        "long",
        "long-mixed",
        "uneven",
    ],
)
def test_reference_matches_numpy(num_decode, prefills, kv_heads, group):
    seed = secrets.randbits(32)
    print(f"seed {seed}")
    rng = np.random.default_rng(seed)
    decode_kv_lens = [int(rng.integers(1, 70)) for _ in range(num_decode)]
    batch = build_batch(
        rng,
        decode_kv_lens=decode_kv_lens,
        prefills=prefills,
        kv_heads=kv_heads,
        group=group,
        head_dim=32,
        dtype=jnp.float32,
    )
    got = np.asarray(rpa.ragged_paged_attention_reference(*batch.args, SM_SCALE), np.float64)
    expected = numpy_attention(batch)
    assert np.all(got[batch.num_real_tokens :] == 0.0), "padding tokens must give zeros"
    relative = np.abs(got - expected).max() / np.abs(expected).max()
    assert relative < 1e-5, relative
