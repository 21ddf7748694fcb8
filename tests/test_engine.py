"""The engine offline: continuous batching, chunked prefill, prefix caching, memory
pressure, leaks, compile counts, sampling and logprobs, against HF references."""

from __future__ import annotations

import gc
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from runtime import kv_pool
from runtime.batch import StepShape, sampler_rows
from runtime.engine import Engine
from runtime.io_struct import EngineRequest
from runtime.sampling import MIN_SUPPRESSED_WIDTH, is_plain_greedy
from runtime.sampling_params import SamplingParams
from tests.conftest import greedy_agrees, load_reference, prompts_of
from tests.fixture_spec import SMOLLM2, TINY_LLAMA, TINY_QWEN2_MOE, compile_level_for

REPO_ROOT = Path(__file__).resolve().parent.parent


def _engine(path, **kwargs) -> Engine:
    defaults = dict(
        model_path=str(path),
        max_total_tokens=8192,
        max_running_requests=32,
        random_seed=0,
        enable_compile_cache=True,
        xla_backend_optimization_level=compile_level_for(path),
    )
    defaults.update(kwargs)
    return Engine(**defaults)


def _greedy(max_new_tokens: int, **extra) -> dict:
    return {"temperature": 0.0, "max_new_tokens": max_new_tokens, "ignore_eos": True, **extra}


def _pool_whole(engine: Engine) -> bool:
    stats = engine.stats()
    return stats["num_free_pages"] + stats["num_cached_pages"] == stats["num_total_pages"]


@pytest.fixture(scope="module")
def tiny(tiny_llama_path):
    engine = _engine(tiny_llama_path, chunked_prefill_size=64)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def tiny_ref():
    return load_reference(TINY_LLAMA)


# 256: the longest prompts (700 tokens) come in chunks; 1024: steps of 512 and 640 padded
# query rows, whose prefill attention runs in two causal query blocks (`causal_blocks`).
@pytest.mark.parametrize("chunk", [256, 1024])
def test_continuous_batching_matches_hf_and_solo(smollm2_path, chunk):
    ref = load_reference(SMOLLM2)
    engine = _engine(smollm2_path, max_total_tokens=16384, chunked_prefill_size=chunk)
    try:
        count = int(ref["batch_num_prompts"])
        prompts = [list(map(int, ref[f"batch_prompt_{i}"])) for i in range(count)]
        lengths = [int(n) for n in ref["batch_max_new_tokens"]]
        batched = _batched_ids(engine, prompts, lengths)
        for i, n in enumerate(lengths):
            assert len(batched[i]) == n
        for i in range(count):
            result = greedy_agrees(
                batched[i],
                ref[f"batch_greedy_{i}"][: lengths[i]],
                ref[f"batch_greedy_margin_{i}"][: lengths[i]],
            )
            assert result, f"prompt {i} ({len(prompts[i])} tokens): {result}"
        longest = max(range(count), key=lambda i: len(prompts[i]))
        for i in (0, longest):
            assert _output_ids(engine, prompts[i], lengths[i]) == batched[i], f"prompt {i} alone differs"
    finally:
        engine.shutdown()


def _output_ids(engine: Engine, prompt: list[int], n: int) -> list[int]:
    return _batched_ids(engine, [prompt], [n])[0]


def _batched_ids(engine: Engine, prompts: list[list[int]], lengths: list[int]) -> list[list[int]]:
    """Submit everything at once and collect output ids (the text route loses ids)."""
    requests = [
        EngineRequest(
            rid=f"b{time.monotonic_ns()}-{i}",
            input_ids=p,
            sampling_params=SamplingParams.from_dict(_greedy(n)),
        )
        for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))
    ]
    outputs = engine._run_blocking(requests)
    return [o.output_ids for o in outputs]


def _mixed_ids(engine: Engine, prompts: list[list[int]], params: list[dict]) -> list[list[int]]:
    """Output ids of requests with their own sampling parameters, submitted at once."""
    requests = [
        EngineRequest(
            rid=f"m{time.monotonic_ns()}-{i}", input_ids=p, sampling_params=SamplingParams.from_dict(s)
        )
        for i, (p, s) in enumerate(zip(prompts, params, strict=True))
    ]
    return [o.output_ids for o in engine._run_blocking(requests)]


def test_greedy_matches_hf_tiny(tiny, tiny_ref):
    prompts = prompts_of(tiny_ref)
    n = len(tiny_ref["greedy_0"])
    outs = _batched_ids(tiny, prompts, [n] * len(prompts))
    for i, out in enumerate(outs):
        result = greedy_agrees(out, tiny_ref[f"greedy_{i}"], tiny_ref[f"greedy_margin_{i}"])
        assert result, result


def test_chunked_prefill_is_invisible(tiny_llama_path):
    rng = np.random.default_rng(7)
    prompt = rng.integers(100, 40000, size=300).tolist()
    chunked = _engine(tiny_llama_path, chunked_prefill_size=32)
    try:
        a = _output_ids(chunked, prompt, 12)
    finally:
        chunked.shutdown()
    whole = _engine(tiny_llama_path, chunked_prefill_size=-1)
    try:
        b = _output_ids(whole, prompt, 12)
    finally:
        whole.shutdown()
    assert a == b


def test_prefix_cache_hits_and_matches_uncached(tiny_llama_path):
    rng = np.random.default_rng(11)
    prefix = rng.integers(100, 40000, size=500).tolist()
    first = prefix + rng.integers(100, 40000, size=20).tolist()
    second = prefix + rng.integers(100, 40000, size=30).tolist()
    cached = _engine(tiny_llama_path)
    try:
        cached.generate(input_ids=first, sampling_params=_greedy(4))
        hit = cached.generate(input_ids=second, sampling_params=_greedy(10))
    finally:
        cached.shutdown()
    assert hit["meta_info"]["cached_tokens"] >= 480
    plain = _engine(tiny_llama_path, disable_radix_cache=True)
    try:
        miss = plain.generate(input_ids=second, sampling_params=_greedy(10))
    finally:
        plain.shutdown()
    assert miss["meta_info"]["cached_tokens"] == 0
    assert hit["text"] == miss["text"]


def test_requests_sent_together_compute_their_shared_prefix_once(tiny_llama_path, monkeypatch):
    """The n samples of one prompt, and a burst behind one shared prefix, arrive together: the
    first request's pages go into the radix tree as its chunks are scheduled and the others wait
    a step for them (`Scheduler._waits_for_prefix`), instead of all computing the prefix at once."""
    rng = np.random.default_rng(12)
    prompt = rng.integers(100, 40000, size=300).tolist()
    prefix = rng.integers(100, 40000, size=400).tolist()
    burst = [prefix + rng.integers(100, 40000, size=n).tolist() for n in (5, 17, 40)]
    plain = _engine(tiny_llama_path, disable_radix_cache=True, chunked_prefill_size=256)
    try:
        expected = plain.generate(input_ids=prompt, sampling_params=_greedy(6))["text"]
        expected_burst = [a["text"] for a in plain.generate(input_ids=burst, sampling_params=_greedy(6))]
    finally:
        plain.shutdown()
    engine = _engine(tiny_llama_path, chunked_prefill_size=256)  # both shared parts span two chunks
    try:
        computed = []
        log_prefill = engine.scheduler._log_prefill
        monkeypatch.setattr(
            engine.scheduler,
            "_log_prefill",
            lambda plan: computed.append(plan.num_new_tokens) or log_prefill(plan),
        )
        samples = engine.generate(input_ids=prompt, sampling_params=_greedy(6, n=4))
        # The prompt's first chunk (256 tokens) is shared; its last 32 full-page tokens are not
        # worth holding the samples back another step for (MIN_PREFIX_WAIT_TOKENS).
        assert sorted(s["meta_info"]["cached_tokens"] for s in samples) == [0, 256, 256, 256]
        assert all(s["text"] == expected for s in samples)
        assert sum(computed) == 300 + 3 * (300 - 256)
        computed.clear()
        answers = engine.generate(input_ids=burst, sampling_params=_greedy(6))
        assert [a["text"] for a in answers] == expected_burst
        assert sorted(a["meta_info"]["cached_tokens"] for a in answers)[1:] == [400, 400]
        assert sum(computed) == sum(map(len, burst)) - 2 * 400
        assert _pool_whole(engine)
    finally:
        engine.shutdown()


