"""Batched on-device sampling (the request-side record is `runtime/sampling_params.py`).

`sample` is the device side: one row per sequence of a padded batch, every
per-request knob an array (never a static argument), so one compiled program
serves every mix of greedy and sampled requests. The costly parts only run
when some row needs them (`lax.cond` on a runtime predicate): on a 2-core CPU
a full sort of [32, 49152] logits costs ~250 ms, so nothing sorts: a small
top-k is cut with `lax.top_k`, and top-p (or a deep top-k) samples by rejection,
exactly and in a few passes. A row's random draws come from
`fold_in(request_key, output_index)`, so its token does not depend on its
batch neighbours or on the step it runs in. A GPU waits on the host for every
`lax.cond`, so there all-greedy steps without penalties take a variant with no
branch (`plain`, decided on the host by `is_plain_greedy`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from runtime.sampling_params import GREEDY_TEMPERATURE, SamplingParams

if TYPE_CHECKING:
    from runtime.grammar import RequestGrammar, TokenGrammars

# top-k up to this many is cut exactly with `lax.top_k`; deeper filters sample by rejection.
TOP_CANDIDATES = 256
# Bound on rejection rounds of one token (each keeps at least top_p of the remaining odds).
_MAX_DRAWS = 64
# Tokens per block of the two-level inverse-CDF draw.
_DRAW_BLOCK = 256
# Smallest suppressed-id width, so typical batches share one shape.
MIN_SUPPRESSED_WIDTH = 4
# repetition_penalty 0 would divide by zero; its limit is reached with a tiny positive value.
_MIN_REPETITION_PENALTY = 1e-6
_PRNG_IMPL = "threefry2x32"


# ----------------------------------------------------------------------------- device batch


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingBatch:
    """Per-row sampling knobs of one step, S rows (padded rows: temperature 0, ignored).

    Numpy on the host (`make_sampling_batch`), device arrays inside the step.
    """

    temperature: Any  # f32[S]
    top_p: Any  # f32[S]
    top_k: Any  # i32[S]; 0 or >= V: off
    min_p: Any  # f32[S]
    frequency_penalty: Any  # f32[S]
    presence_penalty: Any  # f32[S]
    repetition_penalty: Any  # f32[S]
    seeds: Any  # u32[S, 2]: raw threefry key data of each request
    output_index: Any  # i32[S]: index of the token being sampled in its request's output
    suppressed_ids: Any  # i32[S, K]: ids banned this step, -1 padding
    penalty_slot: Any  # i32[S]: row of the penalty tables


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SampleOutput:
    """What `sample` returns, all device arrays."""

    tokens: jax.Array  # i32[S]
    chosen_logprob: jax.Array  # f32[S]: log-softmax of the raw logits at tokens


@dataclasses.dataclass
class SamplingRow:
    """What the host knows about one row to sample."""

    params: SamplingParams
    seed: int
    output_index: int
    penalty_slot: int
    eos_ids: Sequence[int] = ()
    grammar: RequestGrammar | None = None


def seeds_to_key_data(seeds: Sequence[int]) -> np.ndarray:
    """uint32[N, 2] key data, row i equal to `jax.random.key_data(jax.random.PRNGKey(seeds[i]))`.

    Exact for 0 <= seed < 2**32; other seeds use their 64-bit two's complement
    (JAX's own result with x64 on), so seeds differing above bit 32 stay distinct.
    """
    values = np.array([int(seed) & 0xFFFF_FFFF_FFFF_FFFF for seed in seeds], np.uint64).reshape(-1)
    return np.stack([values >> np.uint64(32), values & np.uint64(0xFFFF_FFFF)], axis=1).astype(np.uint32)


def suppressed_ids_of(row: SamplingRow) -> list[int]:
    """EOS and stop_token_ids, banned while min_new_tokens is not reached yet.

    Also with ignore_eos, where they would not end the request: the reference's
    min-new-tokens penalizer bans them whatever ignore_eos says, and the sampled
    distribution should be the same. Not once a grammar allows nothing but EOS: the grammar wins.
    """
    params = row.params
    if row.output_index >= params.min_new_tokens or (row.grammar is not None and row.grammar.complete):
        return []
    return list(dict.fromkeys([*row.eos_ids, *params.stop_token_ids]))


def make_sampling_batch(rows: Sequence[SamplingRow], pad_to: int) -> SamplingBatch:
    """Numpy `SamplingBatch` of `pad_to` rows; K is a power of two >= MIN_SUPPRESSED_WIDTH.

    Built a column at a time: the serving loop builds one per step, at up to hundreds of rows.
    """
    if pad_to < len(rows):
        raise ValueError(f"{len(rows)} rows do not fit in pad_to={pad_to}")
    banned = [suppressed_ids_of(row) for row in rows]
    width = max([MIN_SUPPRESSED_WIDTH, *(len(ids) for ids in banned)])
    width = 1 << (width - 1).bit_length()
    params = [row.params for row in rows]
    pad = pad_to - len(rows)

    def column(values: list, fill: float, dtype: type) -> np.ndarray:
        return np.array(values + [fill] * pad, dtype)

    suppressed = np.full((pad_to, width), -1, np.int32)
    for i, ids in enumerate(banned):
        suppressed[i, : len(ids)] = ids
    int32_max = np.iinfo(np.int32).max
    return SamplingBatch(
        temperature=column([p.temperature for p in params], 0.0, np.float32),
        top_p=column([p.top_p for p in params], 1.0, np.float32),
        top_k=column([min(max(p.top_k, 0), int32_max) for p in params], 0, np.int32),
        min_p=column([p.min_p for p in params], 0.0, np.float32),
        frequency_penalty=column([p.frequency_penalty for p in params], 0.0, np.float32),
        presence_penalty=column([p.presence_penalty for p in params], 0.0, np.float32),
        repetition_penalty=column([p.repetition_penalty for p in params], 1.0, np.float32),
        seeds=seeds_to_key_data([row.seed for row in rows] + [0] * pad),
        output_index=column([row.output_index for row in rows], 0, np.int32),
        suppressed_ids=suppressed,
        penalty_slot=column([row.penalty_slot for row in rows], 0, np.int32),
    )


def grammar_masks(
    rows: Sequence[SamplingRow], pad_to: int, grammars: TokenGrammars | None
) -> np.ndarray | None:
    """int32 [pad_to, W] mask words of a step whose rows include one with a grammar, else None:
    bit t % 32 of word t // 32 set where token t may come next (runtime/grammar.py), every bit
    set in the other rows. `grammars` must be given when a row has a grammar."""
    constrained = [(row.grammar, i) for i, row in enumerate(rows) if row.grammar is not None]
    if not constrained:
        return None
    assert grammars is not None, "rows with a grammar need the engine's grammars for their masks"
    words = np.full((pad_to, grammars.mask_words), -1, np.int32)
    grammars.fill_masks(constrained, words)
    return words


# ----------------------------------------------------------------------------- device functions


def apply_penalties(
    logits: jax.Array,
    output_counts: jax.Array,
    seen_in_prompt: jax.Array,
    frequency_penalty: jax.Array,
    presence_penalty: jax.Array,
    repetition_penalty: jax.Array,
) -> jax.Array:
    """Penalised logits f32[S, V] from each row's output counts i32[S, V] and prompt mask bool[S, V].

    repetition (HF): tokens seen in prompt or output have positive logits divided
    by r and negative ones multiplied by r; then frequency / presence (OpenAI):
    subtract count * f and (count > 0) * p, counting output tokens only. Neutral
    values (0, 0, 1) leave a row bit-identical.
    """
    r = jnp.maximum(repetition_penalty, _MIN_REPETITION_PENALTY)[:, None]
    seen_in_output = output_counts > 0
    repeated = jnp.where(logits > 0, logits / r, logits * r)
    logits = jnp.where(seen_in_prompt | seen_in_output, repeated, logits)
    counts = output_counts.astype(jnp.float32)
    return (
        logits
        - counts * frequency_penalty[:, None]
        - seen_in_output.astype(jnp.float32) * presence_penalty[:, None]
    )


# `_first_argmax` takes the max of each run of this many ids first.
ARGMAX_CHUNK = 256


def _first_index_of(x: jax.Array, value: jax.Array) -> jax.Array:
    """The lowest index along the last axis where `x` equals `value` (its last axis is 1);
    the axis length if none does."""
    size = x.shape[-1]
    ids = jnp.arange(size, dtype=jnp.int32)
    return jnp.min(jnp.where(x == value, ids, size), axis=-1).astype(jnp.int32)


def _first_argmax(x: jax.Array) -> jax.Array:
    """argmax over the last axis of `[S, V]`, lowest index on ties (as torch.argmax).

    In two stages: the max of each run of ARGMAX_CHUNK ids, then the first run holding the
    row's max and the first id inside it. Plain reductions (jnp.argmax's variadic reduce is
    ~4x slower on a CPU), and no whole-row max compared with every id: XLA's CPU backend
    writes that max's broadcast out as a second `[S, V]` array, slowly (on the 2-core box,
    64 rows of 49152 after the suppressed ids are set: 12.8 ms that way, 0.6 ms in runs).
    """
    rows, vocab = x.shape
    whole = vocab - vocab % ARGMAX_CHUNK
    tail = x[:, whole:]
    if whole == 0:
        return _first_index_of(tail, jnp.max(tail, axis=-1, keepdims=True))
    runs = x[:, :whole].reshape(rows, whole // ARGMAX_CHUNK, ARGMAX_CHUNK)
    peaks = jnp.max(runs, axis=-1)
    best = jnp.max(peaks, axis=-1, keepdims=True)
    run = jnp.minimum(_first_index_of(peaks, best), peaks.shape[-1] - 1)
    inside = jnp.take_along_axis(runs, run[:, None, None], axis=1)[:, 0]
    token = run * ARGMAX_CHUNK + _first_index_of(inside, best)
    if whole < vocab:  # the ids after the last whole run win only when strictly greater
        tail_best = jnp.max(tail, axis=-1, keepdims=True)
        token = jnp.where(tail_best[:, 0] > best[:, 0], whole + _first_index_of(tail, tail_best), token)
    return token


def _log_softmax_parts(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each row's max `[S, 1]` and the log of `sum(exp(logits - max))` `[S, 1]`: with them,
    `(logits - max) - log_sum` is jax.nn.log_softmax, computed the same way. `logits - max` is
    not kept: XLA's CPU backend writes it out as a second `[S, V]` array, slowly."""
    peak = jnp.max(logits, axis=-1, keepdims=True)
    return peak, jnp.log(jnp.sum(jnp.exp(logits - peak), axis=-1, keepdims=True))


