"""Bidirectional encoders (BERT) get a plain padded `[B, L]` batch path of their own.

A causal prefix cache and chunked prefill mean nothing for them, so requests
are batched as they arrive on one worker thread, padded to power-of-two
buckets (few compiled programs), encoded and pooled as the model folder's
sentence-transformers config says.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from models.pooling import Pooling, load_pooling
from runtime.batch import next_power_of_two
from runtime.io_struct import EngineRequest, OutputCallback, RequestOutput

logger = logging.getLogger(__name__)

MAX_BATCH = 32
Entry = tuple[EngineRequest, OutputCallback, float]  # a request, its callback, its arrival time


def _final(
    request: EngineRequest,
    arrival: float,
    reason: dict[str, Any],
    embedding: list[float] | None = None,
    error: str | None = None,
) -> RequestOutput:
    """A request's one and only output."""
    return RequestOutput(
        rid=request.rid,
        output_ids=[],
        text=None,
        finished=True,
        finish_reason=reason,
        prompt_tokens=len(request.input_ids),
        completion_tokens=0,
        cached_tokens=0,
        e2e_latency=time.monotonic() - arrival,
        embedding=embedding,
        error=error,
    )


class EncoderRunner:
    """Batches embedding requests for an encoder model on its own thread."""

    def __init__(
        self,
        model: nnx.Module,
        model_path: str,
        context_length: int,
        compiler_options: dict[str, Any] | None = None,
    ) -> None:
        self.graphdef, self.params = nnx.split(model)
        self.pooling = load_pooling(model_path)
        self.context_length = context_length
        self._encode = jax.jit(  # static pooling: swaps may change it
            self._encode_fn, static_argnames=("pooling",), compiler_options=compiler_options
        )
        self._shapes: set[tuple[int, int]] = set()
        self._inbox: queue.Queue = queue.Queue()
        # rids in the inbox, and those of them aborted: answered as aborted when their turn
        # comes, not encoded (a client that disconnects from a batch of thousands of texts)
        self._lock = threading.Lock()
        self._queued: set[str] = set()
        self._aborted: set[str] = set()
        self._stop = threading.Event()
        self._served = 0
        self._batches = 0  # batches encoded: a health check watches it move (`num_steps`)
        self._thread = threading.Thread(target=self._loop, name="sglax-encoder", daemon=True)
        self._thread.start()

    def _encode_fn(
        self, params: Any, input_ids: jax.Array, mask: jax.Array, *, pooling: Pooling
    ) -> jax.Array:
        model = nnx.merge(self.graphdef, params)
        hidden = model(input_ids, mask, None)
        return pooling.pool(hidden, mask)

    def submit(self, request: EngineRequest, callback: OutputCallback) -> None:
        with self._lock:
            self._queued.add(request.rid)
        self._inbox.put((request, callback, time.monotonic()))

    def abort(self, rid: str) -> None:
        """Answer a queued request as aborted when its turn comes; one being encoded, or unknown,
        is left as it is (its batch is on the device already)."""
        with self._lock:
            if rid in self._queued:
                self._aborted.add(rid)

    def _take(self, entry: Entry) -> bool:
        """Whether a request taken from the inbox is to be encoded; an aborted one is answered."""
        request, callback, arrival = entry
        with self._lock:
            self._queued.discard(request.rid)
            aborted = request.rid in self._aborted
            self._aborted.discard(request.rid)
        if aborted:
            callback(_final(request, arrival, {"type": "abort", "message": "Aborted by the client."}))
        return not aborted

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            batch = [first] if self._take(first) else []
            while len(batch) < MAX_BATCH:
                try:
                    entry = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if self._take(entry):
                    batch.append(entry)
            if not batch:
                continue
            try:
                self._run(batch)
            except Exception as exc:  # answer every request even when a batch fails
                logger.exception("encoder batch failed")
                for request, callback, arrival in batch:
                    reason = {"type": "abort", "message": str(exc)}
                    callback(_final(request, arrival, reason, error=f"Encoding failed: {exc}"))

    def _run(self, batch: list[Entry]) -> None:
        rows = next_power_of_two(len(batch))
        width = next_power_of_two(max(len(r.input_ids) for r, _, _ in batch), 16)
        input_ids = np.zeros((rows, width), np.int32)
        mask = np.zeros((rows, width), np.int32)
        for i, (request, _, _) in enumerate(batch):
            input_ids[i, : len(request.input_ids)] = request.input_ids
            mask[i, : len(request.input_ids)] = 1
        self._shapes.add((rows, width))
        vectors = np.asarray(self._encode(self.params, input_ids, mask, pooling=self.pooling))
        self._batches += 1
        for i, (request, callback, arrival) in enumerate(batch):
            self._served += 1
            embedding = [float(x) for x in vectors[i]]
            callback(_final(request, arrival, {"type": "length", "length": 0}, embedding=embedding))

    def swap_params(self, new_params: Any, pooling: Pooling) -> None:
        """New weights and the new folder's pooling (its modules.json may differ)."""
        self.params, self.pooling = new_params, pooling

    def stats(self) -> dict[str, Any]:
        waiting = self._inbox.qsize()
        return {
            "num_running_reqs": 0,
            "num_queue_reqs": waiting,
            "num_used_tokens": 0,
            "token_usage": 0.0,
            "num_free_pages": 0,
            "num_cached_pages": 0,
            "num_total_pages": 0,
            "cache_hit_rate": 0.0,
            "avg_request_queue_latency": 0.0,
            "gen_throughput": 0.0,
            "last_gen_throughput": 0.0,
            "num_served": self._served,
            "num_steps": self._batches,
        }

    @property
    def num_compiled_programs(self) -> int:
        return len(self._shapes)

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
