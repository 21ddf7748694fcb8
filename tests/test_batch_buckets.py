"""Bucket sizes: every size a step can take is covered, with bounded padding."""

from __future__ import annotations

import pytest

from runtime.batch import (
    Buckets,
    StepShape,
    borrowable_shape,
    bucket_for,
    burst_shapes,
    prefill_token_buckets,
    step_shape,
    width_buckets,
)


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


def test_step_shape_pads_each_size_to_its_bucket():
    buckets = Buckets.build(max_running=48, max_prefill_seqs=16, chunk_tokens=2048, max_pages_per_seq=128)
    # decode only: rows to a power of two, width from the longest row (300 tokens: 19 pages -> 20)
    assert step_shape(buckets, 16, 3, [], [5, 300, 17]) == StepShape(4, 0, 0, 0, 20)
    # one prompt: tokens to a quarter step (300 -> 320), its chunk to a power of two within them
    assert step_shape(buckets, 16, 0, [300], [300]) == StepShape(0, 1, 320, 320, 20)
    # mixed: decode rows pad to MIN_MIXED_DECODE_ROWS, three chunks to four sequences (149 -> 192)
    assert step_shape(buckets, 16, 2, [40, 9, 100], [60, 61, 40, 9, 130]) == StepShape(8, 4, 192, 128, 12)


def test_a_shape_holds_every_smaller_or_equal_step():
    big = StepShape(decode=8, prefill_seqs=2, prefill_tokens=64, max_q=64, width=16)
    assert big.key == (72, 10, 16, 8, 64)
    assert big.holds(big)
    assert big.holds(StepShape(decode=4, prefill_seqs=0, prefill_tokens=0, max_q=0, width=8))
    assert not big.holds(StepShape(decode=16, prefill_seqs=0, prefill_tokens=0, max_q=0, width=8))
    assert not big.holds(StepShape(decode=8, prefill_seqs=4, prefill_tokens=64, max_q=16, width=16))
    assert not big.holds(StepShape(decode=8, prefill_seqs=2, prefill_tokens=64, max_q=128, width=16))
    assert not big.holds(StepShape(decode=8, prefill_seqs=2, prefill_tokens=64, max_q=64, width=20))


def test_borrowing_takes_the_cheapest_holder_at_most_twice_as_large():
    need = StepShape(decode=4, prefill_seqs=0, prefill_tokens=0, max_q=0, width=12)
    decode8_w16 = StepShape(decode=8, prefill_seqs=0, prefill_tokens=0, max_q=0, width=16)
    decode8_w24 = StepShape(decode=8, prefill_seqs=0, prefill_tokens=0, max_q=0, width=24)
    decode16 = StepShape(decode=16, prefill_seqs=0, prefill_tokens=0, max_q=0, width=12)
    decode2 = StepShape(decode=2, prefill_seqs=0, prefill_tokens=0, max_q=0, width=32)
    assert borrowable_shape(need, [decode8_w24, decode8_w16, decode2]) == decode8_w16
    assert borrowable_shape(need, [decode16, decode2]) is None  # 4x the tokens: compile instead
    assert borrowable_shape(need, [StepShape(8, 0, 0, 0, 32)]) is None  # width past 2x
    assert borrowable_shape(need, []) is None
    mixed = StepShape(decode=8, prefill_seqs=1, prefill_tokens=16, max_q=16, width=12)
    assert borrowable_shape(StepShape(8, 1, 16, 16, 8), [mixed, decode8_w16]) == mixed
    # with no size limit (off a CPU) the larger holders serve too, the cheapest first
    assert borrowable_shape(need, [decode16, StepShape(8, 0, 0, 0, 32)], None) == StepShape(8, 0, 0, 0, 32)
    assert borrowable_shape(need, [decode16], None) == decode16
    assert borrowable_shape(need, [mixed], None) is None  # still decode-only from decode-only


def test_the_burst_shapes_hold_the_steps_a_burst_of_prompts_meets():
    """An H200's first burst of 64 requests (128-token prompts, 8192-token chunks) met these five
    mixed steps, each compiled inline: the burst shapes hold every one, the smaller shape first."""
    buckets = Buckets.build(256, 16, 8192, 2048)
    shapes = burst_shapes(buckets, page_size=16, longest_prompt=512)
    assert [shape.key for shape in shapes] == [
        (8256, 80, 64, 64, 512),
        (8448, 272, 64, 256, 512),
        (64, 64, 64, 64, 0),
        (256, 256, 64, 256, 0),
    ]
    met = [
        step_shape(buckets, 16, 1, [128] * 14, [129] * 15),
        step_shape(buckets, 16, 16, [128] * 16, [140] * 32),
        step_shape(buckets, 16, 32, [128] * 16, [140] * 48),
        step_shape(buckets, 16, 64, [128], [384] * 65),
        step_shape(buckets, 16, 7, [128] * 7, [140] * 8),
    ]
    for need in met:
        assert borrowable_shape(need, shapes, None) == shapes[0]
        assert borrowable_shape(need, shapes) is None  # past twice the size: a CPU compiles instead
    assert borrowable_shape(step_shape(buckets, 16, 100, [128], [300] * 101), shapes, None) == shapes[1]
    assert borrowable_shape(step_shape(buckets, 16, 8, [1024], [1024] * 9), shapes, None) is None
    # and the decode steps of the contexts' growing widths, from the first
    for rows, depth in ((64, 140), (64, 384), (32, 384), (1, 1000)):
        assert borrowable_shape(step_shape(buckets, 16, rows, [], [depth] * rows), shapes, None) == shapes[2]
    assert borrowable_shape(step_shape(buckets, 16, 100, [], [300] * 100), shapes, None) == shapes[3]
    # a small engine: its chunk bounds the tokens, its running requests the decode rows
    small = burst_shapes(Buckets.build(32, 16, 512, 64), page_size=16, longest_prompt=512)
    assert [shape.key for shape in small] == [(544, 48, 64, 32, 512), (32, 32, 64, 32, 0)]
