"""Jit-compiled step functions over bucketed shapes, and the device state they update.

The runner owns what lives on the device between steps: the weights (an
argument of every program, so a same-shaped swap recompiles nothing), the KV
pool and the penalty tables (donated and written in place), the expert
histogram, and the previous step's sampled tokens, which the next step reads
directly so the host can dispatch step N+1 before it has read step N.

A step whose shape has no program yet borrows a compiled one that holds it (at
most MAX_BORROW_FACTOR larger) while its own compiles on a background thread;
only a step that no program holds compiles inline, stalling the loop.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels_pallas.ragged_paged_attention import AttentionMetadata
from runtime.batch import ScheduledBatch, StepShape, borrowable_shape
from runtime.kv_pool import KVPool
from runtime.sampling import reset_penalty_rows, sample, update_output_counts

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class StepOutput:
    """Device handles of one step; reading any of them waits for that step alone."""

    next_tokens: jax.Array  # int32[S]
    chosen_logprobs: jax.Array  # float32[S]
    logprobs: jax.Array  # float32[S, V], log-softmax of the raw logits
    hidden: jax.Array  # [T, H], final-norm hidden states of every token


class ModelRunner:
    """Runs `ScheduledBatch`es through one causal model; never decides who runs."""

    def __init__(
        self,
        model: nnx.Module,
        pool: KVPool,
        max_running_requests: int,
        vocab_size: int,
        num_experts: int = 0,
    ) -> None:
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
        self._forward = jax.jit(self._forward_fn, donate_argnums=(1, 2, 3))
        # The device state's shapes, dtypes and placement, which steps and weight swaps keep.
        state = (
            self.params,
            self.pool.k_pool,
            self.pool.v_pool,
            self.expert_hist,
            self.recording,
            self.slot_tokens,
        )
        self._abstract_state = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
        )
        self.borrow_programs = True
        self._shapes_lock = threading.Lock()
        self._compiled_shapes: set[StepShape] = set()  # in the jit cache or in _background_programs
        self._background_programs: dict[StepShape, jax.stages.Compiled] = {}
        self._queued_shapes: set[StepShape] = set()
        self._compile_queue: queue.Queue[StepShape | None] = queue.Queue()
        self._compiler = threading.Thread(target=self._compile_loop, name="step-compiler", daemon=True)
        self._compiler.start()
        self._sample = jax.jit(self._sample_fn, donate_argnums=(2, 4))
        self._reset_penalties = jax.jit(reset_penalty_rows, donate_argnums=(0, 1))
        self._readout = jax.jit(self._readout_fn, static_argnames=("kind",))
        self._token_logprobs = jax.jit(self._token_logprobs_fn)

    def _commit_state(self) -> None:
        """Place all device state explicitly: a step's outputs are committed, and a jit cache
        entry compiled for uncommitted inputs would not serve them (one wasted compile per shape)."""
        device = self.pool.k_pool.devices().pop()
        self.pool.k_pool, self.pool.v_pool = jax.device_put((self.pool.k_pool, self.pool.v_pool), device)
        for name in ("params", "output_counts", "prompt_mask", "expert_hist", "recording", "slot_tokens"):
            setattr(self, name, jax.device_put(getattr(self, name), device))

    # -- the step -------------------------------------------------------------------------

    def _forward_fn(self, params, k_pool, v_pool, expert_hist, recording, slot_tokens, host, meta):
        """The model over the flat batch, and the logits of each sequence's last token."""
        model = nnx.merge(self.graphdef, params)
        source = host["token_source"]
        input_ids = jnp.where(source >= 0, slot_tokens[jnp.maximum(source, 0)], host["input_ids"])
        hidden, k_pool, v_pool, expert_counts = model(input_ids, host["positions"], k_pool, v_pool, meta)
        if getattr(type(model), "kind", "causal_lm") == "causal_lm":
            logits = model.compute_logits(hidden[host["sample_rows"]])
        else:  # reward / classifier heads pool instead of sampling; the sampler gets dummy rows
            logits = jnp.zeros((host["sample_rows"].shape[0], self.vocab_size), jnp.float32)
        if expert_counts is not None:
            expert_hist = expert_hist + expert_counts * recording
        return logits, hidden, k_pool, v_pool, expert_hist

    @staticmethod
    def _sample_fn(logits, sampling, output_counts, prompt_mask, slot_tokens, sample_valid):
        """Sampling is its own program: it depends on the row count only, so few compile."""
        out = sample(logits, sampling, output_counts, prompt_mask)
        output_counts = update_output_counts(output_counts, sampling.penalty_slot, out.tokens, sample_valid)
        slot_tokens = slot_tokens.at[jnp.where(sample_valid, sampling.penalty_slot, 0)].set(out.tokens)
        return out.tokens, out.chosen_logprob, out.logprobs, output_counts, slot_tokens

    # -- which program runs a step ------------------------------------------------------------

    def shape_for(self, need: StepShape) -> StepShape:
        """The shape to pad a step to: its own when compiled (or when nothing compiled holds it),
        else the cheapest compiled shape that holds it, while its own compiles in the background."""
        with self._shapes_lock:
            if not self.borrow_programs or need in self._compiled_shapes:
                return need
            borrowed = borrowable_shape(need, self._compiled_shapes)
            if borrowed is not None and need not in self._queued_shapes:
                self._queued_shapes.add(need)
                self._compile_queue.put(need)
        if borrowed is not None:
            logger.info(
                "Step %s runs on the compiled %s while its own program compiles", need.key, borrowed.key
            )
        return borrowed or need

    def _compile_loop(self) -> None:
        while (shape := self._compile_queue.get()) is not None:
            started = time.monotonic()
            try:
                program = self._forward.lower(*self._abstract_step_args(shape)).compile()
            except Exception:  # the step then compiles inline, where its error reaches the request
                logger.exception("Background compile of step program %s failed", shape.key)
                with self._shapes_lock:
                    self.borrow_programs = False
                continue
            with self._shapes_lock:
                self._background_programs[shape] = program
                self._compiled_shapes.add(shape)
            logger.info(
                "Compiled step program %s in the background in %.1f s", shape.key, time.monotonic() - started
            )

    def _abstract_step_args(self, shape: StepShape) -> tuple:
        """The forward's arguments as shapes alone: lowering needs no values."""
        seqs = shape.decode + shape.prefill_seqs
        ints = lambda *dims: jax.ShapeDtypeStruct(dims, jnp.int32)
        host = {name: ints(shape.tokens) for name in ("input_ids", "token_source", "positions")}
        host["sample_rows"] = ints(seqs)
        meta = AttentionMetadata(
            cu_q_lens=ints(seqs + 1),
            kv_lens=ints(seqs),
            page_table=ints(seqs, shape.width),
            write_slots=ints(shape.tokens),
            num_tokens=ints(),
            num_decode_seqs=shape.decode,
            max_prefill_q_len=shape.max_q,
        )
        return (*self._abstract_state, host, meta)

    def wait_for_background_compiles(self) -> None:
        """Block until every queued program is compiled (the warm-up ends with this)."""
        while True:
            with self._shapes_lock:
                if not self.borrow_programs or self._queued_shapes <= self._compiled_shapes:
                    return
            time.sleep(0.05)

    def close(self) -> None:
        self._compile_queue.put(None)
        self._compiler.join(timeout=60)

    # -- the step -----------------------------------------------------------------------------

    def run(self, batch: ScheduledBatch) -> StepOutput:
        """Dispatch one step asynchronously; the returned handles resolve when it ends."""
        host = {
            "input_ids": batch.input_ids,
            "token_source": batch.token_source,
            "positions": batch.positions,
            "sample_rows": batch.sample_rows,
        }
        meta = AttentionMetadata(
            cu_q_lens=batch.cu_q_lens,
            kv_lens=batch.kv_lens,
            page_table=batch.page_table,
            write_slots=batch.write_slots,
            num_tokens=np.int32(batch.num_tokens),
            num_decode_seqs=batch.num_decode_seqs,
            max_prefill_q_len=batch.max_prefill_q_len,
        )
        host, meta, sampling, sample_valid = jax.device_put((host, meta, batch.sampling, batch.sample_valid))
        shape = batch.step_shape()
        forward = self._background_programs.get(shape, self._forward)
        programs_before = self._forward._cache_size()
        logits, hidden, k_pool, v_pool, hist = forward(
            self.params,
            self.pool.k_pool,
            self.pool.v_pool,
            self.expert_hist,
            self.recording,
            self.slot_tokens,
            host,
            meta,
        )
        if self._forward._cache_size() > programs_before:
            logger.info(
                "New step program for (tokens, seqs, page-table width, decode rows, max q) %s", shape.key
            )
            with self._shapes_lock:
                self._compiled_shapes.add(shape)
        self.pool.k_pool, self.pool.v_pool, self.expert_hist = k_pool, v_pool, hist
        tokens, chosen, logprobs, self.output_counts, self.slot_tokens = self._sample(
            logits, sampling, self.output_counts, self.prompt_mask, self.slot_tokens, sample_valid
        )
        return StepOutput(tokens, chosen, logprobs, hidden)

    # -- per-request device state -----------------------------------------------------------

    def reset_penalties(self, slot: int, prompt_ids: list[int]) -> None:
        """Clear a penalty row for a newly admitted request and mark its prompt tokens."""
        width = 1 << max(len(prompt_ids) - 1, 0).bit_length()
        padded = np.full((1, width), -1, np.int32)
        padded[0, : len(prompt_ids)] = prompt_ids
        self.output_counts, self.prompt_mask = self._reset_penalties(
            self.output_counts, self.prompt_mask, np.array([slot], np.int32), padded
        )

    # -- reading hidden states -----------------------------------------------------------------

    def _readout_fn(self, params, hidden, rows, *, kind: str):
        model = nnx.merge(self.graphdef, params)
        selected = hidden[rows].astype(jnp.float32)
        if kind == "classify":
            return model.score(selected.astype(hidden.dtype)).astype(jnp.float32)
        if kind == "embed":
            norm = jnp.linalg.norm(selected, axis=-1, keepdims=True)
            return selected / jnp.maximum(norm, 1e-12)
        return selected

    def readout(self, hidden: jax.Array, rows: list[int], kind: str) -> np.ndarray:
        """Pooled outputs for embedding / reward requests, or raw hidden states (`kind="hidden"`)."""
        padded = np.zeros((1 << max(len(rows) - 1, 0).bit_length(),), np.int32)
        padded[: len(rows)] = rows
        return np.asarray(self._readout(self.params, hidden, padded, kind=kind))[: len(rows)]

    def _token_logprobs_fn(self, params, hidden, rows, targets):
        model = nnx.merge(self.graphdef, params)
        logits = model.compute_logits(hidden[rows])
        logprobs = jax.nn.log_softmax(logits, axis=-1)
        return logprobs, jnp.take_along_axis(logprobs, targets[:, None], axis=-1)[:, 0]

    def prompt_logprobs(
        self, hidden: jax.Array, rows: list[int], targets: list[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Log-softmax rows at prompt positions (for input logprobs) and each next token's logprob."""
        width = 1 << max(len(rows) - 1, 0).bit_length()
        padded_rows = np.zeros((width,), np.int32)
        padded_rows[: len(rows)] = rows
        padded_targets = np.zeros((width,), np.int32)
        padded_targets[: len(targets)] = targets
        full, chosen = self._token_logprobs(self.params, hidden, padded_rows, padded_targets)
        return np.asarray(full)[: len(rows)], np.asarray(chosen)[: len(rows)]

    # -- weights and accounting ------------------------------------------------------------------

    def swap_params(self, new_params) -> None:
        """Same structure, shapes and dtypes as the serving weights, so nothing recompiles.

        Placed as the old ones: the programs were compiled for committed weights.
        """
        self.params = jax.device_put(new_params, jax.tree.map(lambda x: x.sharding, self.params))

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
        jitted = (self._forward, self._sample, self._reset_penalties, self._readout, self._token_logprobs)
        return sum(fn._cache_size() for fn in jitted) + len(self._background_programs)

    @property
    def num_step_programs(self) -> int:
        """Forward programs alone, the ones the bucket bound speaks of (inline and background)."""
        return self._forward._cache_size() + len(self._background_programs)
