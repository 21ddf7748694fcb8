"""SamplingParams validation and the on-device sampler, checked against numpy definitions."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from runtime.sampling import (
    ARGMAX_CHUNK,
    TOP_CANDIDATES,
    SamplingBatch,
    SamplingRow,
    _first_argmax,
    _small_top_k_cutoff,
    apply_penalties,
    full_logprobs,
    is_plain_greedy,
    make_sampling_batch,
    reset_penalty_rows,
    sample,
    seeds_to_key_data,
    update_output_counts,
)
from runtime.sampling_params import SamplingParams

_sample = jax.jit(sample)
_cutoff = jax.jit(_small_top_k_cutoff)

# ----------------------------------------------------------------------------- SamplingParams


def test_defaults_match_the_reference() -> None:
    p = SamplingParams.from_dict({})
    assert p == SamplingParams()
    assert (p.max_new_tokens, p.min_new_tokens, p.stop, p.stop_token_ids) == (128, 0, [], [])
    assert (p.temperature, p.top_p, p.top_k, p.min_p) == (1.0, 1.0, -1, 0.0)
    assert (p.frequency_penalty, p.presence_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.ignore_eos, p.skip_special_tokens, p.spaces_between_special_tokens, p.no_stop_trim) == (
        False,
        True,
        True,
        False,
    )
    assert (p.n, p.regex, p.json_schema, p.ebnf, p.structural_tag) == (1, None, None, None, None)
    assert (p.custom_params, p.sampling_seed) == (None, None)
    assert SamplingParams.from_dict(None) == SamplingParams()
    assert not p.is_greedy


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"temperature": -0.5}, "temperature must be non-negative, got -0.5."),
        ({"temperature": -1}, "temperature must be non-negative, got -1."),
        ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0."),
        ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5."),
        ({"min_p": -0.1}, "min_p must be in [0, 1], got -0.1."),
        ({"min_p": 1.01}, "min_p must be in [0, 1], got 1.01."),
        ({"top_k": 0}, "top_k must be -1 (disable) or at least 1, got 0."),
        ({"top_k": -2}, "top_k must be -1 (disable) or at least 1, got -2."),
        ({"frequency_penalty": 2.5}, "frequency_penalty must be in [-2, 2], got 2.5."),
        ({"frequency_penalty": -3}, "frequency_penalty must be in [-2, 2], got -3."),
        ({"presence_penalty": -2.01}, "presence_penalty must be in [-2, 2], got -2.01."),
        ({"repetition_penalty": -0.1}, "repetition_penalty must be in [0, 2], got -0.1."),
        ({"repetition_penalty": 2.1}, "repetition_penalty must be in [0, 2], got 2.1."),
        ({"max_new_tokens": -1}, "max_new_tokens must be at least 0, got -1."),
        ({"min_new_tokens": -1}, "min_new_tokens must be in [0, max_new_tokens(128)], got -1."),
        (
            {"max_new_tokens": 4, "min_new_tokens": 5},
            "min_new_tokens must be in [0, max_new_tokens(4)], got 5.",
        ),
        (
            {"max_new_tokens": None, "min_new_tokens": -3},
            "min_new_tokens must be in [0, max_new_tokens(None)], got -3.",
        ),
        ({"n": 0}, "n must be at least 1, got 0."),
        ({"n": 1025}, "n may be at most 1024, got 1025."),
        ({"stop": ["x"] * 65}, "stop holds 65 strings; at most 64 are served."),
        (
            {"stop_token_ids": list(range(1025))},
            "stop_token_ids holds 1025 distinct ids; at most 1024 are served.",
        ),
        ({"stop": ["ok", "y" * 1025]}, "stop strings may be up to 1024 characters long, got one of 1025."),
        ({"regex": "a+", "ebnf": "root ::= 'a'"}, "Only one of regex, json_schema, or ebnf can be set."),
        ({"regex": "a+", "json_schema": "{}"}, "Only one of regex, json_schema, or ebnf can be set."),
        (
            {"structural_tag": "{}"},
            "Invalid structural_tag: structures must be a non-empty list of objects with begin, "
            "schema and end",
        ),
        (
            {"regex": "a", "structural_tag": "{}"},
            "structural_tag cannot be set with regex, json_schema or ebnf.",
        ),
        ({"stop_token_ids": [3, -1]}, "stop_token_ids must be non-negative token ids, got -1."),
        ({"sampling_seed": 2**64 + 5}, f"sampling_seed must be in [-2**63, 2**64), got {2**64 + 5}."),
        ({"sampling_seed": -(2**70)}, f"sampling_seed must be in [-2**63, 2**64), got {-(2**70)}."),
    ],
)
def test_invalid_values_give_the_reference_messages(params: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        SamplingParams.from_dict(params)
    assert str(err.value) == message


def test_the_samples_of_a_seed_at_the_top_of_the_range_stay_in_it() -> None:
    """Sample j of n uses seed + j, as its 64 bits: the client's top seed does not become a 400."""
    params = SamplingParams.from_dict({"sampling_seed": 2**64 - 1, "n": 3})
    seeds = [params.for_sample(j).sampling_seed for j in range(3)]
    assert seeds == [2**64 - 1, 0, 1]
    for j in range(3):
        params.for_sample(j).validate()


