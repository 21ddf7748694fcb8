"""Jit-compiled step functions over bucketed shapes, and the device state they update.

The runner owns what lives on the device between steps: the weights (an
argument of every program, so a same-shaped swap recompiles nothing), the KV
pool and the penalty tables (donated and written in place), the expert
histogram, and the previous step's sampled tokens, which the next step reads
directly so the host can dispatch step N+1 before it has read step N.

A step of a shape with no program yet may run padded to a compiled one while
its own programs compile aside (runtime/step_programs.py).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels_pallas.ragged_paged_attention import AttentionMetadata
from models.tensor_parallel import kv_pool_sharding, place
from runtime.batch import MAX_BORROW_FACTOR, ScheduledBatch, StepShape, sampler_rows
from runtime.kv_pool import KVPool
from runtime.packed_inputs import PackedArrays
from runtime.sampling import (
    MIN_SUPPRESSED_WIDTH,
    SamplingBatch,
    chosen_logprobs,
    full_logprobs,
    is_plain_greedy,
    make_sampling_batch,
    mask_disallowed,
    reset_penalty_rows,
    sample,
    update_output_counts,
)
from runtime.step_programs import StepPrograms

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class StepOutput:
    """Device handles of one step; reading any of them waits for that step alone."""

    next_tokens: jax.Array  # int32[R], R = sampler_rows(S): one per sequence, then padding
    chosen_logprobs: jax.Array  # float32[R]
    logits: jax.Array  # [R, V] raw, in the model's dtype: `ModelRunner.full_logprobs` when asked
    hidden: jax.Array  # [T, H], final-norm hidden states of every token


@dataclasses.dataclass
class DispatchedForward:
    """A step whose forward is dispatched and whose sampling is not yet (device handles)."""

    batch: ScheduledBatch
    logits: jax.Array  # [R, V] (R = sampler_rows(S), padded with zero rows), in the model's dtype
    hidden: jax.Array  # [T, H]
    sampling: PackedArrays  # the SamplingBatch and sample_valid, on the host (`sampling_inputs`)
    plain_greedy: bool  # every row greedy without penalties (`is_plain_greedy`)
    greedy: StepOutput | None = None  # the step's tokens when the forward sampled them (fused greedy)
    compiled_inline: bool = False  # the forward's program compiled for this step


class ModelRunner:
    """Runs `ScheduledBatch`es through one causal model; never decides who runs."""

    def __init__(
        self,
        model: nnx.Module,
        pool: KVPool,
        max_running_requests: int,
        vocab_size: int,
        num_experts: int = 0,
        borrow_programs: bool = True,
        fused_greedy: bool | None = None,
        mesh: jax.sharding.Mesh | None = None,
        compiler_options: dict[str, Any] | None = None,
    ) -> None:
        """`fused_greedy` (None: on where the backend is not a CPU): every forward also samples
        greedily, with no branch, and an all-greedy step without penalties takes those tokens
        and dispatches no sampler. On a GPU, each dispatch costs the serving loop about a
        millisecond of host time (docs/benchmarks.md), and the general sampler's `lax.cond`s
        read their predicates back to the host. Other steps run the general sampler after.

        `mesh`: the devices the model's weights and KV pool are split over (tensor parallelism,
        placed so by the engine); the rest of the device state is whole on each of them.

        `compiler_options`: XLA options every program here compiles with (`ServerArgs`).
        """
        jit = functools.partial(jax.jit, compiler_options=compiler_options)
        self.mesh = mesh
        self.fused_greedy = jax.default_backend() != "cpu" if fused_greedy is None else fused_greedy
        self.graphdef, self.params = nnx.split(model)
        self.pool = pool
        self.vocab_size = vocab_size
        self.penalty_rows = max_running_requests + 1  # row 0 serves padding rows
        self.output_counts = jnp.zeros((self.penalty_rows, vocab_size), jnp.int32)
        self.prompt_mask = jnp.zeros((self.penalty_rows, vocab_size), jnp.bool_)
        self.num_experts = num_experts
        self.num_layers = pool.num_layers
        self.expert_hist = jnp.zeros((self.num_layers, max(num_experts, 1)), jnp.int32)
        self.recording = jnp.zeros((), jnp.int32)
        # The last token sampled for each request slot (row 0: padding), read by the next step's
        # forward for decode rows whose token is still on the device. Fixed shape: a buffer shaped
        # like the previous step would make each program specialise on its predecessor's shape.
        self.slot_tokens = jnp.zeros((self.penalty_rows,), jnp.int32)
        self._commit_state()
        # The pools and the histogram are written in place; with fused greedy sampling, the slot
        # tokens and output counts too.
        donated = (1, 2, 3, 5, 6) if self.fused_greedy else (1, 2, 3)
        self._forward = jit(self._forward_fn, donate_argnums=donated)
        # The device state's shapes, dtypes and placement, which steps and weight swaps keep.
        self._abstract_state = _abstract(self._forward_state())
        self._abstract_sampler_state = _abstract((self.output_counts, self.prompt_mask, self.slot_tokens))
        self._sample = jit(self._sample_fn, donate_argnums=(3, 5), static_argnames=("plain",))
        self._mask_disallowed = jit(mask_disallowed)
        # A step its forward did not sample that is all greedy without penalties takes a sampler with
        # no branch: off a CPU, each `lax.cond`'s predicate is read back to the host; on a CPU it is
        # the cheaper program (2-core box, batch-32 decode 75.3 -> 73.5 ms, batch 64 172.5 -> 164.7).
        # Per row count, sampling inputs with nothing to sample in the usual layout, on the host:
        # a forward takes them when a step's own have another (a wider suppressed-ids table would
        # make the forward compile again).
        self._idle_sampling: dict[int, PackedArrays] = {}
        self._reset_penalties = jit(reset_penalty_rows, donate_argnums=(0, 1))
        self._readout = jit(self._readout_fn, static_argnames=("kind",))
        self._token_logprobs = jit(self._token_logprobs_fn, static_argnames=("whole",))
        self._full_logprobs = jit(lambda logits: self._whole(full_logprobs(logits)))
        # (sampler rows, suppressed-ids width, plain) in _sample's cache
        self._sampler_shapes: set[tuple[int, int, bool]] = set()
        self._background_samplers: dict[tuple[int, int, bool], jax.stages.Compiled] = {}
        self.step_programs = StepPrograms(
            self._compile_shape,
            enabled=borrow_programs,
            compile_companions=lambda shape: self.compile_samplers(shape.decode + shape.prefill_seqs),
            max_borrow_factor=MAX_BORROW_FACTOR if jax.default_backend() == "cpu" else None,
        )

    @property
    def steps_are_cheap(self) -> bool:
        """Off a CPU a step takes milliseconds and a compile seconds, on cores the loop leaves
        spare: a step borrows any larger compiled program, and the warm-up compiles programs that
        hold a burst's steps (`batch.burst_shapes`)."""
        return self.step_programs.max_borrow_factor is None

    def _commit_state(self) -> None:
        """Place all device state explicitly: a step's outputs are committed, and a jit cache
        entry compiled for uncommitted inputs would not serve them (one wasted compile per shape)."""
        if self.mesh is not None:  # the weights and pools are split already (the engine's doing)
            whole = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
            for name in ("output_counts", "prompt_mask", "expert_hist", "recording", "slot_tokens"):
                setattr(self, name, jax.device_put(getattr(self, name), whole))
            return
        device = self.pool.k_pool.devices().pop()
        self.pool.k_pool, self.pool.v_pool = jax.device_put((self.pool.k_pool, self.pool.v_pool), device)
        for name in ("params", "output_counts", "prompt_mask", "expert_hist", "recording", "slot_tokens"):
            setattr(self, name, jax.device_put(getattr(self, name), device))

    # -- the step -------------------------------------------------------------------------

    def _forward_state(self) -> tuple:
        """The device state a step reads: `_forward_fn`'s first seven."""
        return (
            self.params,
            self.pool.k_pool,
            self.pool.v_pool,
            self.expert_hist,
            self.recording,
            self.slot_tokens,
            self.output_counts,
        )

    def _forward_fn(
        self, params, k_pool, v_pool, expert_hist, recording, slot_tokens, output_counts, inputs, sampling
    ):
        """The model over the flat batch, and the logits of each sequence's last token; with fused
        greedy sampling also `_sample_and_record`'s outputs, which touch the device state only
        where the inputs' `greedy` flag is set."""
        model = nnx.merge(self.graphdef, params)
        host = inputs.unpack()
        meta = AttentionMetadata(
            cu_q_lens=host["cu_q_lens"],
            kv_lens=host["kv_lens"],
            page_table=host["page_table"],
            write_slots=host["write_slots"],
            num_tokens=host["num_tokens"],
            **inputs.static,
        )
        source = host["token_source"]
        input_ids = jnp.where(source >= 0, slot_tokens[jnp.maximum(source, 0)], host["input_ids"])
        hidden, k_pool, v_pool, expert_counts = model(input_ids, host["positions"], k_pool, v_pool, meta)
        seqs = host["sample_rows"].shape[0]
        if getattr(type(model), "kind", "causal_lm") == "causal_lm":
            logits = model.compute_logits(hidden[host["sample_rows"]])
            logits = jnp.pad(logits, ((0, sampler_rows(seqs) - seqs), (0, 0)))  # padding rows, not sampled
        else:  # reward / classifier heads pool instead of sampling; the sampler gets dummy rows
            logits = jnp.zeros((sampler_rows(seqs), self.vocab_size), jnp.float32)
        if expert_counts is not None:
            expert_hist = expert_hist + expert_counts * recording
        logits, hidden, expert_hist = self._whole((logits, hidden, expert_hist))
        k_pool, v_pool = self._placed((k_pool, v_pool), kv_pool_sharding)
        if not self.fused_greedy:
            return logits, hidden, k_pool, v_pool, expert_hist
        greedy = _sample_and_record(
            logits, sampling, output_counts, None, slot_tokens, plain=True, apply=host["greedy"] != 0
        )
        return logits, hidden, k_pool, v_pool, expert_hist, self._whole(greedy)

    def _whole(self, tree: Any) -> Any:
        """Inside a program: under tensor parallelism, `tree`'s arrays whole on every device.

        A step's outputs keep the placement of the state they replace, so that every program,
        those compiled aside from shapes alone included, meets the placement it was compiled
        for: left to XLA, a split LM head's logits come out split by vocabulary, and a sampler
        compiled for whole logits refuses them. What the host reads is whole too: over several
        hosts (`--nnodes`) a host reads only its own devices."""
        return self._placed(tree, lambda mesh: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

    def _placed(self, tree: Any, sharding_on: Callable[[jax.sharding.Mesh], Any]) -> Any:
        """Inside a program: under tensor parallelism, `tree`'s arrays placed as `sharding_on(mesh)`
        says (the KV pools split by KV head, as they came in: `kv_pool_sharding`)."""
        if self.mesh is None:
            return tree
        sharding = sharding_on(self.mesh)
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), tree)

    def _sample_fn(self, logits, raw, inputs, output_counts, prompt_mask, slot_tokens, plain=False):
        """The sampler is its own program: it depends on the row count only, so few compile. It
        draws from `logits` (a grammar step's masked ones) and scores the draws by `raw`."""
        return self._whole(
            _sample_and_record(logits, inputs, output_counts, prompt_mask, slot_tokens, plain, raw=raw)
        )

    # -- programs compiled aside (runtime/step_programs.py) -----------------------------------

    def _compile_shape(self, shape: StepShape) -> jax.stages.Compiled:
        """The forward for `shape`, and the samplers for its row count if none is compiled yet."""
        forward = self._compile_forward(shape)
        self.compile_samplers(shape.decode + shape.prefill_seqs)
        return forward

    def compile_programs(self, shapes: list[StepShape]) -> None:
        """Compile the forwards of `shapes` and the samplers of their row counts from shapes alone
        (the warm-up: no step runs); steps of these shapes then run these programs."""
        for shape in shapes:
            self.step_programs.add(shape, self._compile_forward(shape))
        for seqs in sorted({shape.decode + shape.prefill_seqs for shape in shapes}):
            self.compile_samplers(seqs)

    def _compile_forward(self, shape: StepShape) -> jax.stages.Compiled:
        """The forward for `shape` from shapes alone: lowering needs no values, so this runs beside
        the steps."""
        seqs = shape.decode + shape.prefill_seqs
        ints = lambda *dims: np.zeros(dims, np.int32)
        inputs = forward_inputs(
            input_ids=ints(shape.tokens),
            token_source=ints(shape.tokens),
            positions=ints(shape.tokens),
            sample_rows=ints(seqs),
            cu_q_lens=ints(seqs + 1),
            kv_lens=ints(seqs),
            page_table=ints(seqs, shape.width),
            write_slots=ints(shape.tokens),
            num_tokens=np.int32(0),
            greedy=np.int32(0),
            num_decode_seqs=shape.decode,
            max_prefill_q_len=shape.max_q,
        )
        sampling = jax.tree.map(_shape_of, self._idle_sampling_for(sampler_rows(seqs)))  # the usual layout
        return self._forward.lower(*self._abstract_state, jax.tree.map(_shape_of, inputs), sampling).compile()

    def compile_samplers(self, seqs: int) -> None:
        """Compile aside the sampler programs a step of `seqs` sequences may take (`sampler_rows`),
        where none is compiled yet: the general one, and the branch-free one unless the forward
        samples greedily itself. (Fused, greedy steps never run the general sampler, so a first
        sampled request would otherwise compile it inline.)"""
        rows = sampler_rows(seqs)
        sampling = jax.tree.map(_shape_of, self._idle_sampling_for(rows))  # the usual layout
        logits = jax.ShapeDtypeStruct((rows, self.vocab_size), jnp.float32)
        for plain in (False,) if self.fused_greedy else (True, False):
            key = (rows, MIN_SUPPRESSED_WIDTH, plain)
            if key not in self._sampler_shapes and key not in self._background_samplers:
                self._background_samplers[key] = self._sample.lower(
                    logits,
                    logits,
                    sampling,
                    *self._abstract_sampler_state,
                    plain=plain,  # counts, mask, slots
                ).compile()

    def _idle_sampling_for(self, rows: int) -> PackedArrays:
        """Sampling inputs of `rows` rows (`sampler_rows`) with nothing to sample, in the usual
        layout (suppressed-ids width), on the host as a step's own are (the jit cache tells host and
        device arrays apart): what a forward takes when a step's own have another layout."""
        idle = self._idle_sampling.get(rows)
        if idle is None:
            idle = sampling_inputs(make_sampling_batch([], rows), np.zeros(rows, np.bool_))
            self._idle_sampling[rows] = idle
        return idle

    def wait_for_background_compiles(self) -> None:
        """Block until the programs queued so far are compiled (the warm-up ends with this)."""
        if not self.step_programs.wait():
            logger.warning("Background compiles still running after the wait; serving anyway")

    def close(self) -> None:
        self.step_programs.close()

    # -- the step -----------------------------------------------------------------------------

    def run(self, batch: ScheduledBatch) -> StepOutput:
        """Dispatch one step asynchronously; the returned handles resolve when it ends."""
        return self.sample(self.forward(batch))

    def forward(self, batch: ScheduledBatch) -> DispatchedForward:
        """Dispatch a step's forward; `sample` dispatches its sampling. Between the two the host
        may work on the previous step: a sampler with branches holds the host, on a GPU, until
        the forward before it has run."""
        sampling = sampling_inputs(batch.sampling, batch.sample_valid)
        idle = self._idle_sampling_for(len(batch.sample_valid))
        # The forward takes the step's sampling inputs where their layout is the usual one.
        usual = sampling.layout == idle.layout
        plain_greedy = is_plain_greedy(batch.sampling)
        # A grammar step's greedy tokens are those of its masked logits: the sampler takes them.
        fused = self.fused_greedy and usual and plain_greedy and batch.grammar_masks is None
        inputs = forward_inputs(
            input_ids=batch.input_ids,
            token_source=batch.token_source,
            positions=batch.positions,
            sample_rows=batch.sample_rows,
            cu_q_lens=batch.cu_q_lens,
            kv_lens=batch.kv_lens,
            page_table=batch.page_table,
            write_slots=batch.write_slots,
            num_tokens=np.int32(batch.num_tokens),
            greedy=np.int32(fused),
            num_decode_seqs=batch.num_decode_seqs,
            max_prefill_q_len=batch.max_prefill_q_len,
        )
        # The packed host buffers go to the programs as they are: the jit call copies them to the
        # device itself, for less host time than a `jax.device_put` first (b=1 on the 2-core box:
        # 0.07 of the serving loop's 0.32 ms per step).
        shape = batch.step_shape()
        forward = self.step_programs.programs(shape) or self._forward
        programs_before = self._forward._cache_size()
        outputs = forward(*self._forward_state(), inputs, sampling if usual else idle)
        logits, hidden, k_pool, v_pool, hist, *greedy = outputs
        compiled_inline = self._forward._cache_size() > programs_before
        if compiled_inline:
            logger.info(
                "New step program for (tokens, seqs, page-table width, decode rows, max q) %s", shape.key
            )
            self.step_programs.note_compiled(shape)
        self.pool.k_pool, self.pool.v_pool, self.expert_hist = k_pool, v_pool, hist
        step = DispatchedForward(
            batch, logits, hidden, sampling, plain_greedy, compiled_inline=compiled_inline
        )
        if greedy:  # fused: the tables are the forward's outputs, changed only if `fused`
            tokens, chosen, self.output_counts, self.slot_tokens = greedy[0]
            if fused:
                step.greedy = StepOutput(tokens, chosen, logits, hidden)
        return step

    def sample(self, step: DispatchedForward) -> StepOutput:
        """Dispatch the sampling of a step whose forward is dispatched (`forward`), unless its
        forward sampled it (fused greedy). After a forward compiled inline, the other samplers of
        its row count compile aside (`StepPrograms.compile_companions_of`)."""
        output = self._dispatch_sampler(step)
        if step.compiled_inline:
            self.step_programs.compile_companions_of(step.batch.step_shape())
        return output

    def _dispatch_sampler(self, step: DispatchedForward) -> StepOutput:
        if step.greedy is not None:
            return step.greedy
        batch = step.batch
        plain = step.plain_greedy
        sampler_key = (len(batch.sample_valid), int(batch.sampling.suppressed_ids.shape[1]), plain)
        sampler = self._background_samplers.get(sampler_key)
        if sampler is None:
            sampler = functools.partial(self._sample, plain=plain)
            self._sampler_shapes.add(sampler_key)
        masks = batch.grammar_masks
        logits = step.logits if masks is None else self._mask_disallowed(step.logits, masks)
        tokens, chosen, self.output_counts, self.slot_tokens = sampler(
            logits,
            step.logits,
            step.sampling,
            self.output_counts,
            self.prompt_mask,
            self.slot_tokens,
        )
        return StepOutput(tokens, chosen, step.logits, step.hidden)

    # -- per-request device state -----------------------------------------------------------

    def reset_penalties(self, slot: int, prompt_ids: list[int]) -> None:
        """Clear a penalty row for a newly admitted request and mark its prompt tokens."""
        width = 1 << max(len(prompt_ids) - 1, 0).bit_length()
        padded = np.full((1, width), -1, np.int32)
        padded[0, : len(prompt_ids)] = prompt_ids
        self.output_counts, self.prompt_mask = self._reset_penalties(
            self.output_counts, self.prompt_mask, np.array([slot], np.int32), padded
        )

    def count_outputs(self, slot: int, tokens: list[int]) -> None:
        """Count a re-admitted (retracted) request's outputs so far in its penalty row again."""
        padded = np.full((1 << max(len(tokens) - 1, 0).bit_length(),), self.vocab_size, np.int32)
        padded[: len(tokens)] = tokens  # a few shapes compile; the padding's index is out of range
        self.output_counts = self.output_counts.at[slot, padded].add(1, mode="drop")

    # -- reading hidden states -----------------------------------------------------------------

    def _readout_fn(self, params, hidden, rows, *, kind: str):
        """Whole on every device, as what the host reads must be (`_whole`)."""
        model = nnx.merge(self.graphdef, params)
        selected = hidden[rows].astype(jnp.float32)
        if kind == "classify":
            return self._whole(model.score(selected.astype(hidden.dtype)).astype(jnp.float32))
        if kind == "embed":
            norm = jnp.linalg.norm(selected, axis=-1, keepdims=True)
            return self._whole(selected / jnp.maximum(norm, 1e-12))
        return self._whole(selected)

    def readout(self, hidden: jax.Array, rows: list[int], kind: str) -> np.ndarray:
        """Pooled outputs for embedding / reward requests, or raw hidden states (`kind="hidden"`)."""
        padded = np.zeros((1 << max(len(rows) - 1, 0).bit_length(),), np.int32)
        padded[: len(rows)] = rows
        return np.asarray(self._readout(self.params, hidden, padded, kind=kind))[: len(rows)]

    def _token_logprobs_fn(self, params, hidden, rows, targets, *, whole: bool):
        """Whole on every device: a split LM head's logprobs come out split by vocabulary, which
        a host cannot read where the devices are on several hosts (`_whole`)."""
        model = nnx.merge(self.graphdef, params)
        logits = model.compute_logits(hidden[rows])
        if not whole:
            return None, self._whole(chosen_logprobs(logits, targets))
        logprobs = full_logprobs(logits)
        return self._whole((logprobs, jnp.take_along_axis(logprobs, targets[:, None], axis=-1)[:, 0]))

    def full_logprobs(self, logits: jax.Array) -> np.ndarray:
        """A step's log-softmax table `[R, V]` on the host, from its raw logits (`StepOutput.logits`):
        made only for a step where a request asks for top logprobs or token_ids_logprob."""
        return np.asarray(self._full_logprobs(logits))

    def prompt_logprobs(
        self, hidden: jax.Array, rows: list[int], targets: list[int], whole: bool
    ) -> tuple[np.ndarray | None, np.ndarray]:
        """Each next prompt token's logprob, and with `whole` the log-softmax rows at those
        positions (for top logprobs and token_ids_logprob). Without it the `[rows, V]` table is
        neither written nor copied to the host: a 2048-token chunk's is 400 MB at SmolLM2's
        vocabulary, and GBs at 150k-token vocabularies."""
        width = 1 << max(len(rows) - 1, 0).bit_length()
        padded_rows = np.zeros((width,), np.int32)
        padded_rows[: len(rows)] = rows
        padded_targets = np.zeros((width,), np.int32)
        padded_targets[: len(targets)] = targets
        full, chosen = self._token_logprobs(self.params, hidden, padded_rows, padded_targets, whole=whole)
        return (np.asarray(full)[: len(rows)] if whole else None), np.asarray(chosen)[: len(rows)]

    # -- weights and accounting ------------------------------------------------------------------

    def place_params(self, new_params: Any) -> Any:
        """New weights of the serving tree's structure, shapes and dtypes (on the host or a
        device) placed as the serving ones are, leaf by leaf (split over the devices under
        tensor parallelism): what `swap_params` takes. Done while the old weights still serve;
        nothing recompiles."""
        return place(new_params, jax.tree.map(lambda x: x.sharding, self.params))

    def swap_params(self, placed: Any) -> None:
        """Serve the weights `place_params` placed, from the next step on."""
        self.params = placed

    def set_recording(self, on: bool) -> None:
        self.recording = jax.device_put(jnp.asarray(1 if on else 0, jnp.int32), self.recording.sharding)

    def take_expert_histogram(self) -> np.ndarray:
        """Read and reset the histogram (one host transfer per dump, none per step)."""
        hist = np.asarray(self.expert_hist)
        self.expert_hist = jax.device_put(jnp.zeros_like(self.expert_hist), self.expert_hist.sharding)
        return hist

    @property
    def num_compiled_programs(self) -> int:
        """Programs in the jit caches: what XLA really compiled (or loaded from the disk cache)."""
        jitted = (
            self._forward,
            self._sample,
            self._reset_penalties,
            self._readout,
            self._token_logprobs,
            self._full_logprobs,
        )
        aside = self.step_programs.num_compiled_here + len(self._background_samplers)
        return sum(fn._cache_size() for fn in jitted) + aside

    @property
    def num_step_programs(self) -> int:
        """Forward programs alone, the ones the bucket bound speaks of (inline and background)."""
        return self._forward._cache_size() + self.step_programs.num_compiled_here


