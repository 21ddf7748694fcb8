"""The Prometheus collector's latency histograms, fed the outputs a request's client would see."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from runtime.io_struct import EngineRequest, RequestOutput
from server.metrics import RequestTimer, ServerMetrics


def _samples(metrics: ServerMetrics) -> dict[str, float]:
    text = metrics.render({}).decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.name.endswith("_bucket") and not sample.name.endswith("_created")
    }


def _output(
    completion_tokens: int, finished: bool, e2e: float = 0.0, first: float | None = None
) -> RequestOutput:
    return RequestOutput(
        rid="r",
        output_ids=list(range(completion_tokens)),
        text=None,
        finished=finished,
        finish_reason={"type": "length", "length": completion_tokens} if finished else None,
        prompt_tokens=7,
        completion_tokens=completion_tokens,
        cached_tokens=0,
        e2e_latency=e2e,
        first_token_latency=first,
    )


def test_a_request_that_does_not_stream_reports_ttft_and_itl_from_the_engine():
    metrics = ServerMetrics("m")
    timer = RequestTimer()
    timer.created -= 3.0  # the client has waited 3 s when the answer arrives
    # The engine: first token 1.0 s after arrival, the last of 11 at 2.0 s.
    metrics.observe(EngineRequest(rid="r", input_ids=[1] * 7), timer, _output(11, True, e2e=2.0, first=1.0))
    got = _samples(metrics)
    assert got["sglang:time_to_first_token_seconds_count"] == 1
    # 3 s in all, less the engine's 1 s from first token to end (the rest is HTTP and queueing).
    assert got["sglang:time_to_first_token_seconds_sum"] == pytest.approx(2.0, abs=0.05)
    assert got["sglang:inter_token_latency_seconds_count"] == 10
    assert got["sglang:inter_token_latency_seconds_sum"] == pytest.approx(1.0)
    assert got["sglang:e2e_request_latency_seconds_count"] == 1
    assert got["sglang:generation_tokens_total"] == 11 and got["sglang:prompt_tokens_total"] == 7


def test_a_streamed_request_reports_from_its_events_and_nothing_without_tokens():
    metrics = ServerMetrics("m")
    timer = RequestTimer()
    request = EngineRequest(rid="r", input_ids=[1] * 7, stream=True)
    for tokens in (1, 3, 4):
        metrics.observe(request, timer, _output(tokens, tokens == 4, e2e=9.0, first=0.0))
    got = _samples(metrics)
    assert got["sglang:time_to_first_token_seconds_count"] == 1
    assert got["sglang:inter_token_latency_seconds_count"] == 3  # one gap per token after the first
    # An embedding (no tokens) and an unfinished non-streamed output add no latency samples.
    metrics.observe(EngineRequest(rid="e", input_ids=[1], kind="embed"), RequestTimer(), _output(0, True))
    metrics.observe(EngineRequest(rid="u", input_ids=[1]), RequestTimer(), _output(2, False, first=0.1))
    got = _samples(metrics)
    assert got["sglang:time_to_first_token_seconds_count"] == 1
    assert got["sglang:e2e_request_latency_seconds_count"] == 2


def test_retractions_count_up_from_the_schedulers_total():
    metrics = ServerMetrics("m")
    assert _samples(metrics)["sglang:num_retracted_requests_total"] == 0
    for total, expected in ((3, 3), (3, 3), (5, 5), (None, 5)):
        text = metrics.render({"num_retracted_reqs": total} if total is not None else {}).decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        family = families["sglang:num_retracted_requests"]
        assert family.type == "counter" and family.samples[0].value == expected