def test_repeated_stop_token_ids_count_once() -> None:
    params = SamplingParams.from_dict({"stop_token_ids": [7, 3, 7] * 1000})
    assert params.stop_token_ids == [7, 3]


def test_unknown_key_is_named() -> None:
    with pytest.raises(ValueError) as err:
        SamplingParams.from_dict({"temperature": 0.5, "foo": 1})
    assert str(err.value) == "Unknown sampling parameter: 'foo'."


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("temperature", "hot"),
        ("temperature", True),
        ("temperature", float("nan")),
        ("top_p", float("inf")),
        ("top_k", 2.5),
        ("top_k", True),
        ("max_new_tokens", "10"),
        ("min_new_tokens", None),
        ("n", [2]),
        ("stop", 5),
        ("stop", ["ok", 3]),
        ("stop_token_ids", 7),
        ("stop_token_ids", [1, "2"]),
        ("ignore_eos", 1),
        ("skip_special_tokens", "false"),
        ("no_stop_trim", None),
        ("regex", 5),
        ("custom_params", [1]),
        ("sampling_seed", 1.5),
    ],
)
def test_wrong_types_name_the_key(key: str, value: object) -> None:
    with pytest.raises(ValueError) as err:
        SamplingParams.from_dict({key: value})
    assert str(err.value).startswith(f"{key} must be "), str(err.value)


def test_normalisation_and_accepted_forms() -> None:
    p = SamplingParams.from_dict(
        {
            "stop": "</s>",
            "max_new_tokens": 16.0,
            "top_k": 1,
            "stop_token_ids": [5, 7],
            "custom_params": {"x": 1},
            "sampling_seed": 2**40,
        }
    )
    assert p.stop == ["</s>"] and p.max_new_tokens == 16 and isinstance(p.max_new_tokens, int)
    assert p.stop_token_ids == [5, 7] and p.sampling_seed == 2**40 and p.is_greedy
    assert SamplingParams.from_dict({"stop": None}).stop == []
    assert SamplingParams.from_dict({"stop": ["a", "", "b"]}).stop == ["a", "b"]
    assert SamplingParams.from_dict({"max_new_tokens": None, "min_new_tokens": 10}).max_new_tokens is None
    assert SamplingParams.from_dict({"temperature": 0}).is_greedy
    assert SamplingParams.from_dict({"temperature": 1e-7}).is_greedy
    assert not SamplingParams.from_dict({"temperature": 1e-5}).is_greedy
    assert SamplingParams.from_dict({"repetition_penalty": 0, "temperature": 2}).repetition_penalty == 0


def test_verify_checks_stop_token_ids_against_the_vocabulary() -> None:
    SamplingParams(stop_token_ids=[0, 99]).verify(100)
    with pytest.raises(ValueError, match="stop_token_ids contains 100, outside the vocabulary"):
        SamplingParams(stop_token_ids=[3, 100]).verify(100)


# ----------------------------------------------------------------------------- host batch


@pytest.mark.parametrize("seed", [0, 1, 42, 2**31 - 1, 2**31, 2**32 - 1])
def test_seeds_to_key_data_matches_prng_key(seed: int) -> None:
    expected = np.asarray(jax.random.key_data(jax.random.PRNGKey(seed)))
    np.testing.assert_array_equal(seeds_to_key_data([seed])[0], expected)
    assert seeds_to_key_data([seed])[0].dtype == np.uint32


