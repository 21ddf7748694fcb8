"""The room admission leaves running requests to grow into (the new-token ratio)."""

from __future__ import annotations

import pytest

from runtime.admission import (
    CLIP_MAX_NEW_TOKENS,
    DECAY_STEPS,
    INIT_NEW_TOKEN_RATIO,
    MIN_NEW_TOKEN_RATIO_FACTOR,
    RETRACT_DECODE_STEPS,
    GrowthEstimate,
)
from runtime.io_struct import EngineRequest
from runtime.request import Req
from runtime.sampling_params import SamplingParams

PAGE = 16


def _req(prompt: int, max_new: int, written: int = 0, pages: int = 0, kind: str = "generate") -> Req:
    req = Req(
        EngineRequest("r", list(range(prompt)), kind=kind),
        callback=print,
        max_new_tokens=max_new if kind == "generate" else 0,
        seed=0,
        eos_ids=frozenset(),
    )
    req.all_ids = list(range(prompt + written))
    req.output_ids = list(range(written))
    req.pages = list(range(pages))
    return req


def test_the_ratio_starts_falls_to_its_floor_and_restarts_when_idle() -> None:
    growth = GrowthEstimate(1.0, PAGE, 4096)
    assert growth.ratio == INIT_NEW_TOKEN_RATIO
    growth.decode_step()
    assert growth.ratio < INIT_NEW_TOKEN_RATIO
    for _ in range(DECAY_STEPS):
        growth.decode_step()
    assert growth.ratio == pytest.approx(INIT_NEW_TOKEN_RATIO * MIN_NEW_TOKEN_RATIO_FACTOR)
    growth.idle()
    assert growth.ratio == INIT_NEW_TOKEN_RATIO


def test_conservativeness_scales_the_ratio_up_to_one() -> None:
    assert GrowthEstimate(0.5, PAGE, 4096).ratio == pytest.approx(INIT_NEW_TOKEN_RATIO / 2)
    assert GrowthEstimate(10.0, PAGE, 4096).ratio == 1.0
    assert GrowthEstimate(0.0, PAGE, 4096).ratio == 0.0
    with pytest.raises(ValueError, match="at least 0"):
        GrowthEstimate(-1.0, PAGE, 4096)


def test_a_retraction_restarts_the_ratio_from_what_was_written() -> None:
    growth = GrowthEstimate(1.0, PAGE, 4096)
    prefilling = _req(500, 1000)  # not decoding yet: nothing learnt from it
    running = [_req(10, 100, written=30), prefilling, _req(10, 300, written=50)]
    growth.retracted(running)
    assert growth.ratio == pytest.approx((30 + 50 + 2 * RETRACT_DECODE_STEPS) / 400)
    growth.retracted([_req(10, 10, written=9)])
    assert growth.ratio == 1.0  # never above all of it
    ratio = growth.ratio
    growth.retracted([])  # nothing left running: nothing to learn from
    assert growth.ratio == ratio
    off = GrowthEstimate(0.0, PAGE, 4096)  # reserving nothing, its ratio stays 0
    off.retracted(running)
    assert off.ratio == 0.0


def test_running_requests_reserve_their_prompt_and_a_share_of_their_output() -> None:
    growth = GrowthEstimate(1.0, PAGE, 4096)
    growth.ratio = 0.5
    # 40 prompt tokens computed into 3 pages, 200 to write: 40 + 100 tokens, 9 pages, 6 more.
    decoding = _req(40, 200, pages=3)
    assert growth.reserved_pages([decoding]) == 6
    # A prompt still in chunks reserves all of its prompt: 300 + 50 tokens, 22 pages, 20 more.
    prefilling = _req(300, 100, pages=2)
    assert growth.reserved_pages([decoding, prefilling]) == 6 + 20
    # 150 written: 190 tokens and half of the 50 left, 215 tokens, 14 pages, 2 more.
    assert growth.reserved_pages([_req(40, 200, written=150, pages=12)]) == 2
    finished = _req(40, 200, pages=3)
    finished.finished = True
    assert growth.reserved_pages([finished]) == 0
    ignoring_eos = _req(40, 200, pages=3)
    ignoring_eos.request.sampling_params = SamplingParams(ignore_eos=True)
    assert growth.reserved_pages([ignoring_eos]) == 12  # all 200: 240 tokens, 15 pages
    embedding = _req(100, 0, pages=0, kind="embed")
    assert growth.reserved_pages([embedding]) == 7


def test_a_new_request_counts_all_it_may_write_within_the_context_and_the_clip() -> None:
    growth = GrowthEstimate(0.0, PAGE, 1 << 20)
    assert growth.pages_to_finish(_req(40, 200)) == 15  # 240 tokens, the ratio aside
    assert growth.pages_to_finish(_req(40, 200, pages=2)) == 13  # two pages from the prefix cache
    assert growth.pages_to_finish(_req(40, 200, written=100)) == 15  # retracted: 140 in, 100 to go
    clipped = growth.pages_to_finish(_req(16, 100_000))
    assert clipped == (16 + CLIP_MAX_NEW_TOKENS) // PAGE
    assert GrowthEstimate(1.0, PAGE, 100).pages_to_finish(_req(40, 200)) == 7  # the context: 100
