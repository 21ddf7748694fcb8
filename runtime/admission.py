"""How much of the KV pool the running requests will still grow into, so that admission can
leave them room: the reference's new-token ratio, on with `--schedule-conservativeness` above 0.

By default a request starts whenever its first chunk's pages are free; when the running
requests' outputs outgrow the pool, the newest is retracted, its computed pages cached in the
radix tree, where its re-admission usually finds them again. On the 2-core box that beat
reserving room (docs/benchmarks.md): SmolLM2, 32 prompts of 32-256 tokens writing 256 each on a
4096-token pool, 30.7 output tok/s in 699 steps, against 24.7 tok/s in 1024 steps with no
retraction at conservativeness 1 (fewer requests at once). Reserving trades that throughput for
fewer retractions: steadier inter-token latency for the requests that would have been retracted.

With reservation on, a request about to be admitted is counted at all it may still write (up to
CLIP_MAX_NEW_TOKENS); a running one at the rest of its prompt and `ratio` of the output it may
still write, since most requests stop before their `max_new_tokens` (all of it for a request
that ignores EOS, which writes every token it may). The ratio starts at
INIT_NEW_TOKEN_RATIO times `--schedule-conservativeness` (at most 1), falls in DECAY_STEPS decode
steps to MIN_NEW_TOKEN_RATIO_FACTOR of that, starts again whenever nothing runs, and after a
retraction restarts from what the decoding requests left have written so far,
RETRACT_DECODE_STEPS more tokens each, over what they may write.
"""

from __future__ import annotations

from collections.abc import Iterable

from runtime.request import Req

INIT_NEW_TOKEN_RATIO = 0.7
MIN_NEW_TOKEN_RATIO_FACTOR = 0.14
DECAY_STEPS = 600
RETRACT_DECODE_STEPS = 20
# Outputs count up to this many tokens: a request allowed 100k tokens would otherwise wait for a
# pool it almost never fills.
CLIP_MAX_NEW_TOKENS = 4096


class GrowthEstimate:
    """The new-token ratio and the pages it sets aside; owned by the scheduler's thread."""

    def __init__(self, conservativeness: float, page_size: int, context_length: int) -> None:
        if conservativeness < 0:
            raise ValueError(f"the schedule conservativeness must be at least 0, got {conservativeness}")
        self.initial = min(INIT_NEW_TOKEN_RATIO * conservativeness, 1.0)
        self.floor = self.initial * MIN_NEW_TOKEN_RATIO_FACTOR
        self.decay = (self.initial - self.floor) / DECAY_STEPS
        self.ratio = self.initial
        self.reserves = conservativeness > 0  # 0: admission sets nothing aside (`Scheduler._admit`)
        self.page_size = page_size
        self.context_length = context_length

    def decode_step(self) -> None:
        """A decode step ran: the estimate eases toward its floor until a retraction says otherwise."""
        self.ratio = max(self.ratio - self.decay, self.floor)

    def idle(self) -> None:
        """Nothing runs: the next requests start from the initial estimate."""
        self.ratio = self.initial

    def retracted(self, running: Iterable[Req]) -> None:
        """The estimate fell short: restart it from what the decoding requests left have written."""
        if not self.reserves:
            return
        written = wanted = steps = 0
        for req in running:
            if not req.finished and req.samples and req.produced:
                written += req.produced
                wanted += req.max_new_tokens
                steps += RETRACT_DECODE_STEPS
        if wanted:
            self.ratio = min((written + steps) / wanted, 1.0)

    def reserved_pages(self, running: Iterable[Req]) -> int:
        """Pages the running requests are expected to take beyond those they hold."""
        total = 0
        for req in running:
            if not req.finished:
                total += max(self._pages_after(req, self.ratio) - len(req.pages), 0)
        return total

    def pages_to_finish(self, req: Req) -> int:
        """Pages a request about to be admitted may take beyond those it holds, all its output counted."""
        return max(self._pages_after(req, 1.0) - len(req.pages), 0)

    def _pages_after(self, req: Req, ratio: float) -> int:
        if not req.samples:
            return -(-len(req.all_ids) // self.page_size)
        if req.request.sampling_params.ignore_eos:
            ratio = 1.0
        to_write = min(req.max_new_tokens - req.produced, CLIP_MAX_NEW_TOKENS)
        tokens = len(req.all_ids) + req.inflight + int(ratio * max(to_write, 0))
        return -(-min(tokens, self.context_length) // self.page_size)
