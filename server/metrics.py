"""Prometheus metrics under the reference's names, so existing SGLang dashboards work.

Latencies (time to first token, inter-token latency, end-to-end) are observed in
the server, from the arrival times of a request's outputs on the event loop; a
request that does not stream reports once, at its end, so its first token's time
comes from the engine (`first_token_latency`) and its inter-token latency is the
mean gap of its later tokens (the reference sends such requests' outputs every 50
tokens and takes TTFT at the first of them);
the scheduler's gauges (running and queued requests, token usage, throughput,
cache hit rate) and its count of retractions are read from `engine.stats()` when
/metrics is scraped, so the scheduler thread pays nothing for them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from runtime.io_struct import EngineRequest, RequestOutput

TTFT_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 120, 160)
ITL_BUCKETS = (
    0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.025, 0.03, 0.035, 0.04, 0.05, 0.06, 0.08,
    0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip
E2E_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400, 800)

# engine.stats() key -> gauge name (without the `sglang:` prefix).
STAT_GAUGES = {
    "num_running_reqs": "The number of running requests.",
    "num_queue_reqs": "The number of requests in the waiting queue.",
    "num_used_tokens": "The number of used tokens.",
    "token_usage": "The token usage (fraction of the KV pool in use).",
    "gen_throughput": "The generation throughput (token/s).",
    "cache_hit_rate": "The prefix cache hit rate.",
    "avg_request_queue_latency": "The average request queue latency of the last batch (s).",
    "new_token_ratio": "The share of their remaining output that running requests are expected to write.",
}

CONTENT_TYPE = CONTENT_TYPE_LATEST


class RequestTimer:
    """Arrival times of one request's outputs, for TTFT and inter-token latency."""

    __slots__ = ("created", "first_token_at", "last_at", "last_completion_tokens")

    def __init__(self) -> None:
        self.created = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_at = self.created
        self.last_completion_tokens = 0


class ServerMetrics:
    """The collector of one server; its own registry, so several apps in one process never clash."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.labels = {"model_name": model_name}
        names = ["model_name"]

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"sglang:{name}", doc, names, registry=self.registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"sglang:{name}", doc, names, buckets=buckets, registry=self.registry)

        self.prompt_tokens = counter("prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Number of generation tokens processed.")
        self.cached_tokens = counter("cached_tokens", "Number of prompt tokens served from the prefix cache.")
        self.num_requests = counter("num_requests", "Number of requests processed.")
        # Counted by the scheduler (`num_retracted_reqs`, since the start); advanced at each scrape.
        self.retracted_requests = counter("num_retracted_requests", "Number of requests retracted.")
        self.retracted_requests.labels(**self.labels)  # shown at 0 before the first
        self._retracted_seen = 0
        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS
        )
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", ITL_BUCKETS
        )
        self.e2e_request_latency = histogram(
            "e2e_request_latency_seconds", "Histogram of end-to-end request latency in seconds.", E2E_BUCKETS
        )
        self.gauges = {
            key: Gauge(f"sglang:{key}", doc, names, registry=self.registry)
            for key, doc in STAT_GAUGES.items()
        }

    def observe(self, request: EngineRequest, timer: RequestTimer, output: RequestOutput) -> None:
        """Record one output of a request as it reaches the event loop."""
        now = time.perf_counter()
        labels = self.labels
        new_tokens = output.completion_tokens - timer.last_completion_tokens
        if not request.stream:
            if output.finished:
                self._observe_unstreamed(now - timer.created, output)
        elif new_tokens > 0:
            if timer.first_token_at is None:
                timer.first_token_at = now
                self.time_to_first_token.labels(**labels).observe(now - timer.created)
                new_tokens -= 1  # the first token's wait is TTFT, not an inter-token gap
            if new_tokens > 0:
                self._observe_gaps((now - timer.last_at) / new_tokens, new_tokens)
            timer.last_completion_tokens = output.completion_tokens
        timer.last_at = now
        if output.finished:
            self.e2e_request_latency.labels(**labels).observe(now - timer.created)
            self.num_requests.labels(**labels).inc()
            self.prompt_tokens.labels(**labels).inc(output.prompt_tokens)
            self.cached_tokens.labels(**labels).inc(output.cached_tokens)
            if request.kind == "generate":
                self.generation_tokens.labels(**labels).inc(output.completion_tokens)

    def _observe_unstreamed(self, waited: float, output: RequestOutput) -> None:
        """TTFT and ITL of a request that reports only at its end (`waited` seconds after it came),
        from the engine's timings: its first token came (end - first token) before this output."""
        if output.first_token_latency is None or output.completion_tokens == 0:
            return
        labels = self.labels
        after_first = max(0.0, output.e2e_latency - output.first_token_latency)
        self.time_to_first_token.labels(**labels).observe(max(0.0, waited - after_first))
        gaps = output.completion_tokens - 1
        if gaps > 0:
            self._observe_gaps(after_first / gaps, gaps)

    def _observe_gaps(self, gap: float, count: int) -> None:
        """`count` inter-token gaps of `gap` seconds each; the labelled child is looked up once (for a
        4000-token answer: 2.3 ms of the event loop against 6.3 ms looked up per gap)."""
        histogram = self.inter_token_latency.labels(**self.labels)
        for _ in range(count):
            histogram.observe(gap)

    def render(self, stats: Mapping[str, Any]) -> bytes:
        """The exposition text, with the scheduler gauges refreshed from `stats` first."""
        for key, gauge in self.gauges.items():
            value = stats.get(key)
            if isinstance(value, int | float):
                gauge.labels(**self.labels).set(value)
        retracted = stats.get("num_retracted_reqs")
        if isinstance(retracted, int) and retracted > self._retracted_seen:
            self.retracted_requests.labels(**self.labels).inc(retracted - self._retracted_seen)
            self._retracted_seen = retracted
        return generate_latest(self.registry)