def _sample_and_record(
    logits: jax.Array,
    inputs: PackedArrays,
    output_counts: jax.Array,
    prompt_mask: jax.Array | None,
    slot_tokens: jax.Array,
    plain: bool,
    apply: jax.Array | bool = True,
    raw: jax.Array | None = None,
) -> tuple[jax.Array, ...]:
    """Sample a step's rows (`sample`; `raw` scores the draws), count each sampled token for the
    penalties and keep it for the next step's forward; `apply` false (traced) leaves both tables
    as they were."""
    fields = inputs.unpack()
    valid = fields.pop("sample_valid") & apply
    sampling = SamplingBatch(**fields)
    out = sample(logits, sampling, output_counts, prompt_mask, plain, raw=raw)
    output_counts = update_output_counts(output_counts, sampling.penalty_slot, out.tokens, valid)
    slot_tokens = slot_tokens.at[jnp.where(valid, sampling.penalty_slot, 0)].set(out.tokens)
    return out.tokens, out.chosen_logprob, output_counts, slot_tokens


# A forward's packed host inputs, in the one order every caller packs them in (the layout is part
# of a compiled program's signature).
FORWARD_INPUTS = (
    "input_ids",
    "token_source",
    "positions",
    "sample_rows",
    "cu_q_lens",
    "kv_lens",
    "page_table",
    "write_slots",
    "num_tokens",
    "greedy",
)