def test_seeds_to_key_data_keeps_high_bits() -> None:
    assert not np.array_equal(seeds_to_key_data([5])[0], seeds_to_key_data([2**32 + 5])[0])
    np.testing.assert_array_equal(seeds_to_key_data([-1])[0], [0xFFFFFFFF, 0xFFFFFFFF])


def test_make_sampling_batch_pads_and_bans_until_min_new_tokens() -> None:
    params = SamplingParams(temperature=0.5, top_k=-1, min_new_tokens=3, stop_token_ids=[7, 2])
    rows = [
        SamplingRow(params, seed=9, output_index=1, penalty_slot=4, eos_ids=[2]),
        SamplingRow(params, seed=9, output_index=3, penalty_slot=4, eos_ids=[2]),
        SamplingRow(SamplingParams(min_new_tokens=5, ignore_eos=True, stop_token_ids=[8]), 1, 0, 2, [2]),
        SamplingRow(
            SamplingParams(top_k=20, min_new_tokens=2, stop_token_ids=[10, 11, 12, 13, 14]), 1, 0, 1, [2]
        ),
    ]
    batch = make_sampling_batch(rows, pad_to=8)
    assert batch.temperature.shape == (8,) and batch.seeds.shape == (8, 2)
    assert batch.suppressed_ids.shape == (8, 8)  # 6 ids in row 3 -> next power of two
    assert batch.suppressed_ids[0].tolist()[:3] == [2, 7, -1]  # EOS and stop ids, deduplicated
    assert (batch.suppressed_ids[1] == -1).all()  # min_new_tokens reached
    assert batch.suppressed_ids[2].tolist()[:3] == [2, 8, -1]  # banned with ignore_eos too, as the reference
    assert batch.suppressed_ids[3].tolist()[:6] == [2, 10, 11, 12, 13, 14]
    assert batch.top_k.tolist()[:4] == [0, 0, 0, 20]
    assert batch.temperature[4:].tolist() == [0.0] * 4  # padding rows are greedy
    assert batch.repetition_penalty[4:].tolist() == [1.0] * 4
    assert batch.penalty_slot.tolist()[:4] == [4, 4, 2, 1]
    np.testing.assert_array_equal(batch.seeds[0], seeds_to_key_data([9])[0])
    assert make_sampling_batch(rows[:2], 2).suppressed_ids.shape == (2, 4)
    with pytest.raises(ValueError):
        make_sampling_batch(rows, pad_to=3)


# ----------------------------------------------------------------------------- device sampling


def _tables(rows: int, vocab: int) -> tuple[jax.Array, jax.Array]:
    return jnp.zeros((rows, vocab), jnp.int32), jnp.zeros((rows, vocab), jnp.bool_)


def _run(logits: np.ndarray, rows: list[SamplingRow], pad_to: int | None = None) -> np.ndarray:
    batch = make_sampling_batch(rows, pad_to or len(rows))
    padded = np.zeros((batch.temperature.shape[0], logits.shape[1]), np.float32)
    padded[: len(logits)] = logits
    counts, mask = _tables(8, logits.shape[1])
    return np.asarray(_sample(jnp.asarray(padded), batch, counts, mask).tokens)[: len(rows)]


def test_same_request_same_token_whatever_its_batch() -> None:
    rng = np.random.default_rng(1)
    vocab = 64
    target = rng.standard_normal(vocab).astype(np.float32) * 2
    mine = SamplingParams(temperature=1.1, top_p=0.9, top_k=30, min_p=0.01)
    for index in range(20):
        alone = _run(target[None], [SamplingRow(mine, 1234, index, 0)])[0]
        neighbours = [
            SamplingRow(SamplingParams(temperature=0), 5, index, 0),
            SamplingRow(SamplingParams(temperature=0.3, top_k=2), 6, 3, 0),
            SamplingRow(SamplingParams(top_p=0.5), 1234, index + 1, 0),
        ]
        others = rng.standard_normal((3, vocab)).astype(np.float32)
        crowd = np.concatenate([others[:2], target[None], others[2:]])
        rows = [*neighbours[:2], SamplingRow(mine, 1234, index, 0), neighbours[2]]
        assert _run(crowd, rows, pad_to=8)[2] == alone
    tokens = {int(_run(target[None], [SamplingRow(mine, 1234, i, 0)])[0]) for i in range(20)}
    assert len(tokens) > 3  # the output index moves the draw