def test_lpm_admits_by_the_cached_prefix_a_request_can_reuse(tiny_llama_path, monkeypatch):
    """The lpm policy admits the longest cached prefix first, counting only what a request may
    reuse: one asking for input logprobs from position 0 recomputes its whole prompt. A queue
    longer than LPM_MAX_WAITING is served in order of arrival."""
    from runtime import scheduler as scheduler_module

    rng = np.random.default_rng(16)
    cached = rng.integers(100, 40000, size=320).tolist()
    engine = _engine(tiny_llama_path, schedule_policy="lpm", max_running_requests=1)
    try:
        engine.generate(input_ids=cached, sampling_params=_greedy(1))  # its 20 pages stay in the tree
        scheduler = engine.scheduler
        admitted = []
        admit = scheduler._admit
        monkeypatch.setattr(
            scheduler, "_admit", lambda req, *rest: admitted.append(req.rid) or admit(req, *rest)
        )
        params = SamplingParams.from_dict(_greedy(2))

        def admission_order() -> list[str]:
            tails = [rng.integers(100, 40000, size=n).tolist() for n in (50, 9, 9, 9)]
            requests = [
                EngineRequest(rid="none", input_ids=tails[0], sampling_params=params),
                EngineRequest(
                    rid="logprobs",
                    input_ids=cached + tails[1],
                    sampling_params=params,
                    return_logprob=True,
                    logprob_start_len=0,
                ),
                EngineRequest(rid="short", input_ids=cached[:100] + tails[2], sampling_params=params),
                EngineRequest(rid="long", input_ids=cached + tails[3], sampling_params=params),
            ]
            admitted.clear()
            scheduler.call(lambda: scheduler.hold_admission(True))  # all four wait before the ranking
            done = threading.Semaphore(0)
            for request in requests:
                engine.submit(request, lambda output: done.release() if output.finished else None)
            while scheduler.call(lambda: len(scheduler.waiting)) < len(requests):
                time.sleep(0.01)
            scheduler.call(lambda: scheduler.hold_admission(False))
            for _ in requests:
                assert done.acquire(timeout=120)
            return list(admitted)

        assert admission_order() == ["long", "short", "none", "logprobs"]
        monkeypatch.setattr(scheduler_module, "LPM_MAX_WAITING", 3)
        # Four waiting: the first comes first; the three left are ranked.
        assert admission_order() == ["none", "long", "short", "logprobs"]
        assert _pool_whole(engine)
    finally:
        engine.shutdown()


def test_a_short_shared_header_holds_nobody_back(tiny_llama_path):
    """Requests sharing only a chat template's header (under MIN_PREFIX_WAIT_TOKENS) start together."""
    rng = np.random.default_rng(14)
    header = rng.integers(100, 40000, size=40).tolist()
    prompts = [header + rng.integers(100, 40000, size=100).tolist() for _ in range(3)]
    engine = _engine(tiny_llama_path)
    try:
        answers = engine.generate(input_ids=prompts, sampling_params=_greedy(3))
        assert [a["meta_info"]["cached_tokens"] for a in answers] == [0, 0, 0]
    finally:
        engine.shutdown()


def test_requests_held_back_past_the_step_cap_keep_their_place(tiny_llama_path, monkeypatch):
    """Admission stops for the step once MAX_DEFERRED_PER_STEP requests wait for a prefix in
    progress; they go back to the front of the queue and still share it."""
    from runtime import scheduler as scheduler_module

    monkeypatch.setattr(scheduler_module, "MAX_DEFERRED_PER_STEP", 2)
    rng = np.random.default_rng(13)
    prompt = rng.integers(100, 40000, size=200).tolist()
    engine = _engine(tiny_llama_path, chunked_prefill_size=256)
    try:
        samples = engine.generate(input_ids=prompt, sampling_params=_greedy(5, n=8))
        alone = engine.generate(input_ids=prompt, sampling_params=_greedy(5))
        assert sorted(s["meta_info"]["cached_tokens"] for s in samples) == [0] + [192] * 7
        assert all(s["text"] == alone["text"] for s in samples)
        assert _pool_whole(engine)
    finally:
        engine.shutdown()


def test_samples_computing_their_prompt_twice_switch_to_the_trees_pages(tiny_llama_path):
    """Input logprobs from position 0 leave nothing to reuse, so n such samples compute their prompt
    in one step; the tree keeps the first's pages and frees the others' copies, which the next
    request admitted gets. Each sample must read the tree's pages from then on (a helper's review
    found them reading their freed copies: a cached page-table row outlived the swap)."""
    rng = np.random.default_rng(6)
    prompt = rng.integers(100, 40000, size=100).tolist()
    engine = _engine(tiny_llama_path, chunked_prefill_size=400)  # the four fill a step: `late` waits
    try:
        expected = _output_ids(engine, prompt, 40)
        assert engine.flush_cache()
        params = SamplingParams.from_dict(_greedy(40))
        requests = [
            EngineRequest(
                rid=f"n{i}",
                input_ids=prompt,
                sampling_params=params,
                return_logprob=True,
                logprob_start_len=0,
            )
            for i in range(4)
        ]
        late = rng.integers(100, 40000, size=40).tolist()
        requests.append(EngineRequest(rid="late", input_ids=late, sampling_params=params))
        outputs = engine._run_blocking(requests)
        assert [o.output_ids for o in outputs[:4]] == [expected] * 4
        assert _pool_whole(engine)
    finally:
        engine.shutdown()


def test_memory_pressure_every_request_finishes(tiny_llama_path, tiny, monkeypatch):
    """Retracted requests run again with their tokens so far; a penalised one keeps its counts
    in the penalty row it gets the second time (which its decode steps' sampling must name)."""
    rng = np.random.default_rng(3)
    prompts = [rng.integers(100, 40000, size=int(n)).tolist() for n in rng.integers(100, 300, size=12)]
    penalised = _greedy(40, frequency_penalty=1.5, presence_penalty=0.5)
    params = [penalised if i % 3 == 0 else _greedy(40) for i in range(len(prompts))]
    expected = _mixed_ids(tiny, prompts, params)
    small = _engine(tiny_llama_path, max_total_tokens=1024, chunked_prefill_size=128)
    try:
        retracted = []
        retract = small.scheduler._retract
        monkeypatch.setattr(small.scheduler, "_retract", lambda req: retracted.append(req) or retract(req))
        got = _mixed_ids(small, prompts, params)
        assert got == expected
        assert any(r.request.sampling_params.frequency_penalty for r in retracted)
        assert _pool_whole(small)
    finally:
        small.shutdown()


