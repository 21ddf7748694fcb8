"""The host loop: admit, prefix-match, allocate, batch, run, read back, stream out.

Runs on its own thread and owns every host structure (requests, radix tree,
allocator) without locks; other threads reach it through `self.inbox`. Each
iteration dispatches step N+1 before reading step N's tokens, so host work
overlaps device work; a decode row whose previous token is still on the device
names the request's slot instead (`token_source`), where the sampler left it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from runtime.admission import GrowthEstimate
from runtime.batch import Buckets, ScheduledBatch, StepShape, sampler_rows, step_shape
from runtime.detokenizer import OutputText, find_stop_string, partial_stop_suffix, scheduler_needs_text
from runtime.grammar import TokenGrammars
from runtime.io_struct import RequestOutput
from runtime.kv_pool import KVPool
from runtime.model_runner import DispatchedForward, ModelRunner, StepOutput
from runtime.output_deltas import OutputDelta
from runtime.profiler import StepProfiler
from runtime.radix_cache import RadixCache
from runtime.request import Req
from runtime.sampling import SamplingBatch, SamplingRow, grammar_masks, make_sampling_batch
from runtime.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# Prefill sequences per step: enough that a burst of short prompts fills the chunk budget
# (with 8, 32 prompts of 32-256 tokens left steps of ~1200 tokens padded to 2048).
MAX_PREFILL_SEQS = 16
# Waiting requests held back for a prefix in progress per step, after which admission stops for
# the step: each check matches the request's prompt in the radix tree (a helper timed 64 held-back
# 2000-token prompts at 5.6 ms a step), and one held back is soon admitted with its prefix cached.
MAX_DEFERRED_PER_STEP = 64
# A request waits a step for a prefix in progress only if it would then reuse this many more
# tokens: a chat template's header (SmolLM2's default system prompt is a page) is not worth a step.
MIN_PREFIX_WAIT_TOKENS = 64
# The lpm policy ranks at most this many waiting requests; a longer queue is served first come,
# first served, as the reference does: each rank is a radix-tree match of the prompt (4 ms a step
# for 128 waiting 700-token prompts on the 2-core box, 34 ms for 1000).
LPM_MAX_WAITING = 128
# A decode batch's next page-table width compiles aside from this many pages before its deepest
# row needs it (64 tokens at 16 a page: 0.3 s of batch-64 steps on an H100, 5 s of batch-32 steps
# on the 2-core box; a program loads from a warm compile cache in 0.1-0.3 s).
AHEAD_PAGES = 4
# Rows that sample nothing (padding, unfinished prefill chunks) take the cheapest path: greedy.
PADDING_ROW = SamplingRow(params=SamplingParams(temperature=0.0), seed=0, output_index=0, penalty_slot=0)


def _thread_cpu_time(ident: int | None) -> float | None:
    """A live thread's CPU seconds, or None where threads have no CPU clock."""
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(ident))
    except (AttributeError, OSError, TypeError):
        return None


class _Plan:
    """What a dispatched step means for the host: which request sits in which row."""

    def __init__(self) -> None:
        self.sampled: list[tuple[Req, int]] = []  # (request, sequence row) whose token is wanted
        self.finished_prefill: list[
            tuple[Req, int]
        ] = []  # requests that sample nothing, done this step: (req, token row)
        self.chunks: list[tuple[Req, int, int, int]] = []  # (request, first position, tokens, first row)
        self.sample_rows: np.ndarray | None = None  # token row of each sequence's last token
        self.num_new_tokens = 0
        self.num_cached_tokens = 0
        self.num_new_seqs = 0
        self.queue_wait = 0.0  # seconds the newly admitted requests waited, summed
        self.num_decode = 0
        self.constrained = False  # a request with a grammar samples: its next mask needs this token

    def take_admissions(self, other: _Plan) -> None:
        """Move `other`'s admission figures (new requests, their cached tokens and queue wait) here."""
        self.num_new_seqs += other.num_new_seqs
        self.num_cached_tokens += other.num_cached_tokens
        self.queue_wait += other.queue_wait
        other.num_new_seqs = other.num_cached_tokens = 0
        other.queue_wait = 0.0