def test_top_k_one_equals_greedy_exactly() -> None:
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((16, 128)).astype(np.float32)
    logits[3, [5, 9]] = 10.0  # a tie: the lowest index wins both ways
    greedy = _run(logits, [SamplingRow(SamplingParams(temperature=0), i, i, 0) for i in range(16)])
    top1 = _run(logits, [SamplingRow(SamplingParams(temperature=1.7, top_k=1), i, i, 0) for i in range(16)])
    np.testing.assert_array_equal(greedy, top1)
    np.testing.assert_array_equal(greedy, np.argmax(logits, axis=-1))
    assert greedy[3] == 5


def test_logprobs_are_the_raw_log_softmax() -> None:
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((4, 50)).astype(np.float32) * 3
    params = SamplingParams(temperature=0.5, repetition_penalty=1.5, frequency_penalty=1.0)
    batch = make_sampling_batch([SamplingRow(params, i, 0, i, eos_ids=[0]) for i in range(4)], 4)
    counts, mask = _tables(4, 50)
    counts = counts.at[:, :10].set(2)
    out = _sample(jnp.asarray(logits), batch, counts, mask)
    shifted = logits - logits.max(-1, keepdims=True)
    expected = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    table = np.asarray(full_logprobs(jnp.asarray(logits)))
    np.testing.assert_allclose(table, expected, atol=1e-5)
    tokens = np.asarray(out.tokens)
    np.testing.assert_allclose(np.asarray(out.chosen_logprob), expected[np.arange(4), tokens], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out.chosen_logprob), table[np.arange(4), tokens])


@pytest.mark.parametrize("vocab", [100, 256, 1000, 49152])
def test_first_argmax_is_numpy_argmax_with_ties_across_runs(vocab: int) -> None:
    """The two-stage argmax (runs of ARGMAX_CHUNK ids, then inside the first run holding the max)
    gives the lowest index on ties: inside a run, across runs, and between the runs and the tail."""
    rng = np.random.default_rng(vocab)
    x = rng.standard_normal((12, vocab)).astype(np.float32)
    last = vocab - 1
    x[0, [3, last]] = 9.0  # first run against the tail (or the last run)
    x[1, [last - 1, last]] = 9.0
    x[2, :] = -np.inf  # every id suppressed: id 0, as a plain argmax
    x[3, :] = 1.5
    if vocab > ARGMAX_CHUNK:
        x[4, [ARGMAX_CHUNK + 7, ARGMAX_CHUNK + 2]] = 9.0  # a tie inside the second run
        x[5, [ARGMAX_CHUNK - 1, ARGMAX_CHUNK]] = 9.0  # either side of a run boundary
    x[6, last] = 20.0  # the max in the last id alone
    got = np.asarray(jax.jit(_first_argmax)(jnp.asarray(x)))
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))


def _reference_distribution(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """The defined distribution in float64: temperature, then top-k and top-p jointly on the sorted
    probabilities (a token is dropped when the mass before it exceeds top_p), then min-p."""
    x = logits.astype(np.float64) / p.temperature
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    order = np.argsort(-x, kind="stable")
    sorted_probs = probs[order]
    keep_rank = np.cumsum(sorted_probs) - sorted_probs <= p.top_p
    if p.top_k > 0:
        keep_rank &= np.arange(len(x)) < p.top_k
    cutoff = x[order][keep_rank.sum() - 1]
    keep = (x >= cutoff) & (probs >= p.min_p * probs.max())
    kept = np.where(keep, probs, 0.0)
    return kept / kept.sum()


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.6),
        SamplingParams(temperature=1.8),
        SamplingParams(temperature=1.0, top_p=0.7),
        SamplingParams(temperature=0.9, top_k=4),
        SamplingParams(temperature=1.2, min_p=0.15),
        SamplingParams(temperature=1.5, top_k=9, top_p=0.85, min_p=0.02),
    ],
    ids=["t1", "t0.6", "t1.8", "top_p", "top_k", "min_p", "joint"],
)
def test_empirical_frequencies_match_the_exact_distribution(params: SamplingParams) -> None:
    rng = np.random.default_rng(4)
    vocab, draws = 16, 20000
    logits = (rng.standard_normal(vocab) * 1.5).astype(np.float32)
    rows = [SamplingRow(params, seed=77, output_index=i, penalty_slot=0) for i in range(draws)]
    tokens = _run(np.broadcast_to(logits, (draws, vocab)), rows)
    expected = _reference_distribution(logits, params)
    observed = np.bincount(tokens, minlength=vocab) / draws
    assert np.all(observed[expected == 0] == 0), "a filtered token was sampled"
    total_variation = 0.5 * np.abs(observed - expected).sum()
    assert total_variation < 0.02, (total_variation, observed, expected)