def chosen_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """`log_softmax(logits)[row, token]` per row, without writing the whole `[S, V]` table
    (`full_logprobs` makes it when a request asks)."""
    peak, log_sum = _log_softmax_parts(logits)
    return ((jnp.take_along_axis(logits, tokens[:, None], axis=-1) - peak) - log_sum)[:, 0]


def full_logprobs(logits: jax.Array) -> jax.Array:
    """The log-softmax of raw logits `[S, V]`, for top logprobs and token_ids_logprob."""
    logits = logits.astype(jnp.float32)
    peak, log_sum = _log_softmax_parts(logits)
    return (logits - peak) - log_sum


def _small_top_k_cutoff(
    scaled: jax.Array, probs: jax.Array, top_k: jax.Array, top_p: jax.Array, rows: jax.Array
) -> jax.Array:
    """Least logit kept by top-k (k <= TOP_CANDIDATES) and top-p together, -inf outside `rows`.

    Both filters act on the same distribution (the reference's joint order): ranked by
    probability, a token is dropped when its rank is >= k or the mass before it exceeds
    top_p. Both keep a prefix, and with k small the prefix lies among the k best, so
    `lax.top_k` gives the exact cutoff without a full sort. Ties at the cutoff are all kept.
    """
    num = min(TOP_CANDIDATES, scaled.shape[-1])
    best, best_ids = jax.lax.top_k(scaled, num)
    best_probs = jnp.take_along_axis(probs, best_ids, axis=-1)
    mass_before = jnp.cumsum(best_probs, axis=-1) - best_probs
    count_p = jnp.sum(mass_before <= top_p[:, None], axis=-1, dtype=jnp.int32)
    keep = jnp.clip(jnp.minimum(count_p, top_k), 1, num)
    cutoff = jnp.take_along_axis(best, (keep - 1)[:, None], axis=-1)[:, 0]
    return jnp.where(rows, cutoff, -jnp.inf)