def forward_inputs(*, num_decode_seqs: int, max_prefill_q_len: int, **arrays: Any) -> PackedArrays:
    """A forward's host inputs (token ids, positions, attention metadata, the fused-greedy flag) as
    one transfer; the two counts that select a program ride as static values."""
    if set(arrays) != set(FORWARD_INPUTS):
        raise TypeError(f"forward inputs are {FORWARD_INPUTS}, got {tuple(arrays)}")
    return PackedArrays.pack(
        {name: arrays[name] for name in FORWARD_INPUTS},
        static={"num_decode_seqs": num_decode_seqs, "max_prefill_q_len": max_prefill_q_len},
    )


def sampling_inputs(sampling: SamplingBatch, sample_valid: np.ndarray) -> PackedArrays:
    """A host `SamplingBatch` and the rows to sample, as one transfer."""
    fields = {field.name: getattr(sampling, field.name) for field in dataclasses.fields(sampling)}
    return PackedArrays.pack({**fields, "sample_valid": sample_valid})


def _shape_of(x: Any) -> jax.ShapeDtypeStruct:
    """Shape and dtype alone (uncommitted, as a step's packed inputs are)."""
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


def _abstract(tree: Any) -> Any:
    """Shapes, dtypes and placements of device arrays, for lowering without values."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