@pytest.mark.parametrize(
    ("top_k", "top_p"),
    [(5, 1.0), (1, 1.0), (40, 0.3), (256, 0.97), (200, 0.5)],
    ids=["k5", "k1", "k40-p0.3", "k256-p0.97", "k200-p0.5"],
)
def test_small_top_k_cutoff_matches_a_full_sort(top_k: int, top_p: float) -> None:
    rng = np.random.default_rng(5)
    rows, vocab = 4, 1000
    scaled = (rng.standard_normal((rows, vocab)) * np.array([[0.5], [1.0], [2.0], [4.0]])).astype(np.float32)
    scaled[1, 500:503] = scaled[1].max() + 1.0  # ties at the top
    weights = np.exp(scaled - scaled.max(-1, keepdims=True))
    probs = weights / weights.sum(-1, keepdims=True)
    active = np.array([True, True, True, False])
    got = np.asarray(
        _cutoff(
            jnp.asarray(scaled),
            jnp.asarray(probs),
            jnp.full(rows, top_k, jnp.int32),
            jnp.full(rows, top_p, jnp.float32),
            jnp.asarray(active),
        )
    )
    assert np.isneginf(got[3])
    for r in np.flatnonzero(active):
        order = np.argsort(-scaled[r], kind="stable")
        sorted_probs = probs[r][order].astype(np.float64)
        mass_before = np.cumsum(sorted_probs) - sorted_probs
        expected_count = int(np.sum((mass_before <= top_p) & (np.arange(vocab) < top_k)))
        expected = scaled[r][order][expected_count - 1]  # tokens tied with it are kept too
        if got[r] != expected:
            # Only float32 rounding of the running mass may move the boundary: every token it
            # moved across has (float64) mass before it within 1e-5 of top_p.
            got_count = int((scaled[r] >= got[r]).sum())
            low, high = sorted((got_count, expected_count))
            assert np.all(np.abs(mass_before[low:high] - top_p) < 1e-5), (r, got_count, expected_count)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, top_p=0.97),
        SamplingParams(temperature=1.0, top_p=0.3),
        SamplingParams(temperature=0.8, top_k=400),
        SamplingParams(temperature=1.0, top_k=350, top_p=0.9, min_p=0.05),
    ],
    ids=["p0.97", "p0.3", "k400", "k350-p0.9-minp"],
)
def test_deep_filters_sample_the_exact_distribution(params: SamplingParams) -> None:
    """Filters reaching beyond TOP_CANDIDATES (rejection path) on a flat 1000-token vocabulary:
    never a token outside the filtered set, and frequencies by rank decile match."""
    rng = np.random.default_rng(10)
    vocab, draws = 1000, 20000
    assert vocab > TOP_CANDIDATES
    logits = rng.standard_normal(vocab).astype(np.float32)
    rows = [SamplingRow(params, seed=11, output_index=i, penalty_slot=0) for i in range(draws)]
    tokens = _run(np.broadcast_to(logits, (draws, vocab)), rows)
    expected = _reference_distribution(logits, params)
    assert np.count_nonzero(expected) > TOP_CANDIDATES or params.top_p < 0.5
    outside = np.flatnonzero(expected == 0)
    assert not np.isin(tokens, outside).any(), "a filtered token was sampled"
    deciles = np.argsort(np.argsort(-logits)) * 10 // vocab  # rank decile of each token
    observed = np.bincount(deciles[tokens], minlength=10) / draws
    expected_by_decile = np.bincount(deciles, weights=expected, minlength=10)
    total_variation = 0.5 * np.abs(observed - expected_by_decile).sum()
    assert total_variation < 0.02, (total_variation, observed, expected_by_decile)