class Scheduler:
    """Continuous batching with chunked prefill, a radix prefix cache and retraction."""

    def __init__(
        self,
        runner: ModelRunner,
        pool: KVPool,
        tokenizer: Any,
        *,
        context_length: int,
        max_running_requests: int,
        chunked_prefill_size: int,
        schedule_policy: str,
        disable_radix_cache: bool,
        schedule_conservativeness: float = 0.0,
        stream_interval: int,
        eos_ids: frozenset[int],
        burst_window: float = 0.0,
        grammars: TokenGrammars | None = None,
        dispatch_thread: bool = False,
    ) -> None:
        """`burst_window` (seconds): see `_drain_inbox`. `grammars` makes the token masks of
        requests with a grammar (`Req.grammar`). `dispatch_thread`: see `_dispatch_forward`.
        `schedule_conservativeness`: see `_fits_beside_the_running`."""
        self.runner = runner
        self.pool = pool
        self.allocator = pool.allocator
        self.page_size = pool.page_size
        self.radix = RadixCache(self.allocator, self.page_size, disable=disable_radix_cache)
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.max_running = max_running_requests
        self.chunk_tokens = chunked_prefill_size
        self.policy = schedule_policy
        self.growth = GrowthEstimate(schedule_conservativeness, self.page_size, context_length)
        self.num_retracted = 0  # retractions since start, for /get_server_info and /metrics
        self._reserved_pages: int | None = None  # `_admit`'s running total within a step
        self.stream_interval = max(1, stream_interval)
        self.burst_window = burst_window
        self.grammars = grammars
        # What a held-back request must stand to reuse, in whole pages (`_waits_for_prefix`).
        self._prefix_wait_tokens = max(1, -(-MIN_PREFIX_WAIT_TOKENS // self.page_size)) * self.page_size
        self.eos_ids = eos_ids
        self._sorted_eos_ids = tuple(sorted(eos_ids))  # each sampled row carries them, every step
        max_pages_per_seq = -(-context_length // self.page_size)
        self.buckets = Buckets.build(
            max_running_requests, MAX_PREFILL_SEQS, chunked_prefill_size, max_pages_per_seq
        )
        self.inbox: queue.Queue = queue.Queue()
        self.waiting: collections.deque[Req] = collections.deque()
        self.running: list[Req] = []
        self.by_rid: dict[str, Req] = {}
        self.free_slots = list(range(max_running_requests, 0, -1))
        self._pending: tuple[_Plan, StepOutput] | None = None
        # The decode rows, sampler rows and sampling batch of the last step in which no prefill
        # chunk sampled (`_sampling_batch`): its other rows are padding to the sampler.
        self._decode_sampling: tuple[tuple[Req, ...], int, SamplingBatch] | None = None
        # A step split for want of a program (`_part_with_a_program`): whether a mixed step's
        # prefill chunks ran last time, and the admissions of requests whose chunks were left out.
        self._split_ran_prefills = False
        self._held_admissions = _Plan()
        self._decode_steps = 0  # steps built with decode rows (`Req.last_decode_step`)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sglax-scheduler", daemon=True)
        self._dispatcher = (
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sglax-dispatch")
            if dispatch_thread
            else None
        )
        self._dispatch_ident: int | None = None
        self._hold_admission = False
        self.profiler = StepProfiler()
        # Statistics for logs, /get_server_info and /metrics.
        self.last_gen_throughput = 0.0
        self._gen_tokens_since_log = 0
        self._last_log = time.monotonic()
        # The last prefill batch's figures, as the reference's metrics report them.
        self.last_cache_hit_rate = 0.0
        self.last_queue_latency = 0.0
        self.error: BaseException | None = None
        self.failed = threading.Event()  # set once the loop has crashed and answered everyone
        self.num_steps = 0  # steps dispatched

    def thread_cpu_time(self) -> float | None:
        """Seconds of CPU the scheduler thread has used (its host work; the device's compute, even
        on a CPU backend, runs on XLA's threads), or None where threads have no CPU clock."""
        if not self._thread.is_alive():  # an ended thread's id may name nothing (or another thread)
            return None
        return _thread_cpu_time(self._thread.ident)

    def dispatch_thread_cpu_time(self) -> float | None:
        """Seconds of CPU the dispatch thread has used (`_dispatch_forward`), or None without one."""
        if self._dispatch_ident is None or not self._thread.is_alive():
            return None
        return _thread_cpu_time(self._dispatch_ident)

    # -- thread plumbing -------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        self.inbox.put(("wake",))
        self._thread.join(timeout=30)
        if self._dispatcher is not None:
            self._dispatcher.shutdown(wait=False)
        self.runner.close()

    def submit(self, req: Req) -> None:
        self.inbox.put(("req", req))

    def abort(self, rid: str) -> None:
        self.inbox.put(("abort", rid))

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the scheduler thread between two steps and return its result."""
        if self.error is not None:
            raise RuntimeError(f"The scheduler failed: {self.error}")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.inbox.put(("call", fn, future))
        if self.error is not None:  # crashed while we queued: the drain may have missed our item
            self._fail_inbox(self.error)
        return future.result()

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_inbox(block=not self._has_work())
                if self._pending is not None and self._pending[0].constrained:
                    # A grammar's next mask depends on the token still on the device: read it
                    # first, giving up this step's overlap (`Req.grammar`).
                    self._flush_pending()
                plan, batch = self._schedule()
                dispatched = self._dispatch_forward(batch) if batch is not None else None
                # The previous step's tokens are read while this step's forward runs, before its
                # sampling is dispatched: a sampler with branches holds the host, on a GPU, until
                # the forward before it has run.
                if self._pending is not None:
                    self._process(*self._pending)
                forward = dispatched.result() if dispatched is not None else None
                output = self.runner.sample(forward) if forward is not None else None
                if batch is not None:
                    self.num_steps += 1
                    if self.profiler.active:
                        self.profiler.step_done()
                self._pending = (plan, output) if batch is not None else None
                self._maybe_log()
        except BaseException as exc:  # a bug must not leave clients hanging
            logger.exception("scheduler crashed")
            self.error = exc
            try:
                for req in list(self.by_rid.values()):
                    message = f"internal error: {exc}"
                    try:
                        self._finish(req, {"type": "abort", "message": message}, release=False, error=message)
                    except Exception:  # the same bug again (its text, say): the others still get theirs
                        logger.exception("request %s could not be told of the crash", req.rid)
            finally:
                self._fail_inbox(exc)
                self.failed.set()

    def _dispatch_forward(self, batch: ScheduledBatch) -> concurrent.futures.Future:
        """Dispatch the step's forward, on the dispatch thread where there is one.

        On a GPU, XLA launches a program's kernels from the thread that calls it, with the GIL
        let go: about 580 kernels a decode step, 0.6-0.7 ms of the scheduler thread's 2.5 ms a
        step at batch 64 on an H200, where the device step takes 2.2 ms (docs/benchmarks.md,
        fifth GPU session). On a thread of its own that launch overlaps the previous step's
        output work (`_process`), which touches no state the forward changes: the runner's
        pools and tables are read again only once this step's dispatch has returned. On a CPU
        the program runs on XLA's own threads and its dispatch costs little, so there is none.
        """
        if self._dispatcher is not None:
            return self._dispatcher.submit(self._forward_on_dispatch_thread, batch)
        done: concurrent.futures.Future = concurrent.futures.Future()
        done.set_result(self.runner.forward(batch))
        return done

    def _forward_on_dispatch_thread(self, batch: ScheduledBatch) -> DispatchedForward:
        self._dispatch_ident = threading.get_ident()  # for its CPU clock
        return self.runner.forward(batch)

    def _fail_inbox(self, exc: BaseException) -> None:
        """After a crash nothing will serve the queue: answer every waiting request and call."""
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return
            if item[0] == "call":
                item[2].set_exception(RuntimeError(f"The scheduler failed: {exc}"))
            elif item[0] == "req":
                self._reject(item[1], f"The scheduler failed: {exc}")

    def _has_work(self) -> bool:
        return bool(self.running or self.waiting or self._pending)

    def _drain_inbox(self, block: bool) -> None:
        """Take what the inbox holds; with `block` (nothing to run), wait for a first item.

        What arrives right behind a first item that woke an idle loop is gathered too, until
        `burst_window` passes with nothing new (at most ten windows in all): requests sent
        together reach the scheduler over a few milliseconds, one by one, and a loop that
        started at the first would split the burst into several partial prefill steps. On the
        2-core box a burst of 32 prompts (issue 9's decode-heavy run) then took 3.6-6.3 s to
        prefill, by how it arrived, against 3.6-3.7 s with a 3 or 5 ms window (3 ms once let a
        burst split: 4.0 s).
        """
        gather_until = None
        while True:
            try:
                if block:
                    item = self.inbox.get(timeout=0.5)
                    if self.burst_window > 0:
                        gather_until = time.monotonic() + 10 * self.burst_window
                elif gather_until is not None and time.monotonic() < gather_until:
                    item = self.inbox.get(
                        timeout=max(0.0, min(self.burst_window, gather_until - time.monotonic()))
                    )
                else:
                    item = self.inbox.get_nowait()
            except queue.Empty:
                return
            block = False
            kind = item[0]
            if kind == "req":
                req = item[1]
                if req.rid in self.by_rid:
                    self._reject(req, f"Request id {req.rid!r} is already in flight.", status=400)
                    continue
                self.by_rid[req.rid] = req
                req.all_ids = list(req.request.input_ids)
                self.waiting.append(req)
            elif kind == "abort":
                self._abort(item[1])
            elif kind == "call":
                _, fn, future = item
                try:
                    future.set_result(fn())
                except BaseException as exc:
                    future.set_exception(exc)

    def _reject(self, req: Req, message: str, status: int = 500) -> None:
        delta = self._output(
            req, finished=True, error=message, finish_reason={"type": "abort", "message": message}
        )
        delta[0].error_status = status
        req.callback(delta)

    # -- scheduling -----------------------------------------------------------------------------

    def _schedule(self) -> tuple[_Plan, ScheduledBatch | None]:
        plan = _Plan()
        decodes, chunked = [], []  # one pass over the running requests (64+ of them, every step)
        for req in self.running:
            if req.finished:
                continue
            remaining = req.remaining
            if remaining == 1 and self._wants_more(req):
                decodes.append(req)
            elif remaining > 1 or (remaining == 1 and not req.samples):
                # Requests that sample nothing finish with a prefill chunk, even a one-token one.
                chunked.append(req)
        decodes = self._ensure_decode_pages(decodes)
        prefills: list[tuple[Req, int]] = []
        budget = self.chunk_tokens
        for req in chunked:
            if budget <= 0 or len(prefills) >= MAX_PREFILL_SEQS:
                break
            if not req.finished:  # a retraction above may have read a pending step that ended it
                take = self._take_chunk(req, budget)
                if take == 0:
                    break
                prefills.append((req, take))
                budget -= take
        if not self._hold_admission:
            self._order_waiting()
            computing = self._prefixes_in_progress() if self.waiting else {}
            self._reserved_pages = None  # worked out at the step's first admission
            deferred: list[Req] = []
            while self.waiting and budget > 0 and len(prefills) < MAX_PREFILL_SEQS:
                if len(self.running) >= self.max_running:
                    break
                req = self.waiting[0]
                if self._waits_for_prefix(req, computing):
                    deferred.append(self.waiting.popleft())
                    if len(deferred) >= MAX_DEFERRED_PER_STEP:
                        break
                    continue
                take = self._admit(req, budget, plan)
                if take == 0:
                    break
                self.waiting.popleft()
                self.running.append(req)
                if req.remaining == 1 and req.samples:
                    decodes.append(req)
                else:
                    prefills.append((req, take))
                    budget -= take
                    self._add_prefix_in_progress(computing, req)
            self.waiting.extendleft(reversed(deferred))  # first in line again next step
        if not decodes and not prefills:
            stuck = [r for r in self.running if not r.finished and r.remaining > 1]
            if stuck and self._pending is None and len(self.running) > 1:
                # Every running request waits for pages that only another can give back.
                self._retract(max(stuck, key=lambda r: r.admitted_at or 0.0))
            return plan, None
        decodes, prefills, need = self._part_with_a_program(plan, decodes, prefills)
        if prefills:
            plan.take_admissions(self._held_admissions)
        batch = self._build_batch(plan, decodes, prefills, need)
        if plan.num_new_seqs:
            seen = plan.num_cached_tokens + plan.num_new_tokens
            self.last_cache_hit_rate = plan.num_cached_tokens / max(seen, 1)
            self.last_queue_latency = plan.queue_wait / plan.num_new_seqs
        if prefills:
            self._log_prefill(plan)
        return plan, batch

    def _log_prefill(self, plan: _Plan) -> None:
        total = self.allocator.num_total
        usage = (total - self.allocator.num_free - self.radix.evictable_pages()) / max(total, 1)
        logger.info(
            "Prefill batch. #new-seq: %d, #new-token: %d, #cached-token: %d, token usage: %.2f, "
            "#running-req: %d, #queue-req: %d",
            plan.num_new_seqs,
            plan.num_new_tokens,
            plan.num_cached_tokens,
            usage,
            len(self.running),
            len(self.waiting),
        )

    def _wants_more(self, req: Req) -> bool:
        if not req.samples:
            return False
        return req.produced < req.max_new_tokens and len(req.all_ids) + req.inflight < self.context_length

    def _order_waiting(self) -> None:
        if self.policy == "lpm" and 1 < len(self.waiting) <= LPM_MAX_WAITING:
            ranked = sorted(self.waiting, key=lambda r: -self.radix.cached_len(self._reusable_ids(r)))
            self.waiting = collections.deque(ranked)

    def _reusable_ids(self, req: Req) -> list[int]:
        """The tokens whose cached KV a request may take instead of computing them."""
        reusable = req.all_ids[:-1]
        if req.request.return_logprob and req.request.logprob_start_len >= 0:
            # Input logprobs need the hidden states of every position from logprob_start_len on.
            reusable = reusable[: req.request.logprob_start_len]
        return reusable

    def _prefixes_in_progress(self) -> dict[tuple[int, ...], list[Req]]:
        """Running requests whose prompt is not all computed (nor in the radix tree), by first page."""
        computing: dict[tuple[int, ...], list[Req]] = {}
        for req in self.running:
            if req.num_computed < req.prompt_len:
                self._add_prefix_in_progress(computing, req)
        return computing

    def _add_prefix_in_progress(self, computing: dict[tuple[int, ...], list[Req]], req: Req) -> None:
        if not self.radix.disable and req.prompt_len > self.page_size:
            computing.setdefault(tuple(req.all_ids[: self.page_size]), []).append(req)

    def _waits_for_prefix(self, req: Req, computing: dict[tuple[int, ...], list[Req]]) -> bool:
        """Whether a waiting request should let a running one finish computing their shared prefix.

        Admitted now, it would compute that prefix a second time in the same steps (the n samples
        of one prompt, a burst of requests behind one system prompt); a step later it finds the
        prefix in the radix tree (`_share_computed`). It waits while the running request computes
        at least MIN_PREFIX_WAIT_TOKENS (in whole pages) more of their common prefix than the tree
        holds.
        """
        ps = self.page_size
        sources = computing.get(tuple(req.all_ids[:ps])) if len(req.all_ids) > ps else None
        if not sources:
            return False
        reusable = self._reusable_ids(req)
        shared = self.radix.cached_len(reusable) + self._prefix_wait_tokens
        if len(reusable) < shared:
            return False
        return any(
            source.prompt_len >= shared and source.all_ids[:shared] == reusable[:shared] for source in sources
        )

    def _share_computed(self, req: Req) -> None:
        """Put a request's computed full pages in the radix tree now rather than when it ends, so that
        requests with the same prefix (held back by `_waits_for_prefix`) take them from the next step
        on. The KV is written by a step already dispatched, and steps run in order on the device."""
        if self.radix.disable or req.locked_node is None or req.num_computed < self.page_size:
            return
        match = self.radix.cache_unfinished(req.all_ids[: req.num_computed], req.pages, req.locked_node)
        # A new list: `Req.page_row` keeps its array while the list is the same one at the same length,
        # and pages the tree held already (computed twice in one step) were just freed.
        req.pages = match.pages + req.pages[len(match.pages) :]
        req.locked_node = match.node

    def _pages_needed(self, req: Req, new_tokens: int) -> int:
        total = -(-(req.num_computed + new_tokens) // self.page_size)
        return max(0, total - len(req.pages))

    def _alloc(self, req: Req, n: int) -> list[int] | None:
        """`n` more pages for `req`, placed after its last one with room for what it will still need."""
        if n == 0:
            return []
        final_tokens = len(req.all_ids) if not req.is_generation else req.prompt_len + req.max_new_tokens
        final_pages = -(-min(final_tokens, self.context_length) // self.page_size)
        after = req.pages[-1] if req.pages else None
        room = max(0, final_pages - len(req.pages) - n)
        pages = self.allocator.alloc(n, after=after, room=room)
        if pages is None:
            self.radix.evict(n - self.allocator.num_free)
            pages = self.allocator.alloc(n, after=after, room=room)
        return pages

    def _ensure_decode_pages(self, decodes: list[Req]) -> list[Req]:
        """Give each decode row its next page; retract the newest requests when the pool is short."""
        while True:
            decodes = [r for r in decodes if not r.finished]
            wanting = [r for r in decodes if self._pages_needed(r, 1)]  # a new page every page_size steps
            if len(wanting) > self.allocator.num_free:
                self.radix.evict(len(wanting) - self.allocator.num_free)
            if len(wanting) <= self.allocator.num_free or not decodes:
                break
            victim = max(decodes, key=lambda r: r.admitted_at or 0.0)
            decodes.remove(victim)
            self._retract(victim)
        for req in wanting:
            pages = self._alloc(req, self._pages_needed(req, 1))
            assert pages is not None
            req.pages.extend(pages)
        return decodes

    def _retract(self, req: Req) -> None:
        """Give back a running request's pages and queue it to recompute later (its output is kept)."""
        if req.inflight:
            # Its newest token is still on the device: read the pending step first.
            self._flush_pending()
        if req.finished:  # reading the pending step ended it
            return
        self._release(req)
        self._decode_sampling = None  # its penalty slot changes when it runs again
        req.num_computed = 0
        req.cached_tokens = 0
        if not req.output_ids:  # its prompt's logprobs will be computed again
            req.input_logprobs, req.input_top_logprobs, req.input_ids_logprobs = [], [], []
        self.running.remove(req)
        self.waiting.appendleft(req)
        self.num_retracted += 1
        self.growth.retracted(self.running)
        ratio = f"; new token ratio {self.growth.ratio:.3f}" if self.growth.reserves else ""
        logger.info("retracted request %s to free KV pages%s", req.rid, ratio)

    def _take_chunk(self, req: Req, budget: int) -> int:
        take = min(req.remaining, budget)
        pages = self._alloc(req, self._pages_needed(req, take))
        if pages is None:
            return 0
        req.pages.extend(pages)
        return take

    def _fits_beside_the_running(self, req: Req) -> bool:
        """Whether all a prefix-matched request may write fits beside what the running requests
        (this step's admissions included) are expected to grow into, with
        `--schedule-conservativeness` above 0 (`runtime/admission.py`); always while nothing else
        runs. At 0 a request starts whenever its first chunk fits, and retraction makes room."""
        if not self.growth.reserves:
            return True
        if all(r.finished for r in self.running):
            self.growth.idle()
            return True
        if self._reserved_pages is None:
            self._reserved_pages = self.growth.reserved_pages(self.running)
        room = self.allocator.num_free + self.radix.evictable_pages() - self._reserved_pages
        return self.growth.pages_to_finish(req) <= room

    def _admit(self, req: Req, budget: int, plan: _Plan) -> int:
        """Prefix-match, lock and allocate for a waiting request; 0 if it cannot start now."""
        match = self.radix.match_prefix(self._reusable_ids(req))
        self.radix.inc_lock(match.node)
        req.locked_node = match.node
        req.pages = list(match.pages)
        req.num_computed = match.num_tokens
        take = min(req.remaining, budget)
        fits = self._fits_beside_the_running(req)
        pages = self._alloc(req, self._pages_needed(req, take)) if fits else None
        if pages is None:
            self.radix.dec_lock(match.node)
            req.locked_node, req.pages, req.num_computed = None, [], 0
            return 0
        req.pages.extend(pages)
        if self.growth.reserves:
            self._reserved_pages = (self._reserved_pages or 0) + self.growth.pages_to_finish(req)
        if req.admitted_at is None:
            req.cached_tokens = match.num_tokens
        req.admitted_at = time.monotonic()
        plan.queue_wait += req.admitted_at - req.arrival
        req.penalty_slot = self.free_slots.pop()
        params = req.request.sampling_params
        if params.frequency_penalty or params.presence_penalty or params.repetition_penalty != 1.0:
            self.runner.reset_penalties(req.penalty_slot, req.request.input_ids)
            if req.output_ids:  # a retracted request keeps its counts
                self.runner.count_outputs(req.penalty_slot, req.output_ids)
        plan.num_new_seqs += 1
        plan.num_cached_tokens += match.num_tokens
        return take

    def _step_need(self, decodes: list[Req], prefills: list[tuple[Req, int]]) -> StepShape:
        """The padded shape of a step of these decode rows and prefill chunks."""
        takes = [take for _, take in prefills]
        kv_after = [r.num_computed + 1 for r in decodes] + [r.num_computed + take for r, take in prefills]
        return step_shape(self.buckets, self.page_size, len(decodes), takes, kv_after)

    def _part_with_a_program(
        self, plan: _Plan, decodes: list[Req], prefills: list[tuple[Req, int]]
    ) -> tuple[list[Req], list[tuple[Req, int]], StepShape]:
        """The step's rows and their padded shape; or, when no compiled program runs them all, the
        part that one runs, while the step's own programs compile aside and the rest waits a step.

        Compiling inline stalls every running request: a second user arriving while a first one
        streams meets a mixed step (a decode row beside the new prompt), then a decode step of both
        rows at the prompt's width, that no warm-up compiles; each stalled both users for 0.1-1.2 s
        on the 2-core box (docs/benchmarks.md). So a mixed step runs its prefill chunks or its
        decode rows alone, taking turns, and a decode step (or a mixed step's decode turn) runs as
        many of its rows as a compiled program holds, those that ran longest ago first
        (`Req.last_decode_step`): every row gets its turn. Only where no part has a program does
        the step compile inline."""
        programs = self.runner.step_programs
        need = self._step_need(decodes, prefills)
        if programs.has_program(need):
            return decodes, prefills, need
        by_turn = sorted(decodes, key=lambda r: r.last_decode_step)  # stable: ties keep their order
        longest = len(by_turn) if prefills else len(by_turn) - 1  # a decode step's own rows all: `need`
        # The first n rows' shape from their deepest row: each part's shape in O(1), and the many
        # parts of one shape (a bucket of rows) asked about once, not 64 scans of 64 rows.
        deepest = list(itertools.accumulate((r.num_computed + 1 for r in by_turn), max))
        parts = [(n, []) for n in range(longest, 0, -1)]
        if prefills:
            parts.insert(len(parts) if self._split_ran_prefills else 0, (0, prefills))
        without_program: set[StepShape] = set()
        for n, part_prefills in parts:
            if part_prefills:
                part_need = self._step_need([], part_prefills)
            else:
                part_need = step_shape(self.buckets, self.page_size, n, [], [deepest[n - 1]])
            if part_need in without_program:
                continue
            if programs.has_program(part_need):
                programs.prepare(need)
                if prefills:
                    self._split_ran_prefills = bool(part_prefills)
                    if not part_prefills:  # admitted, their chunks wait: counted when they run
                        self._held_admissions.take_admissions(plan)
                return by_turn[:n], part_prefills, part_need
            without_program.add(part_need)
        return decodes, prefills, need

    def _build_batch(
        self, plan: _Plan, decodes: list[Req], prefills: list[tuple[Req, int]], need: StepShape
    ) -> ScheduledBatch:
        """The step of these rows, whose padded shape is `need` (`_step_need`)."""
        ps = self.page_size
        takes = [take for _, take in prefills]
        shape = self.runner.step_programs.shape_for(need)
        if not prefills:
            self._prepare_next_width(need, decodes, max(r.num_computed + 1 for r in decodes))
        num_decode, max_q, width = shape.decode, shape.max_q, shape.width
        num_tokens, num_seqs = shape.tokens, shape.decode + shape.prefill_seqs

        input_ids = np.zeros(num_tokens, np.int32)
        token_source = np.full(num_tokens, -1, np.int32)
        positions = np.zeros(num_tokens, np.int32)
        write_slots = np.arange(num_tokens, dtype=np.int32) % ps  # padding writes land in page 0
        cu_q_lens = np.zeros(num_seqs + 1, np.int32)
        kv_lens = np.zeros(num_seqs, np.int32)
        page_table = np.zeros((num_seqs, width), np.int32)
        sample_rows = np.zeros(num_seqs, np.int32)
        sample_valid = np.zeros(sampler_rows(num_seqs), np.bool_)

        cu_q_lens[1 : num_decode + 1] = np.arange(1, num_decode + 1)
        decode_output_index = np.zeros(0, np.int32)
        if decodes:
            n = len(decodes)
            # One pass over the rows for what each contributes; the stores then go a column at a
            # time (per-row numpy stores cost more host time at batch 64 than the arrays they fill).
            facts = np.array(
                [
                    (
                        r.num_computed,
                        r.penalty_slot if r.inflight else -1,
                        0 if r.inflight else r.all_ids[r.num_computed],
                        r.pages[r.num_computed // ps],
                        len(r.output_ids) + r.inflight,
                    )
                    for r in decodes
                ],
                np.int32,
            )
            pos = facts[:, 0]
            positions[:n] = pos
            token_source[:n] = facts[:, 1]
            input_ids[:n] = facts[:, 2]
            write_slots[:n] = facts[:, 3] * ps + pos % ps
            kv_lens[:n] = pos + 1
            decode_output_index = facts[:, 4]
            sample_rows[:n] = np.arange(n)
            sample_valid[:n] = True
            self._decode_steps += 1
            self.growth.decode_step()
            for seq, req in enumerate(decodes):
                pages = req.page_row()
                page_table[seq, : len(pages)] = pages
                req.num_computed += 1
                req.inflight += 1
                req.last_decode_step = self._decode_steps
            plan.sampled.extend(zip(decodes, range(n), strict=True))
            plan.constrained = any(r.grammar is not None for r in decodes)
        plan.num_decode = len(decodes)

        offset = num_decode
        prefill_rows: dict[int, SamplingRow] = {}
        for i, (req, take) in enumerate(prefills):
            seq = num_decode + i
            start = req.num_computed
            input_ids[offset : offset + take] = req.all_ids[start : start + take]
            span = np.arange(start, start + take)
            positions[offset : offset + take] = span
            pages = req.page_row()
            write_slots[offset : offset + take] = pages[span // ps] * ps + span % ps
            kv_lens[seq] = start + take
            page_table[seq, : len(pages)] = pages
            cu_q_lens[seq + 1] = offset + take
            sample_rows[seq] = offset + take - 1
            plan.chunks.append((req, start, take, offset))
            req.num_computed += take
            plan.num_new_tokens += take
            self._share_computed(req)
            if req.num_computed == len(req.all_ids):
                if req.samples:
                    sample_valid[seq] = True
                    prefill_rows[seq] = self._sampling_row(req, req.produced)
                    plan.sampled.append((req, seq))
                    plan.constrained |= req.grammar is not None
                    req.inflight += 1
                else:
                    plan.finished_prefill.append((req, offset + take - 1))
            offset += take
        cu_q_lens[num_decode + len(prefills) + 1 :] = offset
        plan.sample_rows = sample_rows
        sampling, masks = self._sampling_batch(
            decodes, decode_output_index, num_seqs, prefill_rows, len(sample_valid)
        )
        return ScheduledBatch(
            input_ids=input_ids,
            token_source=token_source,
            positions=positions,
            cu_q_lens=cu_q_lens,
            kv_lens=kv_lens,
            page_table=page_table,
            write_slots=write_slots,
            num_tokens=len(decodes) + sum(takes),
            num_decode_seqs=num_decode,
            max_prefill_q_len=max_q,
            sample_rows=sample_rows,
            sample_valid=sample_valid,
            sampling=sampling,
            grammar_masks=masks,
        )

    def _prepare_next_width(self, shape: StepShape, decodes: list[Req], deepest: int) -> None:
        """Have the next page-table width of this decode step compiled aside once its deepest row
        is within AHEAD_PAGES of outgrowing the width and a row may still grow past it: the step
        that first needs it then finds it ready instead of compiling it inline, which stalls
        every request (an H100's first burst of 64 x 256 tokens met four such widths among its
        eight inline compiles: docs/benchmarks.md, fourth GPU session). Only after this step's
        own shape is compiled, so as not to compile beside its inline compile."""
        capacity = shape.width * self.page_size
        if (
            deepest + AHEAD_PAGES * self.page_size <= capacity
            or shape.width == self.buckets.page_table_width[-1]
        ):
            return
        if not any(r.prompt_len + r.max_new_tokens - 1 > capacity for r in decodes):
            return  # every row ends within this width
        programs = self.runner.step_programs
        if programs.is_compiled(shape):
            wider = next(w for w in self.buckets.page_table_width if w > shape.width)
            programs.prepare(dataclasses.replace(shape, width=wider))

    def _sampling_row(self, req: Req, output_index: int) -> SamplingRow:
        return SamplingRow(
            params=req.request.sampling_params,
            seed=req.seed,
            output_index=output_index,
            penalty_slot=req.penalty_slot,
            eos_ids=self._sorted_eos_ids,
            grammar=req.grammar,
        )

    def _sampling_batch(
        self,
        decodes: list[Req],
        decode_output_index: np.ndarray,
        num_seqs: int,
        prefill_rows: dict[int, SamplingRow],
        pad_to: int,
    ) -> tuple[SamplingBatch, np.ndarray | None]:
        """The step's sampling knobs, decode rows first (`decode_output_index`: the index of the
        token each samples), and its grammar masks when a row has a grammar (`grammar_masks`).
        A step whose prefill chunks sample nothing (decode-only, or with
        unfinished chunks, padding to the sampler), with the same decode requests as the last such
        step, takes that step's batch with the output indices moved on: nothing else in a row
        changes while its request runs (a retraction, which changes its penalty slot, drops the
        kept batch), unless a row still bans its stop ids (min_new_tokens), so such batches are
        not kept. Built row by row, it cost the host loop ~0.13 ms a step at batch 64 on the
        2-core box."""
        if not prefill_rows:
            kept = self._decode_sampling
            if kept is not None and kept[1] == pad_to and kept[0] == tuple(decodes):
                output_index = np.zeros(pad_to, np.int32)
                output_index[: len(decodes)] = decode_output_index
                return dataclasses.replace(kept[2], output_index=output_index), None
        rows = [PADDING_ROW] * num_seqs
        for seq, req in enumerate(decodes):
            rows[seq] = self._sampling_row(req, int(decode_output_index[seq]))
        for seq, row in prefill_rows.items():
            rows[seq] = row
        sampling = make_sampling_batch(rows, pad_to)
        masks = grammar_masks(rows, pad_to, self.grammars)
        if not prefill_rows:
            # Masks change every step, as bans do while min_new_tokens is not reached.
            fixed = not (sampling.suppressed_ids >= 0).any() and masks is None
            self._decode_sampling = (tuple(decodes), pad_to, sampling) if fixed else None
        return sampling, masks

    # -- reading results back ------------------------------------------------------------------------

    def _flush_pending(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._process(*pending)

    def _process(self, plan: _Plan, output: StepOutput) -> None:
        tokens = np.asarray(output.next_tokens).tolist()
        wants_logprob = any(r.request.return_logprob for r, _ in plan.sampled)
        chosen = np.asarray(output.chosen_logprobs) if wants_logprob else None
        wants_full = any(
            r.request.return_logprob and (r.request.top_logprobs_num or r.request.token_ids_logprob)
            for r, _ in plan.sampled
        )
        full = self.runner.full_logprobs(output.logits) if wants_full else None
        self._prompt_logprobs(plan, output)
        self._hidden_states(plan, output)
        for req, row in plan.finished_prefill:
            if not req.finished:
                if not req.is_generation:
                    vector = self.runner.readout(output.hidden, [row], req.request.kind)[0]
                    req.embedding = [float(x) for x in vector]
                self._finish(req, {"type": "length", "length": 0})
        for req, row in plan.sampled:
            req.inflight -= 1
            if req.finished:
                continue
            token = tokens[row]
            if req.first_token_at is None:
                req.first_token_at = time.monotonic()
            req.output_ids.append(token)
            req.all_ids.append(token)
            self._gen_tokens_since_log += 1
            if req.request.return_logprob:
                req.output_logprobs.append((float(chosen[row]), token))
                if req.request.top_logprobs_num:
                    req.output_top_logprobs.append(_top(full[row], req.request.top_logprobs_num))
                if req.request.token_ids_logprob is not None:  # one entry a token, [] ids too
                    req.output_ids_logprobs.append(
                        [(float(full[row, t]), t) for t in req.request.token_ids_logprob]
                    )
            if req.grammar is not None and not req.grammar.accept(token):  # its mask allowed it: a bug
                message = f"The sampled token {token} does not fit the request's grammar: {req.grammar.error}"
                logger.error("request %s: %s", req.rid, message)
                self._finish(req, {"type": "abort", "message": message}, error=message)
                continue
            self._check_finish(req, token)

    def _prompt_logprobs(self, plan: _Plan, output: StepOutput) -> None:
        """Input-token logprobs for the prompt positions this step computed, when a request asks."""
        rows, targets, owners = [], [], []
        for req, start, take, first_row in plan.chunks:
            request = req.request
            if not request.return_logprob or request.logprob_start_len < 0 or req.output_ids:
                continue
            begin = max(request.logprob_start_len, 0)
            end = min(start + take, req.prompt_len)  # not num_computed: the next chunk is already planned
            for pos in range(start, end):
                target = pos + 1
                if target <= begin or target >= req.prompt_len:
                    continue
                rows.append(first_row + pos - start)
                targets.append(req.all_ids[target])
                owners.append((req, target))
        if not rows:
            return
        whole = any(req.request.top_logprobs_num or req.request.token_ids_logprob for req, _ in owners)
        full, chosen = self.runner.prompt_logprobs(output.hidden, rows, targets, whole)
        for i, (req, target) in enumerate(owners):
            request = req.request
            req.input_logprobs.append((float(chosen[i]), req.all_ids[target]))
            if request.top_logprobs_num:
                req.input_top_logprobs.append(_top(full[i], request.top_logprobs_num))
            if request.token_ids_logprob is not None:
                req.input_ids_logprobs.append([(float(full[i, t]), t) for t in request.token_ids_logprob])

    def _hidden_states(self, plan: _Plan, output: StepOutput) -> None:
        wanted = [
            (req, int(plan.sample_rows[seq]))  # hidden states are per token, not per sequence
            for req, seq in plan.sampled
            if req.request.return_hidden_states and not req.finished
        ]
        if wanted:
            states = self.runner.readout(output.hidden, [row for _, row in wanted], "hidden")
            for (req, _), state in zip(wanted, states, strict=True):
                req.hidden_states.append([float(x) for x in state])

    def _check_finish(self, req: Req, token: int) -> None:
        """The reference's order: the length limit first; then, unless ignore_eos, EOS and
        stop_token_ids; then stop strings. Neither kind of stop ends a request before
        min_new_tokens, except an EOS that ends the request's grammar."""
        params = req.request.sampling_params
        reason: dict | None = None
        if len(req.output_ids) >= req.max_new_tokens or len(req.all_ids) >= self.context_length:
            reason = {"type": "length", "length": req.max_new_tokens}
        elif not params.ignore_eos and len(req.output_ids) > params.min_new_tokens:
            if token in self.eos_ids or (params.stop_token_ids and token in params.stop_token_ids):
                reason = {"type": "stop", "matched": token}
        if reason is None and req.grammar is not None and req.grammar.terminated:
            # Past ignore_eos and min_new_tokens: nothing may follow the grammar's EOS.
            reason = {"type": "stop", "matched": token}
        wants_text = self.tokenizer is not None and (
            scheduler_needs_text(params) or (req.request.stream and req.detokenize)
        )
        if wants_text and (reason is None or reason["type"] == "length"):
            self._detokenize(req)
            if reason is None and params.stop:
                found = None
                if len(req.output_ids) > params.min_new_tokens:  # no stop before the minimum, as for tokens
                    found = find_stop_string(req.text, params.stop, req.stop_scan_from)
                if found is not None:
                    position, stop = found
                    req.text = (
                        req.text[: position + len(stop)] if params.no_stop_trim else req.text[:position]
                    )
                    reason = {"type": "stop", "matched": stop}
                else:
                    longest = max(len(s) for s in params.stop)
                    req.stop_scan_from = max(0, len(req.text) - longest + 1)
        if reason is not None:
            self._finish(req, reason)
        elif req.request.stream and (len(req.output_ids) - req.last_streamed) >= self.stream_interval:
            req.last_streamed = len(req.output_ids)
            req.callback(self._output(req, finished=False))

    def _detokenize(self, req: Req) -> None:
        if req.output_text is None:
            req.output_text = OutputText(self.tokenizer, req.request.sampling_params)
        req.text += req.output_text.add(req.output_ids)

    def _final_text(self, req: Req) -> str | None:
        """The whole text, where this side makes it (`Req.detokenize`); a matched stop token (EOS
        or stop_token_ids) is left out of it unless no_stop_trim, as the reference's detokenizer
        does (the token stays in output_ids)."""
        params = req.request.sampling_params
        if self.tokenizer is None or not req.is_generation:
            return None
        if not (req.detokenize or scheduler_needs_text(params)):
            return None
        matched = req.finish_reason.get("matched") if req.finish_reason else None
        if isinstance(matched, str):
            return req.text
        if req.output_text is None:
            req.output_text = OutputText(self.tokenizer, params)
        return req.text + req.output_text.final(req.output_ids, req.finish_reason)

    # -- ending requests ---------------------------------------------------------------------------

    def _finish(self, req: Req, reason: dict, release: bool = True, error: str | None = None) -> None:
        req.finished = True
        req.finish_reason = reason
        if release and req in self.running:
            self._release(req)
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.by_rid.pop(req.rid, None)
        req.text = self._final_text(req) or ""
        req.callback(self._output(req, finished=True, error=error))

    def _release(self, req: Req) -> None:
        """Cache the request's computed tokens in the radix tree, free the rest, unlock its prefix."""
        if req.pages:
            self.allocator.release_room(req.pages[-1])
        if req.locked_node is not None:
            self.radix.cache_finished(req.all_ids[: req.num_computed], req.pages, req.locked_node)
        elif req.pages:
            self.allocator.free(req.pages)
        req.pages, req.locked_node = [], None
        if req.penalty_slot:
            self.free_slots.append(req.penalty_slot)
            req.penalty_slot = 0

    def _abort(self, rid: str) -> None:
        req = self.by_rid.get(rid)
        if req is not None and not req.finished:
            self._finish(req, {"type": "abort", "message": "Aborted by the client."})

    def _output(
        self, req: Req, finished: bool, error: str | None = None, finish_reason: dict | None = None
    ) -> OutputDelta:
        """The request's output as what is new since its previous one (`runtime/output_deltas.py`):
        the lists go in as the request's own and come out as their new entries, with no copy of
        what was sent before."""
        request = req.request
        logprobs = request.return_logprob
        input_logprobs = None
        if logprobs:
            if request.logprob_start_len < 0:
                input_logprobs = [(None, request.input_ids[-1])]
            else:
                first = min(request.logprob_start_len, req.prompt_len - 1)
                input_logprobs = [(None, request.input_ids[first]), *req.input_logprobs]
        top_needed = logprobs and request.top_logprobs_num > 0
        ids_needed = logprobs and request.token_ids_logprob is not None
        output = RequestOutput(
            rid=req.rid,
            output_ids=req.output_ids,
            text=req.text if finished else self._streamable_text(req),
            finished=finished,
            finish_reason=finish_reason or (req.finish_reason if finished else None),
            prompt_tokens=req.prompt_len,
            completion_tokens=len(req.output_ids),
            cached_tokens=req.cached_tokens,
            e2e_latency=time.monotonic() - req.arrival,
            first_token_latency=None if req.first_token_at is None else req.first_token_at - req.arrival,
            input_token_logprobs=input_logprobs,
            output_token_logprobs=req.output_logprobs if logprobs else None,
            input_top_logprobs=[None, *req.input_top_logprobs] if top_needed else None,
            output_top_logprobs=req.output_top_logprobs if top_needed else None,
            input_token_ids_logprobs=[None, *req.input_ids_logprobs] if ids_needed else None,
            output_token_ids_logprobs=req.output_ids_logprobs if ids_needed else None,
            hidden_states=req.hidden_states if request.return_hidden_states else None,
            embedding=req.embedding,
            error=error,
        )
        return req.deltas.cut(output)

    def _streamable_text(self, req: Req) -> str:
        """Text so far, less a tail that could still become a trimmed stop string."""
        stops = req.request.sampling_params.stop
        if not stops:
            return req.text
        return req.text[: len(req.text) - partial_stop_suffix(req.text, stops)]

    # -- control operations (run on this thread through `call`) ----------------------------------------

    def flush_cache(self) -> bool:
        if self.running or self.waiting:
            return False
        self._flush_pending()
        self.radix.flush()
        self.last_cache_hit_rate = self.last_queue_latency = 0.0  # the warm-up's batches ended in one
        return True

    def is_idle(self) -> bool:
        return not (self.running or self.waiting or self._pending)

    def hold_admission(self, hold: bool) -> int:
        """Stop (or resume) starting queued requests; returns how many are held back now."""
        self._hold_admission = hold
        return len(self.waiting)

    def running_drained(self) -> bool:
        """Nothing running and no step in flight (queued requests may wait)."""
        return not self.running and self._pending is None

    def stats(self) -> dict[str, Any]:
        total = self.allocator.num_total
        used_pages = total - self.allocator.num_free - self.radix.evictable_pages()
        return {
            "num_running_reqs": len(self.running),
            "num_queue_reqs": len(self.waiting),
            "num_used_tokens": used_pages * self.page_size,
            "token_usage": used_pages / max(total, 1),
            "num_free_pages": self.allocator.num_free,
            "num_cached_pages": self.radix.total_cached_pages(),
            "num_total_pages": total,
            "cache_hit_rate": self.last_cache_hit_rate,
            "avg_request_queue_latency": self.last_queue_latency,
            "gen_throughput": self.last_gen_throughput,
            "last_gen_throughput": self.last_gen_throughput,
            "num_steps": self.num_steps,  # steps dispatched: a health check watches it move
            "num_retracted_reqs": self.num_retracted,
            "new_token_ratio": self.growth.ratio,
        }

    def _maybe_log(self) -> None:
        now = time.monotonic()
        if now - self._last_log < 5.0:
            return
        elapsed = now - self._last_log
        self.last_gen_throughput = self._gen_tokens_since_log / elapsed
        if self._gen_tokens_since_log:
            stats = self.stats()
            logger.info(
                "Decode batch. #running-req: %d, #token: %d, token usage: %.2f, "
                "gen throughput (token/s): %.2f, #queue-req: %d",
                stats["num_running_reqs"],
                stats["num_used_tokens"],
                stats["token_usage"],
                self.last_gen_throughput,
                stats["num_queue_reqs"],
            )
        self._gen_tokens_since_log = 0
        self._last_log = now


def _top(row: np.ndarray, k: int) -> list[tuple[float, int]]:
    k = min(k, row.shape[0])
    ids = np.argpartition(-row, k - 1)[:k]
    ids = ids[np.argsort(-row[ids], kind="stable")]
    return [(float(row[i]), int(i)) for i in ids]