def test_admission_that_reserves_for_outputs_retracts_nothing(tiny_llama_path, tiny):
    """The memory-pressure load again, on a pool too small for its requests at once: by default
    requests start whenever their first chunk fits and are retracted when outputs outgrow the
    pool; with `--schedule-conservativeness` 1 admission leaves them room (requests that ignore
    EOS write all they may, so the room is exact) and none is retracted, for the same tokens,
    while several still run at once."""
    rng = np.random.default_rng(3)
    prompts = [rng.integers(100, 40000, size=int(n)).tolist() for n in rng.integers(100, 300, size=12)]
    params = [_greedy(40)] * len(prompts)
    expected = _mixed_ids(tiny, prompts, params)
    retracted, steps = {}, {}
    for conservativeness in (0.0, 1.0):
        small = _engine(
            tiny_llama_path,
            max_total_tokens=1024,
            chunked_prefill_size=128,
            schedule_conservativeness=conservativeness,
        )
        try:
            assert _mixed_ids(small, prompts, params) == expected
            stats = small.stats()
            retracted[conservativeness] = stats["num_retracted_reqs"]
            steps[conservativeness] = stats["num_steps"]
            assert _pool_whole(small)
        finally:
            small.shutdown()
    assert retracted[0.0] > 0 and retracted[1.0] == 0, retracted
    one_at_a_time = sum(-(-len(p) // 128) + 39 for p in prompts)  # 492 steps; 134 ran here
    assert steps[1.0] < one_at_a_time / 2, (steps, one_at_a_time)


def test_no_leaks_after_burst_with_aborts(tiny):
    rng = np.random.default_rng(5)
    done = threading.Event()
    finished: list = []
    lock = threading.Lock()
    total = 64

    def collect(output):
        if output.finished:
            with lock:
                finished.append(output)
                if len(finished) == total:
                    done.set()

    for i in range(total):
        prompt = rng.integers(100, 40000, size=int(rng.integers(5, 200))).tolist()
        params = SamplingParams.from_dict({"max_new_tokens": int(rng.integers(1, 60)), "temperature": 0.7})
        request = EngineRequest(rid=f"burst-{i}", input_ids=prompt, sampling_params=params)
        tiny.submit(request, collect)
        if i % 5 == 0:
            tiny.abort(f"burst-{i}")
    time.sleep(0.05)
    for i in range(1, total, 7):
        tiny.abort(f"burst-{i}")
    assert done.wait(300)
    assert sum(o.finish_reason["type"] == "abort" for o in finished) >= 1
    assert _pool_whole(tiny)
    assert tiny.flush_cache()
    stats = tiny.stats()
    assert stats["num_free_pages"] == stats["num_total_pages"]


def test_each_request_gets_contiguous_pages(tiny, monkeypatch):
    # The decode gather is half again as slow on pages in random order (docs/benchmarks.md), so
    # requests admitted and growing together must each keep one run of pages, also after churn.
    assert tiny.flush_cache()
    rng = np.random.default_rng(11)
    _batched_ids(tiny, [rng.integers(100, 40000, size=40).tolist() for _ in range(12)], [5] * 12)
    held: dict[str, list[int]] = {}
    release = tiny.scheduler._release

    def note_pages(req):
        held[req.rid] = list(req.pages)
        release(req)

    monkeypatch.setattr(tiny.scheduler, "_release", note_pages)
    prompts = [rng.integers(100, 40000, size=int(n)).tolist() for n in rng.integers(20, 150, size=16)]
    _batched_ids(tiny, prompts, [int(n) for n in rng.integers(40, 100, size=16)])
    assert len(held) == 16
    for pages in held.values():
        assert pages == list(range(pages[0], pages[0] + len(pages))), pages
    assert _pool_whole(tiny)


def test_compiled_programs_bounded(tiny, monkeypatch):
    rng = np.random.default_rng(9)
    prompts = [rng.integers(100, 40000, size=int(n)).tolist() for n in rng.integers(1, 400, size=200)]
    lengths = [int(n) for n in rng.integers(1, 20, size=200)]
    shapes, sample_shapes = set(), set()
    forward = tiny.runner.forward

    def forward_and_note_shape(batch):
        key = batch.shape_key()
        shapes.add(key[:5])  # what the forward program is specialised on
        # the sampler's: rows (decode + prefill seqs, to a power of two), suppressed ids, branch-free
        sample_shapes.add((sampler_rows(key[1]), key[5], is_plain_greedy(batch.sampling)))
        return forward(batch)

    monkeypatch.setattr(tiny.runner, "forward", forward_and_note_shape)
    programs_before = tiny.runner.num_step_programs
    samplers_before = tiny.runner._sample._cache_size() + len(tiny.runner._background_samplers)
    for start in range(0, 200, 50):
        _batched_ids(tiny, prompts[start : start + 50], lengths[start : start + 50])
    steps = tiny.runner.num_step_programs
    bound = tiny.scheduler.buckets.max_programs()
    print(
        f"after 200 varied requests: {steps} step programs (bucket bound {bound}), "
        f"{tiny.num_compiled_programs} programs in all; {len(shapes)} step shapes in this test"
    )
    assert steps <= bound
    # One program per step shape (run, or compiled aside while a step borrowed a larger one):
    # none specialised on what ran before it.
    aside = {shape.key for shape in tiny.runner.step_programs._programs}
    assert steps - programs_before <= len(shapes | aside)
    # Sampling compiles once per (row count, suppressed-id width, branch-free), not per step shape.
    samplers = tiny.runner._sample._cache_size() + len(tiny.runner._background_samplers) - samplers_before
    print(f"{samplers} new sampling programs for {len(sample_shapes)} sampler shapes")
    aside_samplers = set(tiny.runner._background_samplers)  # (rows, widths, plain)
    assert samplers <= len(sample_shapes | aside_samplers) < len(shapes)
    # Mixed steps (9, 10, 12... sequences) share the samplers of the power-of-two row counts.
    assert any(seqs & (seqs - 1) for _, seqs, *_ in shapes), "no mixed step met"
    assert all(rows & (rows - 1) == 0 for rows, *_ in tiny.runner._sampler_shapes | aside_samplers)


def test_seeded_sampling_is_reproducible_and_top_k_one_is_greedy(tiny, tiny_ref):
    prompt = prompts_of(tiny_ref)[1]
    params = {"temperature": 1.0, "top_p": 0.9, "max_new_tokens": 16, "sampling_seed": 42, "ignore_eos": True}
    a = tiny.generate(input_ids=prompt, sampling_params=params)
    neighbours = [prompts_of(tiny_ref)[0], prompt, prompts_of(tiny_ref)[2]]
    b = tiny.generate(input_ids=neighbours, sampling_params=[{**params, "sampling_seed": 7}, params, params])[
        1
    ]
    assert a["text"] == b["text"]
    greedy = tiny.generate(input_ids=prompt, sampling_params=_greedy(16))
    top1 = tiny.generate(
        input_ids=prompt, sampling_params={"top_k": 1, "max_new_tokens": 16, "ignore_eos": True}
    )
    assert greedy["text"] == top1["text"]


def test_a_step_samples_after_the_previous_step_is_read(tiny, tiny_ref, monkeypatch):
    """Order of the loop: forward N+1, read step N, then sample N+1 (a GPU sampler with branches
    holds the host until the forward before it ends, so reading N first overlaps the forward)."""
    events = []
    for owner, name in ((tiny.runner, "forward"), (tiny.runner, "sample"), (tiny.scheduler, "_process")):
        method = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, _m=method, _n=name: events.append(_n) or _m(*a))
    (ids,) = _batched_ids(tiny, [prompts_of(tiny_ref)[0]], [6])
    result = greedy_agrees(ids, tiny_ref["greedy_0"][:6], tiny_ref["greedy_margin_0"][:6])
    assert result, result
    assert events[:5] == ["forward", "sample", "forward", "_process", "sample"]
    after_forward = [events[i + 1 : i + 3] for i, name in enumerate(events[:-2]) if name == "forward"]
    assert after_forward[1:] == [["_process", "sample"]] * (len(after_forward) - 1)
    assert len(after_forward) >= 5


def test_fused_greedy_sampling_serves_plain_greedy_steps_only(tiny_llama_path, tiny, tiny_ref, monkeypatch):
    """The forward that also samples greedily (a GPU's default, forced on here, with programs
    compiled aside as served): HF's greedy tokens with no sampler dispatched; steps it must not
    sample (a sampled row, a penalty, a wide suppressed-ids table) run the general sampler after
    it and give the unfused engine's (`tiny`) tokens; a wide table compiles no forward again."""
    prompts = prompts_of(tiny_ref)
    seeded = {"temperature": 0.9, "top_p": 0.9, "max_new_tokens": 12, "sampling_seed": 5, "ignore_eos": True}
    penalised = _greedy(12, frequency_penalty=1.5, presence_penalty=0.5)
    # min_new_tokens bans EOS and the stop ids: eight ids make the suppressed-ids table wider.
    wide = _greedy(12, min_new_tokens=6, stop_token_ids=list(range(3, 10)))
    mixes = [
        ([prompts[0], prompts[1]], [_greedy(12), seeded]),
        ([prompts[0], prompts[2]], [_greedy(12), penalised]),
    ]
    wide_mix = ([prompts[1], prompts[2]], [wide, _greedy(12)])
    expected = [_mixed_ids(tiny, *mix) for mix in [*mixes, wide_mix]]
    fused = _engine(tiny_llama_path, chunked_prefill_size=64, fused_greedy_sampling="on")
    try:
        runner = fused.runner
        assert runner.fused_greedy and not tiny.runner.fused_greedy
        general = []  # steps the forward did not sample
        sample = runner.sample
        monkeypatch.setattr(
            runner, "sample", lambda step: general.append(step.greedy is None) or sample(step)
        )
        n = len(tiny_ref["greedy_0"])
        for i, tokens in enumerate(_batched_ids(fused, prompts, [n] * len(prompts))):
            result = greedy_agrees(tokens, tiny_ref[f"greedy_{i}"], tiny_ref[f"greedy_margin_{i}"])
            assert result, f"prompt {i}: {result}"
        assert general and not any(general)  # every step was all-greedy: the forwards sampled them
        # What warm-up compiles after its greedy steps: the general sampler of a row count, which a
        # first sampled request then runs without compiling inline.
        key = (2, MIN_SUPPRESSED_WIDTH, False)  # two short prompts: every step of theirs has 2 rows
        assert key not in runner._sampler_shapes  # greedy steps never ran the general sampler
        # A step of 2 rows that compiled aside (while it borrowed a bigger program, as timing has it)
        # compiled this sampler with it: forget it, so that only compile_samplers can bring it back.
        runner._background_samplers.pop(key, None)
        runner.compile_samplers(2)
        assert key in runner._background_samplers
        runner.wait_for_background_compiles()  # and the samplers of the shapes compiled inline above
        # (the jit cache's size would count another engine's compiles: the sampler's function is shared)
        inline = set(runner._sampler_shapes)
        sampled = _mixed_ids(fused, prompts[:2], [{**seeded, "sampling_seed": i} for i in range(2)])
        assert runner._sampler_shapes == inline and all(len(ids) == 12 for ids in sampled)
        for mix, want in zip(mixes, expected[:-1], strict=True):
            assert _mixed_ids(fused, *mix) == want, mix[1]
        assert any(general)  # the mixed steps ran the general sampler
        # The wide table's steps: the same shapes as an all-greedy twin's, so no new forward.
        _mixed_ids(fused, wide_mix[0], [_greedy(12)] * 2)
        runner.wait_for_background_compiles()
        programs = (runner._forward._cache_size(), runner.num_step_programs)
        assert _mixed_ids(fused, *wide_mix) == expected[-1]
        assert (runner._forward._cache_size(), runner.num_step_programs) == programs
        assert _pool_whole(fused)
    finally:
        fused.shutdown()


def test_plain_greedy_sampler_serves_greedy_steps_only(tiny, tiny_ref, monkeypatch):
    """Unfused, all-greedy steps take a branch-free sampler program and the others the general
    one: HF's greedy tokens, and a seeded sampled request draws alike alone and beside greedy ones."""
    prompts = prompts_of(tiny_ref)
    seeded = {"temperature": 0.9, "top_p": 0.9, "max_new_tokens": 12, "sampling_seed": 5, "ignore_eos": True}
    alone = tiny.generate(input_ids=prompts[1], sampling_params=seeded)["text"]
    taken = []  # every dispatched sampler's key (rows, suppressed-ids width, branch-free)

    class NotingKeys(dict):
        def get(self, key, default=None):
            taken.append(key)
            return super().get(key, default)

    compiled_aside = tiny.runner._background_samplers
    noting = NotingKeys(compiled_aside)
    monkeypatch.setattr(tiny.runner, "_background_samplers", noting)
    try:
        n = len(tiny_ref["greedy_0"])
        for i, tokens in enumerate(_batched_ids(tiny, prompts, [n] * len(prompts))):
            result = greedy_agrees(tokens, tiny_ref[f"greedy_{i}"], tiny_ref[f"greedy_margin_{i}"])
            assert result, f"prompt {i}: {result}"
        assert taken and all(plain for *_, plain in taken)
        # fewer tokens than the seeded request: every step of the greedy one holds a sampled row
        # (once the two-row steps' programs are compiled: a step with no program runs its rows
        # apart meanwhile, `Scheduler._part_with_a_program`)
        pair = dict(input_ids=[prompts[1], prompts[0]], sampling_params=[seeded, _greedy(6)])
        tiny.generate(**pair)
        tiny.runner.wait_for_background_compiles()
        taken.clear()
        beside = tiny.generate(**pair)
        assert beside[0]["text"] == alone
        assert taken and not any(plain for *_, plain in taken)
    finally:
        compiled_aside.update(noting)  # what compiled aside meanwhile serves the fixture's later tests


def test_output_and_input_logprobs_match_hf(tiny, tiny_ref):
    prompt = prompts_of(tiny_ref)[1]
    logits = np.asarray(tiny_ref["logits_1"], np.float64)
    logsoftmax = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    out = tiny.generate(
        input_ids=prompt,
        sampling_params=_greedy(1),
        return_logprob=True,
        logprob_start_len=0,
        top_logprobs_num=3,
    )
    meta = out["meta_info"]
    first_logprob, first_token = meta["output_token_logprobs"][0][:2]
    assert first_token == int(np.argmax(logits[-1]))
    assert abs(first_logprob - logsoftmax[-1, first_token]) < 1e-4
    inputs = meta["input_token_logprobs"]
    assert len(inputs) == len(prompt) and inputs[0][0] is None
    for pos in range(1, len(prompt)):
        assert abs(inputs[pos][0] - logsoftmax[pos - 1, prompt[pos]]) < 1e-4
    top = meta["output_top_logprobs"][0]
    assert [t[1] for t in top] == list(np.argsort(-logits[-1])[:3])


def test_input_logprobs_of_a_chunked_prompt_match_one_chunk(tiny, tiny_llama_path):
    """A prompt prefilled over several steps (chunks of 64) gets each input logprob once, equal
    to a one-chunk prefill's."""
    prompt = np.random.default_rng(3).integers(5, 200, 150).tolist()
    whole = _engine(tiny_llama_path, chunked_prefill_size=256)
    try:
        logprobs = [
            engine.generate(
                input_ids=prompt,
                sampling_params=_greedy(1),
                return_logprob=True,
                logprob_start_len=0,
                top_logprobs_num=2,
            )["meta_info"]
            for engine in (tiny, whole)
        ]
    finally:
        whole.shutdown()
    chunked, single = logprobs
    assert len(chunked["input_token_logprobs"]) == len(prompt) == len(single["input_token_logprobs"])
    assert [e[1] for e in chunked["input_token_logprobs"]] == prompt
    for a, b in zip(chunked["input_token_logprobs"][1:], single["input_token_logprobs"][1:], strict=True):
        assert abs(a[0] - b[0]) < 1e-4, (a, b)
    assert len(chunked["input_top_logprobs"]) == len(prompt)


def test_hidden_states_belong_to_each_output_token(tiny, tiny_ref):
    """The hidden state returned for output token i gives that token back through the LM head
    (greedy), the first one (sampled in the prefill step) included."""
    import jax.numpy as jnp

    request = EngineRequest(
        rid="hidden-rows",
        input_ids=prompts_of(tiny_ref)[2],
        sampling_params=SamplingParams.from_dict(_greedy(4)),
        return_hidden_states=True,
    )
    (output,) = tiny._run_blocking([request])
    assert len(output.hidden_states) == len(output.output_ids) == 4
    logits = np.asarray(tiny.model.compute_logits(jnp.asarray(output.hidden_states, jnp.float32)))
    assert logits.argmax(-1).tolist() == output.output_ids


def test_finish_order_length_first_and_ignore_eos_covers_stop_tokens(tiny, tiny_ref):
    """As the reference: the length limit wins over a stop token on the last allowed token, and
    ignore_eos also ignores stop_token_ids."""
    prompt = prompts_of(tiny_ref)[0]
    greedy = _batched_ids(tiny, [prompt], [6])[0]
    third = greedy[2]
    first = greedy.index(third)  # the stop matches the token's first appearance

    def run(**params) -> tuple[list[int], dict]:
        request = EngineRequest(
            rid=f"order-{time.monotonic_ns()}",
            input_ids=prompt,
            sampling_params=SamplingParams.from_dict({"temperature": 0.0, **params}),
        )
        (output,) = tiny._run_blocking([request])
        return output.output_ids, output.finish_reason

    ids, reason = run(max_new_tokens=6, stop_token_ids=[third])
    assert ids == greedy[: first + 1] and reason == {"type": "stop", "matched": third}
    ids, reason = run(max_new_tokens=first + 1, stop_token_ids=[third])
    assert reason == {"type": "length", "length": first + 1}
    ids, reason = run(max_new_tokens=6, stop_token_ids=[third], ignore_eos=True)
    assert ids == greedy and reason == {"type": "length", "length": 6}


def test_offline_generate_expands_n(tiny, tiny_ref):
    """Engine.generate with n: a list of n samples per prompt, in [p0 x n, p1 x n] order."""
    prompts = prompts_of(tiny_ref)[:2]
    solo = [tiny.generate(input_ids=p, sampling_params=_greedy(3)) for p in prompts]
    out = tiny.generate(input_ids=prompts, sampling_params=_greedy(3, n=2))
    assert [o["text"] for o in out] == [solo[0]["text"]] * 2 + [solo[1]["text"]] * 2
    seeded = tiny.generate(
        input_ids=prompts[0],
        sampling_params={"temperature": 1.0, "max_new_tokens": 8, "n": 2, "sampling_seed": 5},
    )
    assert isinstance(seeded, list) and len(seeded) == 2 and seeded[0]["text"] != seeded[1]["text"]
    with pytest.raises(ValueError, match="n must be at least 1"):
        tiny.generate(input_ids=prompts[0], sampling_params=SamplingParams(n=0))


def test_launch_settings_that_would_serve_wrongly_are_refused(tiny_llama_path, tmp_path):
    """A context past the model's positions, and a chat template given by a name this server
    does not know (it would become the template text and drop every message)."""
    from runtime.tokenizer import chat_template_text

    with pytest.raises(ValueError, match="longer than the model's"):
        _engine(tiny_llama_path, context_length=10**6)
    with pytest.raises(ValueError, match="neither a file nor a Jinja template"):
        chat_template_text("chatml")
    inline = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert chat_template_text(inline) == inline
    (tmp_path / "t.jinja").write_text(inline)
    assert chat_template_text(str(tmp_path / "t.jinja")) == inline


def test_warmup_compiles_the_programs_a_first_request_needs(tiny_llama_path):
    """The warm-up compiles its shapes from the shapes alone (no step of them runs), and they are
    the ones the scheduler builds: a first prompt of any length up to the warm-up's longest, and a
    first batch of decode rows, compile nothing while the client waits."""
    engine = _engine(tiny_llama_path, chunked_prefill_size=512, warmup=True)
    try:
        warmed = engine._warmup_shapes()
        assert engine.runner.step_programs.num_compiled_here == len(warmed)
        assert engine.runner._forward._cache_size() == 0  # the one warm-up request ran warmed programs
        compiled = engine.runner.num_compiled_programs
        rng = np.random.default_rng(5)
        for length in (3, 40, 300, min(512, engine.model_info.context_length - 8)):
            engine.generate(input_ids=rng.integers(5, 200, length).tolist(), sampling_params=_greedy(2))
        assert engine.runner.num_compiled_programs == compiled
        batch = [rng.integers(5, 200, 6).tolist() for _ in range(5)]
        engine.generate(input_ids=batch, sampling_params=_greedy(3))
        new = engine.runner.step_programs._compiled - set(warmed)
        assert all(shape.prefill_seqs > 0 for shape in new), new  # their prefill alone, not the decode
    finally:
        engine.shutdown()


def test_where_borrowing_has_no_size_limit_a_burst_compiles_nothing_inline(tiny_llama_path):
    """Off a CPU (forced here) a step may borrow any larger program, and the warm-up compiles the
    burst shapes: a burst of more prompts than a step takes (chunks of 16 prompts, the rest beside
    their decode rows, then decode steps wider than the warm-up's) runs on them, compiling nothing
    inline, and gives the same tokens once the steps run their own programs."""
    engine = _engine(tiny_llama_path, chunked_prefill_size=512)
    programs = engine.runner.step_programs
    assert programs.max_borrow_factor == 2  # a CPU's default
    programs.max_borrow_factor = None
    inline: list[StepShape] = []
    note_compiled = programs.note_compiled
    programs.note_compiled = lambda shape: inline.append(shape) or note_compiled(shape)
    try:
        engine.warmup()
        burst = [shape for shape in engine._warmup_shapes() if shape.width == 64]
        assert [(shape.decode, shape.prefill_seqs) for shape in burst] == [(32, 0), (32, 16)]
        inline.clear()
        rng = np.random.default_rng(11)
        prompts = [rng.integers(5, 200, int(n)).tolist() for n in rng.integers(4, 200, 20)]
        first = _batched_ids(engine, prompts, [4] * len(prompts))
        assert not inline, inline
        engine.runner.wait_for_background_compiles()
        engine.flush_cache()
        assert _batched_ids(engine, prompts, [4] * len(prompts)) == first
    finally:
        engine.shutdown()


def test_a_second_user_meets_no_inline_compile_while_a_first_one_streams(tiny_llama_path):
    """A prompt arriving while another request decodes makes a mixed step, then a two-row decode
    at the prompt's width, that the warm-up does not compile. Each runs as parts that compiled
    programs hold (the prompt alone, then the rows by turns) while its own programs compile aside:
    nothing compiles inline, and both get the tokens they get alone."""
    engine = _engine(tiny_llama_path, chunked_prefill_size=512, warmup=True)
    programs = engine.runner.step_programs
    inline: list[StepShape] = []
    note_compiled = programs.note_compiled
    programs.note_compiled = lambda shape: inline.append(shape) or note_compiled(shape)
    dispatch = engine.runner.forward
    steps: list[list[int]] = []  # the query lengths of each step's sequences
    alone: list[bool] = []  # for each one-row decode step: whether it was the second request's

    def recording(batch):
        lengths = np.diff(batch.cu_q_lens)
        steps.append(lengths[lengths > 0].tolist())
        if steps[-1] == [1]:
            alone.append(int(batch.positions[0]) >= 300)
        return dispatch(batch)

    engine.runner.forward = recording
    try:
        rng = np.random.default_rng(8)
        first_prompt, second_prompt = rng.integers(5, 200, 20).tolist(), rng.integers(5, 200, 300).tolist()
        started, done = threading.Event(), threading.Event()
        outputs: dict[str, list[int]] = {}

        def collect(output):
            outputs[output.rid] = output.output_ids
            if len(output.output_ids) >= 4:
                started.set()
            if output.finished and len(outputs) == 2 and len(outputs["first"]) == 300:
                done.set()

        first = EngineRequest(
            rid="first",
            input_ids=first_prompt,
            sampling_params=SamplingParams.from_dict(_greedy(300)),
            stream=True,
        )
        engine.submit(first, collect)
        assert started.wait(60)
        second = EngineRequest(
            rid="second", input_ids=second_prompt, sampling_params=SamplingParams.from_dict(_greedy(30))
        )
        engine.submit(second, collect)
        assert done.wait(120)
        assert not inline, inline
        assert [300] in steps and [1, 300] not in steps  # the prompt ran alone
        # then the two rows by turns, each step the row left out of the one before
        turns = alone[alone.index(True) - 1 :][:8]
        assert turns == [False, True] * 4, alone
        engine.runner.wait_for_background_compiles()  # the two shapes compiled aside
        assert programs.is_compiled(StepShape(decode=2, prefill_seqs=0, prefill_tokens=0, max_q=0, width=20))
        assert any(shape.decode and shape.prefill_seqs for shape in programs._programs)
        engine.flush_cache()
        assert outputs["first"] == _batched_ids(engine, [first_prompt], [300])[0]
        assert outputs["second"] == _batched_ids(engine, [second_prompt], [30])[0]
        assert _pool_whole(engine)
    finally:
        engine.shutdown()


def test_decode_rows_a_step_cannot_hold_all_take_turns(tiny_llama_path):
    """Three rows at a width the warm-up compiled for one row only: until their own program
    compiles aside, each step runs the row that ran longest ago, so all three advance in turn
    (none waits for the compile), and each gets the tokens it gets alone."""
    engine = _engine(tiny_llama_path, chunked_prefill_size=1024, warmup=True)
    dispatch = engine.runner.forward
    turns: list[int] = []  # the first page of each one-row decode step's row: whose turn it was

    def recording(batch):
        lengths = np.diff(batch.cu_q_lens)
        if lengths[lengths > 0].tolist() == [1]:
            turns.append(int(batch.page_table[0, 0]))
        return dispatch(batch)

    engine.runner.forward = recording
    try:
        rng = np.random.default_rng(9)
        prompts = [rng.integers(5, 200, n).tolist() for n in (300, 305, 310)]
        together = _batched_ids(engine, prompts, [12] * 3)
        assert len(turns) >= 6, turns
        for window in range(len(turns[:9]) - 2):
            assert len(set(turns[window : window + 3])) == 3, turns
        engine.runner.wait_for_background_compiles()
        engine.flush_cache()
        assert together == [_batched_ids(engine, [p], [12])[0] for p in prompts]
        assert _pool_whole(engine)
    finally:
        engine.shutdown()


def test_a_dispatch_thread_serves_what_the_scheduler_thread_serves(tiny_llama_path):
    """With the forward dispatched from a thread of its own (a GPU's default, forced here), while
    the scheduler thread reads the previous step: the same tokens, logprobs, sampled draws and
    constrained answers as dispatching inline, and the pool whole after."""
    rng = np.random.default_rng(12)
    prompts = [rng.integers(5, 200, int(n)).tolist() for n in rng.integers(3, 150, 10)]
    lengths = [int(n) for n in rng.integers(1, 24, len(prompts))]
    seeded = {"temperature": 0.8, "top_p": 0.9, "max_new_tokens": 10, "sampling_seed": 3, "ignore_eos": True}
    results, threads = [], set()
    for mode in ("on", "off"):
        engine = _engine(tiny_llama_path, chunked_prefill_size=128, dispatch_thread=mode)

        def noting(batch, dispatch=engine.runner.forward):
            threads.add(threading.current_thread().name)
            return dispatch(batch)

        engine.runner.forward = noting
        try:
            ids = _batched_ids(engine, prompts, lengths)
            logprobs = engine.generate(
                input_ids=prompts[:3],
                sampling_params=_greedy(4),
                return_logprob=True,
                logprob_start_len=0,
                top_logprobs_num=2,
            )
            sampled = engine.generate(input_ids=prompts[:4], sampling_params=seeded)
            constrained = engine.generate(
                prompt="The answer:", sampling_params=_greedy(12, regex="( yes| no)[.!]", ignore_eos=False)
            )
            keys = ("input_token_logprobs", "output_token_logprobs", "output_top_logprobs")
            logprobs = [(o["text"], [o["meta_info"][key] for key in keys]) for o in logprobs]
            results.append((ids, logprobs, [o["text"] for o in sampled], constrained["text"]))
            assert _pool_whole(engine)
        finally:
            engine.shutdown()
    assert any(name.startswith("sglax-dispatch") for name in threads), threads
    # Logprobs to the last bits only within one batching: how requests arrive decides a step's
    # shape, and other matmul shapes round differently.
    (ids, logprobs, sampled, constrained), (ids_off, logprobs_off, sampled_off, constrained_off) = results
    assert (ids, sampled, constrained) == (ids_off, sampled_off, constrained_off)
    for (text, tables), (text_off, tables_off) in zip(logprobs, logprobs_off, strict=True):
        assert text == text_off
        flat = [e for table in tables for e in _flatten(table)]
        flat_off = [e for table in tables_off for e in _flatten(table)]
        assert [e[1] for e in flat] == [e[1] for e in flat_off]
        assert np.allclose([e[0] or 0.0 for e in flat], [e[0] or 0.0 for e in flat_off], atol=1e-4), (
            flat,
            flat_off,
        )
    assert constrained in (" yes.", " yes!", " no.", " no!")


def _flatten(table: list) -> list[list]:
    """The [logprob, id, text] entries of a logprob table (or of a list of such tables, one a
    position, None where a position has none)."""
    if len(table) == 3 and isinstance(table[1], int):
        return [table]
    return [entry for item in table if item is not None for entry in _flatten(item)]


def test_a_decode_batch_gets_its_next_width_compiled_before_it_grows_into_it(tiny_llama_path):
    """A decode step whose rows will outgrow its page-table width has the next width compiled
    aside: the step that first needs it runs that program (waiting for it if its compile is still
    under way) and compiles nothing inline."""
    engine = _engine(tiny_llama_path)
    inline: list[StepShape] = []
    programs = engine.runner.step_programs
    note_compiled = programs.note_compiled
    programs.note_compiled = lambda shape: inline.append(shape) or note_compiled(shape)
    try:
        page_size = engine.server_args.page_size
        prompt = np.random.default_rng(3).integers(5, 200, 6 * page_size).tolist()
        # The first decode shape (width 8) compiles inline, and its samplers then compile aside:
        # waited for here, so that the compile thread is free when the next width is asked for
        # (else, with a warm disk cache, the steps may outrun a compile queued behind them).
        engine.generate(input_ids=prompt, sampling_params=_greedy(2))
        engine.runner.wait_for_background_compiles()
        # 6 pages at the first decode (width 8), then past 8 pages: width 12
        engine.generate(input_ids=prompt, sampling_params=_greedy(3 * page_size))
        first, wider = (
            StepShape(decode=1, prefill_seqs=0, prefill_tokens=0, max_q=0, width=w) for w in (8, 12)
        )
        assert first in inline  # no warm-up: the first decode shape compiled inline
        assert wider in programs._programs and wider not in inline, inline
        # a request that stays inside its width asks for nothing wider
        engine.generate(input_ids=prompt[:page_size], sampling_params=_greedy(2))
        assert programs.num_compiled_here == 1
    finally:
        engine.shutdown()


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="only a CPU keeps a bfloat16 pool as bits")
def test_a_bfloat16_pool_kept_as_bits_serves_the_same_tokens(tiny_llama_path, monkeypatch):
    """On a CPU a bfloat16 KV pool holds its values' bits as uint16 (XLA's CPU scatter copied a
    whole bfloat16 pool for every one-token write: 90 s for 128 tokens of the tiny model). The
    same greedy tokens and logprobs come out, bit for bit, as from a pool of bfloat16 arrays."""
    rng = np.random.default_rng(11)
    prompts = [rng.integers(5, 200, n).tolist() for n in (7, 40, 90)]

    def run() -> tuple[str, list]:
        engine = _engine(tiny_llama_path, dtype="bfloat16", max_total_tokens=2048)
        try:
            outs = engine.generate(input_ids=prompts, sampling_params=_greedy(12), return_logprob=True)
            return str(engine.pool.k_pool.dtype), [o["meta_info"]["output_token_logprobs"] for o in outs]
        finally:
            engine.shutdown()

    bits_dtype, bits = run()
    monkeypatch.setattr(kv_pool, "pool_storage_dtype", lambda dtype, platform: jnp.dtype(dtype))
    plain_dtype, plain = run()
    assert (bits_dtype, plain_dtype) == ("uint16", "bfloat16")
    assert bits == plain and all(len(tokens) == 12 for tokens in bits)