def _numpy_penalties(logits, counts, prompt_seen, freq, pres, rep):
    seen = prompt_seen | (counts > 0)
    out = np.where(seen, np.where(logits > 0, logits / rep[:, None], logits * rep[:, None]), logits)
    return out - counts * freq[:, None] - (counts > 0) * pres[:, None]


def test_penalties_follow_their_definitions() -> None:
    rng = np.random.default_rng(7)
    rows, vocab = 5, 30
    logits = rng.standard_normal((rows, vocab)).astype(np.float32) * 2
    counts = rng.integers(0, 3, (rows, vocab)).astype(np.int32) * (rng.random((rows, vocab)) < 0.3)
    prompt_seen = rng.random((rows, vocab)) < 0.2
    freq = np.array([0.0, 0.5, -1.0, 0.0, 2.0], np.float32)
    pres = np.array([0.0, 0.0, 0.7, -2.0, 1.0], np.float32)
    rep = np.array([1.0, 1.3, 1.0, 0.5, 2.0], np.float32)
    got = np.asarray(apply_penalties(*map(jnp.asarray, (logits, counts, prompt_seen, freq, pres, rep))))
    expected = _numpy_penalties(logits, counts, prompt_seen, freq, pres, rep)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    assert np.array_equal(got[0], logits[0])  # neutral values leave the row bit-identical


def test_penalty_tables_drive_sampling() -> None:
    """Counts come from update_output_counts, prompts from reset_penalty_rows, and greedy
    rows take the argmax of the penalised logits."""
    rng = np.random.default_rng(8)
    vocab, table_rows = 24, 6
    counts, mask = _tables(table_rows, vocab)
    counts = counts.at[3].set(9)  # stale state from a previous request
    prompts = np.array([[1, 2, 2, -1], [5, -1, -1, -1], [7, 7, 7, 7]], np.int32)
    counts, mask = reset_penalty_rows(counts, mask, jnp.array([3, 4, -1], jnp.int32), jnp.asarray(prompts))
    assert int(counts[3].sum()) == 0
    assert np.flatnonzero(np.asarray(mask[3])).tolist() == [1, 2]
    assert np.flatnonzero(np.asarray(mask[4])).tolist() == [5]
    assert not np.asarray(mask[5]).any() and not np.asarray(mask[0]).any()  # padding slot -1 touches nothing
    history = [(3, 10), (3, 10), (4, 11), (3, 12)]
    for slot, token in history:
        slots, tokens = jnp.array([slot, 0], jnp.int32), jnp.array([token, 13], jnp.int32)
        counts = update_output_counts(counts, slots, tokens, jnp.array([True, False]))
    assert np.asarray(counts)[3, [10, 12]].tolist() == [2, 1] and int(counts[4, 11]) == 1
    assert int(counts.sum()) == 4  # the invalid row added nothing

    logits = rng.standard_normal((2, vocab)).astype(np.float32)
    logits[:, [1, 2, 5, 10, 11, 12]] += 3.0
    params = [
        SamplingParams(temperature=0, frequency_penalty=1.5, presence_penalty=0.5, repetition_penalty=1.8),
        SamplingParams(temperature=0, repetition_penalty=2.0),
    ]
    rows = [SamplingRow(p, 0, 4, slot) for p, slot in zip(params, [3, 4], strict=True)]
    batch = make_sampling_batch(rows, 2)
    out = _sample(jnp.asarray(logits), batch, counts, mask)
    table = np.asarray(counts)[[3, 4]]
    seen = np.asarray(mask)[[3, 4]]
    penalised = _numpy_penalties(
        logits, table, seen, batch.frequency_penalty, batch.presence_penalty, batch.repetition_penalty
    )
    np.testing.assert_array_equal(np.asarray(out.tokens), np.argmax(penalised, axis=-1))