def _row_keys(seeds: jax.Array, output_index: jax.Array) -> jax.Array:
    """Each row's key for this token: fold_in(request key, output index)."""

    def key_of(seed: jax.Array, index: jax.Array) -> jax.Array:
        return jax.random.fold_in(jax.random.wrap_key_data(seed, impl=_PRNG_IMPL), index)

    return jax.vmap(key_of)(seeds, output_index)


def _uniforms(keys: jax.Array, attempt: jax.Array | int) -> jax.Array:
    """One uniform in [0, 1) per row for draw number `attempt` of this token."""
    return jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, attempt), (), jnp.float32))(keys)


def _draw(weights: jax.Array, uniforms: jax.Array) -> jax.Array:
    """Inverse-CDF draw from unnormalised weights f32[S, V], in two levels (block masses, then
    one block) so no V-long prefix sum is needed."""
    rows, vocab = weights.shape
    blocks = -(-vocab // _DRAW_BLOCK)
    padded = jnp.pad(weights, ((0, 0), (0, blocks * _DRAW_BLOCK - vocab)))
    padded = padded.reshape(rows, blocks, _DRAW_BLOCK)
    block_cdf = jnp.cumsum(jnp.sum(padded, axis=-1), axis=-1)
    target = uniforms * block_cdf[:, -1]
    block = jnp.minimum(jnp.sum(block_cdf <= target[:, None], axis=-1, dtype=jnp.int32), blocks - 1)
    previous = jnp.take_along_axis(block_cdf, jnp.maximum(block - 1, 0)[:, None], axis=-1)[:, 0]
    before = jnp.where(block > 0, previous, 0.0)
    inner = jnp.take_along_axis(padded, block[:, None, None], axis=1)[:, 0]
    inner_cdf = jnp.cumsum(inner, axis=-1)
    # Clamped at 0 so leading zero-weight tokens of the block are skipped, never chosen.
    residual = jnp.maximum(target - before, 0.0)
    offset = jnp.sum(inner_cdf <= residual[:, None], axis=-1, dtype=jnp.int32)
    return block * _DRAW_BLOCK + jnp.minimum(offset, _DRAW_BLOCK - 1)


def _sample_rows(
    logits: jax.Array, batch: SamplingBatch, greedy: jax.Array, greedy_tokens: jax.Array
) -> jax.Array:
    """Tokens of the non-greedy rows (greedy rows keep `greedy_tokens`).

    Small top-k cutoffs come from `_small_top_k_cutoff`. A top-p (or a top-k beyond
    TOP_CANDIDATES) can reach thousands of tokens deep (SmolLM2 at temperature 1,
    top_p 0.95: 14% of steps need more than 256), where only a full sort finds the cutoff.
    Those rows use rejection instead (as FlashInfer does): draw from the current support;
    a token is in the filtered set iff fewer than k tokens and at most top_p of the mass
    lie strictly above it; if it is not, neither is anything at or below it, so the
    support shrinks to the tokens above it and the row draws again. Accepted tokens follow
    the filtered distribution exactly; each draw is accepted with probability >= top_p
    and a rejection removes half the remaining mass on average, so few rounds run.
    """
    vocab = logits.shape[-1]
    temperature = jnp.where(greedy, 1.0, jnp.maximum(batch.temperature, GREEDY_TEMPERATURE))
    scaled = logits / temperature[:, None]
    row_max = jnp.max(scaled, axis=-1, keepdims=True)
    weights = jnp.exp(scaled - row_max)
    probs = weights / jnp.sum(weights, axis=-1, keepdims=True)
    k_on = ~greedy & (batch.top_k > 0) & (batch.top_k < vocab)
    p_on = ~greedy & (batch.top_p < 1.0)
    k_eff = jnp.where(k_on, batch.top_k, vocab + 1)
    p_eff = jnp.where(p_on, batch.top_p, 2.0)
    small_k = k_on & (batch.top_k <= TOP_CANDIDATES)
    cutoff = jax.lax.cond(
        jnp.any(small_k),
        lambda: _small_top_k_cutoff(scaled, probs, k_eff, p_eff, small_k),
        lambda: jnp.full(logits.shape[:1], -jnp.inf, jnp.float32),
    )
    # min-p keeps probs >= min_p * max prob, i.e. scaled >= max + log(min_p); the max always survives.
    cutoff = jnp.maximum(cutoff, row_max[:, 0] + jnp.log(batch.min_p))
    weights = jnp.where(scaled >= cutoff[:, None], weights, 0.0)
    keys = _row_keys(batch.seeds, batch.output_index)
    checked = (k_on | p_on) & ~small_k

    def accepted(tokens: jax.Array) -> jax.Array:
        value = jnp.take_along_axis(scaled, tokens[:, None], axis=-1)
        above = scaled > value
        count = jnp.sum(above, axis=-1, dtype=jnp.int32)
        mass = jnp.sum(jnp.where(above, probs, 0.0), axis=-1)
        return ~checked | ((count < k_eff) & (mass <= p_eff))

    def retry(state: tuple[jax.Array, jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, ...]:
        attempt, tokens, done, floor = state
        floor = jnp.where(done, floor, jnp.take_along_axis(scaled, tokens[:, None], axis=-1)[:, 0])
        attempt = attempt + 1
        drawn = _draw(jnp.where(scaled > floor[:, None], weights, 0.0), _uniforms(keys, attempt))
        tokens = jnp.where(done, tokens, drawn)
        return attempt, tokens, done | accepted(tokens), floor

    def retrying(state: tuple[jax.Array, jax.Array, jax.Array, jax.Array]) -> jax.Array:
        attempt, _, done, _ = state
        return (attempt < _MAX_DRAWS - 1) & ~jnp.all(done)

    first = _draw(weights, _uniforms(keys, 0))
    state = (jnp.int32(0), first, accepted(first), jnp.full(logits.shape[:1], -jnp.inf, jnp.float32))
    _, drawn, done, _ = jax.lax.while_loop(retrying, retry, state)
    # Rounding in the prefix sums can land on a zero-weight token (odds ~1e-7), and a row may
    # exhaust its draws (odds ~2**-50): both take the argmax, which every filter keeps.
    drawn_weight = jnp.take_along_axis(weights, drawn[:, None], axis=-1)[:, 0]
    drawn = jnp.where(done & (drawn_weight > 0), drawn, greedy_tokens)
    return jnp.where(greedy, greedy_tokens, drawn)


def _penalised_rows(batch: SamplingBatch) -> Any:
    """bool[S]: rows with a frequency, presence or repetition penalty (numpy or jax arrays)."""
    return (
        (batch.frequency_penalty != 0.0) | (batch.presence_penalty != 0.0) | (batch.repetition_penalty != 1.0)
    )


def _greedy_rows(batch: SamplingBatch) -> Any:
    """bool[S]: rows that take the argmax (numpy or jax arrays)."""
    return (batch.temperature < GREEDY_TEMPERATURE) | (batch.top_k == 1)


def is_plain_greedy(batch: SamplingBatch) -> bool:
    """Whether every row of a host batch is greedy without penalties: `sample(..., plain=True)`
    serves it with no branch on the device (a GPU waits on the host for each `lax.cond`)."""
    return bool(np.all(_greedy_rows(batch)) and not np.any(_penalised_rows(batch)))


def sample(
    logits: jax.Array,
    batch: SamplingBatch,
    output_counts: jax.Array,
    prompt_mask: jax.Array,
    plain: bool = False,
    raw: jax.Array | None = None,
) -> SampleOutput:
    """Next tokens of S rows from logits f32[S, V], with penalties from the tables [R, V].

    Order: penalties (only when some row has one), suppressed ids -> -inf, then greedy rows
    (temperature < 1e-6 or top_k == 1) take the argmax and the rest are scaled by temperature,
    filtered by top-k, top-p and min-p, and drawn. The chosen tokens' logprobs come from `raw`
    (default: `logits`), the model's own logits: grammar masks (`mask_disallowed`) come before
    this, and a masked logit stays -inf through the penalties.
    The sampling branch runs only when some row samples. `plain` (static; only for
    batches `is_plain_greedy` accepts) leaves both branches out of the program.
    """
    logits = logits.astype(jnp.float32)
    raw = logits if raw is None else raw.astype(jnp.float32)
    rows, vocab = logits.shape
    if not plain:
        logits = jax.lax.cond(
            jnp.any(_penalised_rows(batch)),
            lambda x: apply_penalties(
                x,
                output_counts[batch.penalty_slot],
                prompt_mask[batch.penalty_slot],
                batch.frequency_penalty,
                batch.presence_penalty,
                batch.repetition_penalty,
            ),
            lambda x: x,
            logits,
        )
    banned = jnp.where(batch.suppressed_ids >= 0, batch.suppressed_ids, vocab)
    logits = logits.at[jnp.arange(rows)[:, None], banned].set(-jnp.inf, mode="drop")
    greedy_tokens = _first_argmax(logits)
    if plain:
        tokens = greedy_tokens
    else:
        greedy = _greedy_rows(batch)
        tokens = jax.lax.cond(
            jnp.all(greedy),
            lambda: greedy_tokens,
            lambda: _sample_rows(logits, batch, greedy, greedy_tokens),
        )
    return SampleOutput(tokens=tokens, chosen_logprob=chosen_logprobs(raw, tokens))


def mask_disallowed(logits: jax.Array, words: jax.Array) -> jax.Array:
    """`logits` [S, V] with the tokens no row's grammar allows at -inf, from mask words i32 [S, W]
    (`grammar_masks`). Its own small program: the samplers, one per row count and compiled by the
    warm-up, then serve steps with and without grammar rows alike (one with the masks inside
    compiled at the first grammar step of each row count: 0.12 s for SmolLM2 on the 2-core box)."""
    return jnp.where(allowed_tokens(words, logits.shape[1]), logits, jnp.array(-jnp.inf, logits.dtype))


def allowed_tokens(words: jax.Array, vocab: int) -> jax.Array:
    """bool [S, vocab] from grammar mask words i32 [S, W] (`grammar_masks`)."""
    bits = (words[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1
    return bits.reshape(words.shape[0], -1)[:, :vocab] != 0


def update_output_counts(
    output_counts: jax.Array, penalty_slot: jax.Array, tokens: jax.Array, valid: jax.Array
) -> jax.Array:
    """Count each valid row's new token in its penalty row (i32[R, V]); invalid rows add nothing."""
    slots = jnp.where(valid, penalty_slot, output_counts.shape[0])
    return output_counts.at[slots, tokens].add(1, mode="drop")


def reset_penalty_rows(
    output_counts: jax.Array, prompt_mask: jax.Array, slots: jax.Array, prompt_ids: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Clear the penalty rows `slots` i32[N] (-1: padding) for new requests and mark their
    prompts i32[N, L] (-1 padded) in the prompt mask, for repetition_penalty."""
    num_rows, vocab = prompt_mask.shape
    rows = jnp.where(slots >= 0, slots, num_rows)
    output_counts = output_counts.at[rows].set(0, mode="drop")
    prompt_mask = prompt_mask.at[rows].set(False, mode="drop")
    ids = jnp.where(prompt_ids >= 0, prompt_ids, vocab)
    prompt_mask = prompt_mask.at[rows[:, None], ids].set(True, mode="drop")
    return output_counts, prompt_mask
