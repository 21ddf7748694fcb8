"""Bucket sizes: every size a step can take is covered, with bounded padding."""

from __future__ import annotations

import pytest

from runtime.batch import Buckets, bucket_for, prefill_token_buckets, width_buckets


def test_width_buckets_quarter_steps_from_16_pages():
    assert width_buckets(8, 128) == [8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128]
    assert width_buckets(1, 4) == [1, 2, 4]
    assert width_buckets(8, 100)[-3:] == [80, 96, 128]  # steps past the maximum are dropped


@pytest.mark.parametrize("chunk", [512, 2000, 2048, 8192])
def test_prefill_token_buckets_bound_padding(chunk):
    buckets = prefill_token_buckets(chunk)
    assert buckets[0] == 16 and buckets[-1] >= chunk
    assert buckets == sorted(set(buckets))
    for tokens in range(1, chunk + 1):
        padded = bucket_for(tokens, buckets)
        assert padded >= tokens
        # Quarter steps from 256 tokens (at most 1.25x), half steps from 128 (1.5x).
        limit = 1.25 if tokens > 256 else 1.5 if tokens > 128 else 2.0
        assert padded <= max(16, limit * tokens), (tokens, padded)


def test_prefill_token_buckets_values():
    assert prefill_token_buckets(2048) == [
        16, 32, 64, 128, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024, 1280, 1536, 1792, 2048,
    ]  # fmt: skip


def test_bucket_for_rejects_sizes_past_the_last_bucket():
    assert bucket_for(0, [0, 16]) == 0
    assert bucket_for(17, [16, 32]) == 32
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        bucket_for(33, [16, 32])


def test_buckets_build_lists_every_dimension():
    buckets = Buckets.build(max_running=48, max_prefill_seqs=16, chunk_tokens=2048, max_pages_per_seq=128)
    assert buckets.decode_seqs == [0, 1, 2, 4, 8, 16, 32, 64]
    assert buckets.prefill_seqs == [0, 1, 2, 4, 8, 16]
    assert buckets.prefill_tokens == [0, *prefill_token_buckets(2048)]
    assert buckets.page_table_width == width_buckets(8, 128)
    assert buckets.max_programs() > len(buckets.page_table_width) * (len(buckets.decode_seqs) - 1)