def test_reward_scores_the_last_token_that_is_not_padding(tiny_llama_reward_path):
    """A prompt ending in the pad token (pad == EOS in many chat models) is scored at its last
    other token, as HF's sequence classifiers do."""
    import torch
    from transformers import AutoModelForSequenceClassification

    hf = AutoModelForSequenceClassification.from_pretrained(str(tiny_llama_reward_path)).eval()
    pad = hf.config.pad_token_id
    prompt = [3, 17, 44, 90, 12, pad, pad]
    with torch.no_grad():
        want = hf(torch.tensor([prompt])).logits[0].numpy()
    engine = _engine(tiny_llama_reward_path, is_embedding=True)
    try:
        got = engine.encode(input_ids=prompt)["embedding"]
    finally:
        engine.shutdown()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_shutdown_writes_a_trace_in_progress(tiny_llama_path, tmp_path):
    engine = _engine(tiny_llama_path)
    try:
        engine.start_profile(str(tmp_path))
        engine.generate(input_ids=[5, 6, 7], sampling_params=_greedy(2))
    finally:
        engine.shutdown()
    assert list(tmp_path.rglob("*.trace.json.gz")), list(tmp_path.rglob("*"))


def test_zero_new_tokens_reads_the_prompt_only(tiny, tiny_ref):
    """max_new_tokens 0: no token sampled, input logprobs as HF's, also for a cached prompt."""
    prompt = prompts_of(tiny_ref)[1]
    logits = np.asarray(tiny_ref["logits_1"], np.float64)
    peak = logits.max(-1, keepdims=True)
    logsoftmax = logits - peak - np.log(np.exp(logits - peak).sum(-1, keepdims=True))
    scored = tiny.generate(
        input_ids=prompt, sampling_params=_greedy(0), return_logprob=True, logprob_start_len=0
    )
    meta = scored["meta_info"]
    assert scored.get("text", "") == "" and scored.get("output_ids", []) == []
    assert meta["completion_tokens"] == 0
    assert meta["finish_reason"] == {"type": "length", "length": 0}
    assert meta["output_token_logprobs"] == []
    inputs = meta["input_token_logprobs"]
    assert len(inputs) == len(prompt) and inputs[0][0] is None
    for pos in range(1, len(prompt)):
        assert abs(inputs[pos][0] - logsoftmax[pos - 1, prompt[pos]]) < 1e-4
    cached = tiny.generate(input_ids=prompt, sampling_params=_greedy(0))["meta_info"]
    assert cached["completion_tokens"] == 0 and cached["cached_tokens"] > 0
    after = _batched_ids(tiny, [prompt], [4])[0]  # on the prefix the 0-token requests cached
    result = greedy_agrees(after, tiny_ref["greedy_1"][:4], tiny_ref["greedy_margin_1"][:4])
    assert result, result
    assert _pool_whole(tiny)


