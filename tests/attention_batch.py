"""Random ragged attention batches as the scheduler builds them, for the attention tests.

Shared by the XLA reference's numpy check (main suite) and the Mosaic GPU kernel
tests (kernel venv). Decode rows come first, then prefill chunks (each on a
cached prefix), then padding tokens and padding sequences; pages are handed out
in random order. KV slots that no sequence may see (pages past `kv_lens`,
padding page 0, unused pages, other layers) hold V = POISON_V, so a masking or
page-table slip shows as a large error.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import ragged_paged_attention as rpa

POISON_V = 1000.0


@dataclasses.dataclass
class Batch:
    q: jax.Array
    k_pool: jax.Array
    v_pool: jax.Array
    layer: jax.Array
    meta: rpa.AttentionMetadata
    num_real_tokens: int
    visible_v_max: float  # max |V| over the slots some sequence may see

    @property
    def args(self) -> tuple:
        return (self.q, self.k_pool, self.v_pool, self.layer, self.meta)


def build_batch(
    rng: np.random.Generator,
    *,
    decode_kv_lens: list[int],
    prefills: list[tuple[int, int]],
    kv_heads: int,
    group: int,
    head_dim: int = 64,
    page_size: int = 16,
    dtype: jnp.dtype = jnp.float16,
    num_layers: int = 2,
    pad_tokens: int = 3,
    pad_seqs: int = 1,
) -> Batch:
    """A scheduled batch as the runner builds it: decode rows first, then prefill chunks.

    `prefills` holds (q_len, cached_prefix_len) pairs. Padding: extra tokens
    after the real ones, extra sequences with no tokens, page-table entries 0.
    """
    q_lens = [1] * len(decode_kv_lens) + [q_len for q_len, _ in prefills]
    kv_lens = list(decode_kv_lens) + [q_len + cached for q_len, cached in prefills]
    q_lens += [0] * pad_seqs
    kv_lens += [0] * pad_seqs
    num_seqs = len(q_lens)
    pages_needed = [-(-kv_len // page_size) for kv_len in kv_lens]
    table_width = max(pages_needed) + 1
    num_pages = 1 + sum(pages_needed) + 2  # page 0 (padding) and two pages nobody owns
    page_ids = rng.permutation(np.arange(1, num_pages))
    page_table = np.zeros((num_seqs, table_width), np.int32)
    layer = int(rng.integers(num_layers))
    shape = (num_layers, num_pages, page_size, kv_heads, head_dim)
    k_pool = np.zeros(shape, np.float32)
    v_pool = np.full(shape, POISON_V, np.float32)
    used, visible_v_max = 0, 0.0
    for seq, (kv_len, count) in enumerate(zip(kv_lens, pages_needed, strict=True)):
        page_table[seq, :count] = page_ids[used : used + count]
        used += count
        slots = np.arange(kv_len)
        pages, offsets = page_table[seq, slots // page_size], slots % page_size
        k_pool[layer, pages, offsets] = rng.standard_normal((kv_len, kv_heads, head_dim))
        v_pool[layer, pages, offsets] = rng.standard_normal((kv_len, kv_heads, head_dim))
        visible_v_max = max(visible_v_max, float(np.abs(v_pool[layer, pages, offsets]).max(initial=0.0)))
    assert page_table.min() >= 0 and page_table.max() < num_pages
    num_real_tokens = sum(q_lens)
    num_tokens = num_real_tokens + pad_tokens
    prefill_q = [q_len for q_len, _ in prefills]
    meta = rpa.AttentionMetadata(
        cu_q_lens=jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32),
        kv_lens=jnp.asarray(kv_lens, jnp.int32),
        page_table=jnp.asarray(page_table),
        write_slots=jnp.zeros((num_tokens,), jnp.int32),
        num_tokens=jnp.int32(num_real_tokens),
        num_decode_seqs=len(decode_kv_lens),
        # Bucketed as the scheduler does: a power of two at or above the longest chunk.
        max_prefill_q_len=int(2 ** np.ceil(np.log2(max(prefill_q)))) if prefill_q else 0,
    )
    q = rng.standard_normal((num_tokens, kv_heads * group, head_dim))
    return Batch(
        jnp.asarray(q, dtype),
        jnp.asarray(k_pool, dtype),
        jnp.asarray(v_pool, dtype),
        jnp.int32(layer),
        meta,
        num_real_tokens,
        visible_v_max,
    )