def test_suppressed_ids_are_never_sampled() -> None:
    vocab, draws = 12, 4000
    logits = np.zeros((draws, vocab), np.float32)
    logits[:, 0] = 6.0  # EOS dominates
    logits[:, 3] = 5.0  # a stop token id
    params = SamplingParams(temperature=1.0, min_new_tokens=5, stop_token_ids=[3])
    rows = [
        SamplingRow(params, seed=3, output_index=i % 5, penalty_slot=0, eos_ids=[0]) for i in range(draws)
    ]
    rows += [SamplingRow(SamplingParams(temperature=0, min_new_tokens=2, stop_token_ids=[3]), 0, 0, 0, [0])]
    logits = np.concatenate([logits, logits[:1]])
    tokens = _run(logits, rows)
    assert not np.isin(tokens, [0, 3]).any()
    after = _run(logits[:1], [SamplingRow(params, seed=3, output_index=5, penalty_slot=0, eos_ids=[0])])
    assert after[0] in (0, 3)  # once min_new_tokens is reached EOS is allowed again (and likely)


def test_plain_greedy_batches_need_no_branch_and_sample_the_same() -> None:
    """The GPU sampler for all-greedy batches without penalties: no `cond` a GPU would wait on,
    and the same tokens and chosen logprobs as the general program."""
    rng = np.random.default_rng(11)
    vocab = 96
    logits = jnp.asarray(rng.standard_normal((8, vocab)).astype(np.float32))
    ban = SamplingParams(temperature=0, min_new_tokens=3, stop_token_ids=[int(np.argmax(logits[1]))])
    rows = [
        SamplingRow(SamplingParams(temperature=0), 1, 0, 1),
        SamplingRow(ban, 2, 0, 2, eos_ids=[int(np.argmax(logits[1]))]),
        SamplingRow(SamplingParams(temperature=0.8, top_k=1), 3, 0, 3),
    ]
    batch = make_sampling_batch(rows, 8)
    assert is_plain_greedy(batch)
    counts, mask = _tables(8, vocab)
    plain = jax.jit(sample, static_argnames="plain")
    general, fast = plain(logits, batch, counts, mask), plain(logits, batch, counts, mask, plain=True)
    np.testing.assert_array_equal(np.asarray(fast.tokens), np.asarray(general.tokens))
    np.testing.assert_array_equal(np.asarray(fast.chosen_logprob), np.asarray(general.chosen_logprob))
    assert int(fast.tokens[1]) != int(np.argmax(logits[1]))  # the banned id stays banned
    primitives = lambda **kw: {
        eqn.primitive.name
        for eqn in jax.make_jaxpr(lambda *a: sample(*a, **kw))(logits, batch, counts, mask).eqns
    }
    assert "cond" in primitives() and not {"cond", "while"} & primitives(plain=True)
    for params in (SamplingParams(temperature=0.7), SamplingParams(temperature=0, repetition_penalty=1.2)):
        assert not is_plain_greedy(make_sampling_batch([*rows, SamplingRow(params, 4, 0, 4)], 8))


def test_greedy_path_timing() -> None:
    """Cost of a greedy-only [32, 49152] batch next to a bare argmax (printed, not asserted)."""
    rows, vocab = 32, 49152
    logits = jnp.asarray(np.random.default_rng(9).standard_normal((rows, vocab)).astype(np.float32))
    counts, mask = _tables(rows + 1, vocab)

    def tokens_only(logits: jax.Array, batch: SamplingBatch, counts: jax.Array, mask: jax.Array) -> jax.Array:
        return sample(logits, batch, counts, mask).tokens

    def timed(fn, *args) -> float:
        jax.block_until_ready(fn(*args))
        start = time.perf_counter()
        for _ in range(10):
            out = fn(*args)
        jax.block_until_ready(out)
        return (time.perf_counter() - start) / 10 * 1e3

    def batch_of(params: SamplingParams) -> SamplingBatch:
        return jax.device_put(
            make_sampling_batch([SamplingRow(params, i, 0, i + 1) for i in range(rows)], rows)
        )

    greedy = batch_of(SamplingParams(temperature=0))
    sampled = batch_of(SamplingParams(top_p=0.95))
    argmax_ms = timed(jax.jit(lambda x: jnp.argmax(x, axis=-1)), logits)
    greedy_ms = timed(jax.jit(tokens_only), logits, greedy, counts, mask)
    full_ms = timed(_sample, logits, greedy, counts, mask)
    sampled_ms = timed(jax.jit(tokens_only), logits, sampled, counts, mask)
    print(
        f"\n[32, 49152]: jnp.argmax {argmax_ms:.2f} ms; greedy tokens {greedy_ms:.2f} ms; "
        f"greedy with logprobs {full_ms:.2f} ms; top_p=0.95 {sampled_ms:.2f} ms"
    )