def test_stop_strings_and_stop_tokens_are_trimmed(smollm2_path):
    engine = _engine(smollm2_path, max_total_tokens=2048)
    try:
        chat = engine.tokenizer.apply_chat_template(
            [{"role": "user", "content": "What is the capital of France?"}],
            add_generation_prompt=True,
            tokenize=False,
        )
        full = engine.generate(prompt=chat, sampling_params=_greedy(20))
        assert "Paris" in full["text"]
        stop = "of France"
        assert stop in full["text"]
        cut = engine.generate(prompt=chat, sampling_params=_greedy(20, stop=stop))
        assert cut["text"] == full["text"][: full["text"].index(stop)]
        assert cut["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
        kept = engine.generate(prompt=chat, sampling_params=_greedy(20, stop=stop, no_stop_trim=True))
        assert kept["text"].endswith(stop)
        # min_new_tokens holds stop strings back as it does stop tokens: no early match ends it.
        held = engine.generate(prompt=chat, sampling_params=_greedy(20, stop=stop, min_new_tokens=15))
        assert held["meta_info"]["completion_tokens"] > 15 and held["text"].startswith(full["text"][:30])
        streamed = list(engine.generate(prompt=chat, sampling_params=_greedy(20), stream=True))
        assert streamed[-1]["text"] == full["text"]
        assert all("\ufffd" not in event["text"] for event in streamed)
        # A matched stop token is left out of the text (kept with no_stop_trim), streamed or not.
        ids = engine.tokenizer(full["text"], add_special_tokens=False)["input_ids"]
        token, before = ids[3], engine.tokenizer.decode(ids[:3])
        for stream in (False, True):
            runs = [
                engine.generate(
                    prompt=chat,
                    sampling_params=_greedy(20, stop_token_ids=[token], no_stop_trim=keep, ignore_eos=False),
                    stream=stream,
                )
                for keep in (False, True)
            ]
            trimmed, kept = (list(run)[-1] if stream else run for run in runs)
            assert trimmed["meta_info"]["finish_reason"] == {"type": "stop", "matched": token}
            assert trimmed["text"] == before, (stream, trimmed["text"])
            assert kept["text"] == engine.tokenizer.decode(ids[:4]), (stream, kept["text"])
    finally:
        engine.shutdown()


@pytest.mark.parametrize(
    ("backend", "dtype", "expected"),
    [("gpu", "float32", "highest"), ("gpu", "bfloat16", None), ("cpu", "float32", None)],
)
def test_float32_on_gpu_multiplies_in_float32(monkeypatch, backend, dtype, expected):
    """XLA's GPU default is TF32 for float32 products; float32 serving asks for the real thing."""
    import jax

    from runtime import engine

    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    before = jax.config.jax_default_matmul_precision
    try:
        engine._keep_float32_exact(dtype)
        assert jax.config.jax_default_matmul_precision == (expected or before)
    finally:
        jax.config.update("jax_default_matmul_precision", before)


def test_a_new_step_shape_borrows_a_compiled_program_while_its_own_compiles(tiny_llama_path, caplog):
    """No stall on a new shape that a compiled program holds: the step runs padded to it, and
    its own program compiles on the background thread and serves the next such step."""
    rng = np.random.default_rng(17)
    prompts = [rng.integers(100, 40000, size=20).tolist() for _ in range(6)]  # no prefix shared
    plain = _engine(tiny_llama_path, chunked_prefill_size=64, borrow_compiled_programs=False)
    try:
        expected = _batched_ids(plain, prompts[:2], [6, 6])
    finally:
        plain.shutdown()
    engine = _engine(tiny_llama_path, chunked_prefill_size=64)
    try:
        runner = engine.runner
        _batched_ids(engine, prompts[2:], [6] * 4)  # compiles the shapes of four sequences
        inline = runner._forward._cache_size()
        with caplog.at_level("INFO", logger="runtime.step_programs"):
            assert _batched_ids(engine, prompts[:2], [6, 6]) == expected
        assert runner._forward._cache_size() == inline, "a step compiled inline"
        assert any("while its own programs compile" in r.getMessage() for r in caplog.records)
        runner.wait_for_background_compiles()
        samplers = runner._sample._cache_size()
        ran = []
        forward = runner.forward
        runner.forward = lambda batch: ran.append(batch.step_shape()) or forward(batch)
        engine.flush_cache()  # the same prompts again, prefilled whole
        assert _batched_ids(engine, prompts[:2], [6, 6]) == expected
        assert any(runner.step_programs.programs(shape) is not None for shape in ran)
        assert runner._forward._cache_size() == inline
        assert runner._sample._cache_size() == samplers, "the sampler compiled inline"
        assert _pool_whole(engine)
    finally:
        engine.shutdown()


def test_exiting_during_a_background_compile_is_clean(tiny_llama_path):
    """The compiler thread is a daemon: killed inside an XLA compile at exit, it aborted the process."""
    script = f"""
import time
import numpy as np
from runtime.engine import Engine
engine = Engine(model_path={str(tiny_llama_path)!r}, max_total_tokens=8192, max_running_requests=32,
                random_seed=0, enable_compile_cache=False, chunked_prefill_size=64)
rng = np.random.default_rng(17)
prompts = [rng.integers(100, 40000, size=20).tolist() for _ in range(6)]
greedy = {{"temperature": 0.0, "max_new_tokens": 1, "ignore_eos": True}}
engine.generate(input_ids=prompts[2:], sampling_params=greedy)
engine.generate(input_ids=prompts[:2], sampling_params=greedy)  # borrows; its programs compile aside
assert engine.runner.step_programs._queued, "nothing was compiling in the background"
time.sleep(0.3)
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_weight_swap_releases_the_weights_it_replaces(tiny_llama_path):
    """The engine's model object kept the weights it was loaded with: after a swap the device
    held both (and a third set during the next swap), a model's worth of memory the KV pool
    was sized without."""
    engine = _engine(tiny_llama_path)
    try:
        loaded = [weakref.ref(leaf) for leaf in jax.tree.leaves(engine.runner.params)]
        for _ in range(2):
            ok, message, _ = engine.update_weights_from_disk(str(tiny_llama_path))
            assert ok, message
        gc.collect()
        assert not [ref for ref in loaded if ref() is not None]
        model_leaves = jax.tree.leaves(nnx.state(engine.model))
        assert [id(leaf) for leaf in model_leaves] == [
            id(leaf) for leaf in jax.tree.leaves(engine.runner.params)
        ]
        assert len(_batched_ids(engine, [[5, 6, 7]], [4])[0]) == 4
    finally:
        engine.shutdown()


def test_unrolled_layers_match_the_scan_and_take_a_weight_swap(tiny_qwen2_moe_path):
    """--layer-loop unrolled: HF's greedy tokens, the scan's expert counts and logprobs (to float
    noise), a step program with no loop left (the scan's has one), and a weight swap."""
    ref = load_reference(TINY_QWEN2_MOE)
    prompts = prompts_of(ref)
    n = len(ref["greedy_0"])
    seen = {}
    for loop in ("scan", "unrolled"):
        engine = _engine(tiny_qwen2_moe_path, layer_loop=loop)
        try:
            engine.start_expert_distribution_record()
            ids = _batched_ids(engine, prompts, [n] * len(prompts))
            histogram = engine.scheduler.call(engine.runner.take_expert_histogram)
            out = engine.generate(input_ids=prompts[0], sampling_params=_greedy(8), return_logprob=True)
            logprobs = [entry[0] for entry in out["meta_info"]["output_token_logprobs"]]
            seen[loop] = (ids, histogram, logprobs)
            decode_step = StepShape(decode=2, prefill_seqs=0, prefill_tokens=0, max_q=0, width=4)
            program = engine.runner._compile_forward(decode_step).as_text()
            assert ("while" in program) == (loop == "scan")
            if loop == "unrolled":
                for i, tokens in enumerate(ids):
                    result = greedy_agrees(tokens, ref[f"greedy_{i}"], ref[f"greedy_margin_{i}"])
                    assert result, f"prompt {i}: {result}"
                ok, message, _ = engine.update_weights_from_disk(str(tiny_qwen2_moe_path))
                assert ok, message
                assert _batched_ids(engine, prompts, [n] * len(prompts)) == ids
        finally:
            engine.shutdown()
    (scan_ids, scan_hist, scan_logprobs), (ids, hist, logprobs) = seen["scan"], seen["unrolled"]
    assert ids == scan_ids
    np.testing.assert_array_equal(hist, scan_hist)
    assert hist.sum() > 0
    np.testing.assert_allclose(logprobs, scan_logprobs, atol=1e-4)


def test_a_burst_sent_one_by_one_starts_as_one_prefill_step(tiny_llama_path):
    """Six requests 5 ms apart reach an idle engine: within the burst window of each other,
    they make one first step (with no window, that step would hold the first alone)."""
    engine = _engine(tiny_llama_path, burst_window_ms=100.0)
    try:
        first_steps: list[int] = []
        dispatch = engine.runner.forward

        def recording(batch):
            if not first_steps:
                first_steps.append(int(np.count_nonzero(np.diff(batch.cu_q_lens))))
            return dispatch(batch)

        engine.runner.forward = recording
        done = threading.Event()
        finished: list[str] = []

        def collect(output):
            if output.finished:
                finished.append(output.rid)
                if len(finished) == 6:
                    done.set()

        for i in range(6):
            request = EngineRequest(
                rid=f"b{i}", input_ids=[100 + i] * 40, sampling_params=SamplingParams.from_dict(_greedy(2))
            )
            engine.submit(request, collect)
            time.sleep(0.005)
        assert done.wait(120)
        assert first_steps == [6], first_steps
    finally:
        engine.shutdown()
