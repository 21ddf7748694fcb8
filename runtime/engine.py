"""The engine: model, tokenizer, KV pool, runner and scheduler thread behind one object.

The HTTP server and offline users (`Engine(model_path=...).generate(...)`)
share it. Everything that can be checked before a request is queued is checked
in `validate_request`, so the scheduler only ever sees valid requests.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import random
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from models.layers import DecoderConfig, KernelBackends
from models.loader import load_model, load_params_for
from models.pooling import Pooling, load_pooling
from models.tensor_parallel import (
    group_for_shards,
    kv_pool_sharding,
    param_shardings,
    place,
    tensor_parallel_mesh,
    unsupported_reason,
)
from runtime import multi_node
from runtime.batch import StepShape, burst_shapes, step_shape
from runtime.expert_stats import write_expert_distribution
from runtime.grammar import TokenGrammars
from runtime.host_memory import keep_freed_memory
from runtime.io_struct import EngineRequest, OutputCallback, RequestOutput, failed_output
from runtime.kv_pool import KVPool, kv_bytes_per_token, pages_for_budget
from runtime.model_runner import ModelRunner
from runtime.output_deltas import DeltaCallback, OutputDelta, OutputRebuilder, whole
from runtime.paths import path_exists
from runtime.request import Req
from runtime.request_checks import ModelInfo, RequestLimits, check_not_in_flight, check_request
from runtime.response import embedding_response, generate_response
from runtime.sampling_params import SamplingParams
from runtime.scheduler import Scheduler
from runtime.server_args import ServerArgs
from runtime.tokenizer import load_tokenizer, tokenize
from runtime.xla_cpu import set_xla_cpu_flags

logger = logging.getLogger(__name__)
keep_freed_memory()
set_xla_cpu_flags()

VERSION = "0.1.0"
WARMUP_MAX_PROMPT = 512  # longest prompt bucket the start-up warm-up compiles
CLASSIFY_SUFFIX = "ForSequenceClassification"


def _enable_compile_cache(directory: str) -> None:
    Path(directory).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _keep_float32_exact(dtype: Any) -> None:
    """Float32 serving on a GPU multiplies in float32, as HF does (XLA on a GPU defaults to TF32).

    Measured on an H200: TF32 references were off by 1e-4 to 4e-3 of the output's scale.
    """
    if jax.default_backend() == "gpu" and jax.numpy.dtype(dtype) == jax.numpy.float32:
        jax.config.update("jax_default_matmul_precision", "highest")


def _eos_ids(config: Any, tokenizer: Any, model_path: str) -> frozenset[int]:
    """EOS ids from the config, generation_config.json and the tokenizer, as HF generate would stop on."""
    ids: set[int] = set()
    sources = [getattr(config, "eos_token_id", None)]
    generation_config = Path(model_path) / "generation_config.json"
    if generation_config.is_file():
        sources.append(json.loads(generation_config.read_text()).get("eos_token_id"))
    if tokenizer is not None:
        sources.append(tokenizer.eos_token_id)
    for source in sources:
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list):
            ids.update(int(x) for x in source)
    return frozenset(ids)


class Engine:
    """Owns the model and the scheduler thread; thread-safe entry points for the server."""

    def __init__(self, server_args: ServerArgs | None = None, **kwargs: Any) -> None:
        self.server_args = server_args or ServerArgs(**kwargs)
        args = self.server_args
        if args.dp_size > 1:
            raise ValueError(
                f"--dp-size {args.dp_size}: an Engine is one replica; the server runs several "
                "(python -m server.launch_server --dp-size N)."
            )
        if args.enable_compile_cache and args.compile_cache_dir:
            _enable_compile_cache(args.compile_cache_dir)
        # Several hosts (`--nnodes`): every node's JAX process joins before the model loads.
        multi_node.initialize(args)
        self.nodes = multi_node.NodeGroup(args) if args.nnodes > 1 else None
        # Split over devices, the weights go from the host straight to their shards.
        on_host = args.tp_size > 1
        loaded = load_model(args.model_path, dtype=args.dtype, load_format=args.load_format, on_host=on_host)
        _keep_float32_exact(loaded.dtype)
        self.config = loaded.config
        self.model = loaded.model
        self.mesh = self._split_over_devices(loaded.architecture)
        if hasattr(self.model, "kernel_backends"):
            self.model.kernel_backends = KernelBackends(
                attention=args.attention_backend,
                moe=args.moe_backend,
                mesh=self.mesh,
                experts_by_expert=self._experts_by_expert,
                unroll_layers=args.layer_loop == "unrolled",
            )
        self.tokenizer = load_tokenizer(args)
        self.model_info = self._model_info(loaded.architecture)
        if self.model_info.is_generation and args.is_embedding:
            raise ValueError(f"{args.model_path} is a generation model: --is-embedding cannot serve it.")
        self._rng = random.Random(args.random_seed)
        self._rid_lock = threading.Lock()
        self._weights_lock = threading.Lock()
        self._inflight: set[str] = set()
        self.encoder = None
        self.scheduler: Scheduler | None = None
        self.grammars: TokenGrammars | None = None  # with a tokenizer: structured output
        if self.is_follower:
            self._build_runner()
            return
        if loaded.architecture == "BertModel":
            from runtime.encoder_runner import EncoderRunner

            self.encoder = EncoderRunner(
                self.model, args.model_path, self.model_info.context_length, args.compiler_options
            )
        else:
            self._warn_if_pooling_differs()
            self._build_scheduler()
        if self.server_args.warmup:
            self.warmup()

    # -- construction ---------------------------------------------------------------------------

    def _model_info(self, architecture: str) -> ModelInfo:
        args = self.server_args
        config = self.config
        if architecture == "BertModel":
            kind = "embed"
        elif architecture.endswith(CLASSIFY_SUFFIX):
            kind = "classify"
        elif args.is_embedding:
            kind = "embed"
        else:
            kind = None
        positions = getattr(config, "max_position_embeddings", None)
        if args.context_length and positions and args.context_length > positions:
            raise ValueError(
                f"--context-length {args.context_length} is longer than the model's "
                f"{positions} positions (max_position_embeddings)."
            )
        context = args.context_length or positions or 2048
        return ModelInfo(
            model_path=args.model_path,
            tokenizer_path=None if args.skip_tokenizer_init else args.tokenizer_path,
            is_generation=kind is None,
            embedding_kind=kind,
            context_length=int(context),
            vocab_size=int(config.vocab_size),
            served_model_name=args.served_model_name or args.model_path,
            architecture=architecture,
            embedding_size={"embed": config.hidden_size, "classify": config.num_labels, None: None}[kind],
        )

    @property
    def _experts_by_expert(self) -> bool:
        """Expert parallelism (`--ep-size` equal to a `--tp-size` above 1): MoE experts split over
        the devices by expert rather than by intermediate."""
        return self.server_args.ep_size > 1

    def _split_over_devices(self, architecture: str) -> jax.sharding.Mesh | None:
        """With `--tp-size N`, the model's weights split over N devices (`models/tensor_parallel.py`)
        and the mesh they are split over; None on one device."""
        shards = self.server_args.tp_size
        if shards == 1:
            return None
        mesh = tensor_parallel_mesh(shards)
        cfg = getattr(self.model, "cfg", None)
        by_expert = self._experts_by_expert
        why = (
            unsupported_reason(cfg, shards, by_expert)
            if isinstance(cfg, DecoderConfig)
            else "encoders run on one device"
        )
        if why is not None:
            flags = f"--tp-size {shards}" + (f" --ep-size {shards}" if by_expert else "")
            raise ValueError(f"{flags} cannot serve {architecture}: {why}.")
        state = nnx.state(self.model)
        nnx.replace_by_pure_dict(state, group_for_shards(nnx.to_pure_dict(state), cfg, shards, by_expert))
        nnx.update(self.model, place(state, param_shardings(state, mesh, by_expert)))
        logger.info(
            "Tensor parallel over %d devices%s: %s",
            shards,
            " (MoE experts split by expert)" if by_expert and cfg.moe is not None else "",
            ", ".join(map(str, mesh.devices.flat)),
        )
        return mesh

    def _warn_if_pooling_differs(self) -> None:
        """A causal embedding model is pooled at its last token, normalised, as the reference
        does; say so when the folder's sentence-transformers config asks for something else."""
        if self.model_info.embedding_kind != "embed":
            return
        served = Pooling(mode="lasttoken", normalize=True)
        try:
            wanted = load_pooling(self.server_args.model_path, default=served)
        except ValueError as exc:
            wanted = exc
        if wanted != served:
            logger.warning(
                "%s asks for pooling %s; causal embedding models are served with last-token "
                "pooling, normalised (as the reference serves them).",
                self.server_args.model_path,
                wanted,
            )

    @property
    def is_follower(self) -> bool:
        """A node other than node 0 of several (`--nnodes`): it runs node 0's steps (`follow`)."""
        return self.server_args.node_rank > 0

    def follow(self) -> None:
        """A follower node's work: run node 0's device calls until node 0 closes."""
        assert self.nodes is not None and self.is_follower
        multi_node.follow(self.runner, self.nodes, self._stage_weights)
        multi_node.leave()

    def _build_runner(self) -> None:
        """The KV pool and the model runner; on node 0 of several, the runner's device calls
        mirrored to the other nodes (`runtime/multi_node.py`)."""
        args = self.server_args
        config = self.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        layers = config.num_hidden_layers
        dtype = self.model_dtype
        # Each device keeps the KV of its own heads; a CPU's devices share the host's memory,
        # which the budget counts once.
        shards = args.tp_size if jax.devices()[0].platform != "cpu" else 1
        per_token = kv_bytes_per_token(layers, num_kv_heads // shards, head_dim, dtype)
        fraction = (
            args.mem_fraction_static
            if args.mem_fraction_static is not None
            else (0.88 if jax.devices()[0].platform != "cpu" else 0.05)
        )
        num_pages = pages_for_budget(
            page_size=args.page_size,
            bytes_per_token=per_token,
            max_total_tokens=args.max_total_tokens,
            mem_fraction_static=fraction,
        )
        if self.nodes is not None:  # one pool split over every node's devices: the size all can hold
            num_pages = self.nodes.smallest(num_pages)
        self.pool = KVPool(
            layers,
            num_pages,
            args.page_size,
            num_kv_heads,
            head_dim,
            dtype,
            sharding=None if self.mesh is None else kv_pool_sharding(self.mesh),
        )
        self.runner = ModelRunner(
            self.model,
            self.pool,
            args.max_running_requests,
            self.model_info.vocab_size,
            num_experts=int(getattr(config, "num_experts", 0) or 0),
            borrow_programs=args.borrow_compiled_programs,
            fused_greedy={"auto": None, "on": True, "off": False}[args.fused_greedy_sampling],
            mesh=self.mesh,
            compiler_options=args.compiler_options,
        )
        if self.nodes is not None and not self.is_follower:
            self.runner = multi_node.MirroredRunner(self.runner, self.nodes)

    def _build_scheduler(self) -> None:
        self._build_runner()
        args = self.server_args
        config = self.config
        context = self.model_info.context_length
        chunk = args.chunked_prefill_size if args.chunked_prefill_size > 0 else context
        eos_ids = _eos_ids(config, self.tokenizer, args.model_path)
        if self.tokenizer is not None:
            self.grammars = TokenGrammars(self.tokenizer, self.model_info.vocab_size, eos_ids)
        self.scheduler = Scheduler(
            self.runner,
            self.pool,
            self.tokenizer,
            context_length=context,
            max_running_requests=args.max_running_requests,
            chunked_prefill_size=chunk,
            schedule_policy=args.schedule_policy,
            schedule_conservativeness=args.schedule_conservativeness,
            disable_radix_cache=args.disable_radix_cache,
            stream_interval=args.stream_interval,
            eos_ids=eos_ids,
            burst_window=args.burst_window_ms / 1000,
            grammars=self.grammars,
            dispatch_thread={"auto": jax.devices()[0].platform != "cpu", "on": True, "off": False}[
                args.dispatch_thread
            ],
        )
        self.scheduler.start()
        logger.info(
            "KV pool: %d pages of %d tokens (%d tokens, %.1f MB)",
            self.pool.num_pages - 1,
            args.page_size,
            self.pool.max_total_tokens,
            2 * self.pool.k_pool.nbytes / 1e6,
        )

    @property
    def model_dtype(self) -> Any:
        leaves = jax.tree_util.tree_leaves(nnx.state(self.model, nnx.Param))
        return leaves[0].dtype

    def warmup(self) -> None:
        """Compile the common programs before serving, from their shapes alone: decode steps at
        every row count, one prompt per prefill bucket up to WARMUP_MAX_PROMPT tokens with the
        decode width it leads to (a first chat request then finds its programs compiled instead of
        waiting about a second each), and the samplers of those row counts. Off a CPU, also mixed
        steps large enough to hold a burst's (`burst_shapes`). Then one short request runs the
        whole path. Running requests of each shape to compile them took twice as long.

        With the persistent compile cache warm this mostly loads programs from disk.
        """
        started = time.monotonic()
        if self.scheduler is None:
            self.encode(input_ids=[[1, 2, 3]])
            return
        self.runner.compile_programs(self._warmup_shapes())
        params = SamplingParams(temperature=0.0, max_new_tokens=3, ignore_eos=True)
        self._run_blocking([EngineRequest(rid="warmup", input_ids=[1, 2, 3, 4], sampling_params=params)])
        self.runner.wait_for_background_compiles()
        self.flush_cache()
        logger.info(
            "Warm-up compiled %d programs in %.1f s", self.num_compiled_programs, time.monotonic() - started
        )
        if self.grammars is not None:  # 0.3 s for SmolLM2's 49k tokens, more for larger vocabularies
            self.runner.step_programs.compile_aside(
                "structured output's view of the tokenizer", self.grammars.prepare
            )

    def _warmup_shapes(self) -> list[StepShape]:
        """The step shapes `warmup` compiles."""
        assert self.scheduler is not None
        buckets, page_size = self.scheduler.buckets, self.server_args.page_size
        shapes = {step_shape(buckets, page_size, n, [], [1]) for n in buckets.decode_seqs if n > 0}
        # a prompt's first chunk, and one new token within the context
        longest = min(WARMUP_MAX_PROMPT, self.scheduler.chunk_tokens, self.model_info.context_length - 1)
        for bucket in (b for b in buckets.prefill_tokens if b > 0):
            length = min(bucket, longest)
            shapes.add(step_shape(buckets, page_size, 0, [length], [length]))
            shapes.add(step_shape(buckets, page_size, 1, [], [length + 1]))
            if length == longest:
                break
        if self.runner.steps_are_cheap:  # off a CPU: a burst's steps borrow these
            shapes.update(burst_shapes(buckets, page_size, longest))
        return sorted(shapes, key=lambda shape: shape.key)

    # -- requests -------------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        return tokenize(self.tokenizer, text)

    @property
    def request_limits(self) -> RequestLimits:
        """The facts `check_request` needs (the HTTP process gets a copy of them)."""
        return RequestLimits(
            model_info=self.model_info,
            kv_capacity=self.pool.max_total_tokens if self.scheduler is not None else None,
            allow_auto_truncate=self.server_args.allow_auto_truncate,
            has_tokenizer=self.tokenizer is not None,
        )

    def validate_request(self, req: EngineRequest) -> None:
        """Every check that can fail a request, with the message the client sees."""
        check_request(req, self.request_limits)
        with self._rid_lock:
            check_not_in_flight(req.rid, self._inflight)

    def submit(
        self,
        req: EngineRequest,
        callback: OutputCallback | DeltaCallback,
        deltas: bool = False,
        detokenize: bool = True,
    ) -> None:
        """Queue a validated request; `callback` runs on the scheduler thread for each output:
        cumulative, or with `deltas` what is new since the previous one (an `OutputDelta`, for
        the engine's process to send on: runtime/output_deltas.py). Without `detokenize` the
        outputs have text only where stop strings need it (`scheduler_needs_text`); the caller
        makes the rest (the server's HTTP process does, with `StreamedText`)."""
        with self._rid_lock:
            check_not_in_flight(req.rid, self._inflight)
            self._inflight.add(req.rid)
        rebuilder = None if deltas else OutputRebuilder()

        def deliver(delta: OutputDelta) -> None:
            if delta[0].finished:
                with self._rid_lock:
                    self._inflight.discard(req.rid)
            callback(delta if rebuilder is None else rebuilder.rebuild(delta))

        if self.encoder is not None:
            self.encoder.submit(req, lambda output: deliver(whole(output)))
            return
        assert self.scheduler is not None
        if self.scheduler.error is not None:
            error = f"The engine failed: {self.scheduler.error}"
            deliver(whole(failed_output(req, error, reason="engine failed")))
            return
        if req.kind == "classify":
            req = self._score_last_non_pad(req)
        params = req.sampling_params
        # A request must fit the KV pool alone, or retraction could never let it finish.
        limit = min(self.model_info.context_length, self.pool.max_total_tokens) - len(req.input_ids)
        max_new = limit if params.max_new_tokens is None else min(params.max_new_tokens, limit)
        if req.kind != "generate":
            max_new = 0
        seed = params.sampling_seed if params.sampling_seed is not None else self._rng.getrandbits(63)
        try:  # compiled here, off the scheduler's thread (llguidance lets go of the GIL meanwhile)
            grammar = self.grammars.for_request(params) if self.grammars is not None else None
        except ValueError as exc:
            deliver(whole(failed_output(req, str(exc), status=400)))
            return
        self.scheduler.submit(
            Req(
                request=req,
                callback=deliver,
                max_new_tokens=max_new,
                seed=seed,
                eos_ids=self.scheduler.eos_ids,
                detokenize=detokenize,
                grammar=grammar,
            )
        )

    def _score_last_non_pad(self, req: EngineRequest) -> EngineRequest:
        """HF's sequence classifiers score the last token that is not the pad token (a prompt may
        end in pads where pad == EOS); the model is causal, so dropping the trailing pads gives
        that token's hidden state at the end."""
        pad = getattr(self.config, "pad_token_id", None)
        ids = req.input_ids
        if pad is None or ids[-1] != pad:
            return req
        kept = next((i + 1 for i in range(len(ids) - 1, -1, -1) if ids[i] != pad), 1)
        return dataclasses.replace(req, input_ids=ids[:kept])

    def abort(self, rid: str) -> None:
        if self.scheduler is not None:
            self.scheduler.abort(rid)
        elif self.encoder is not None:
            self.encoder.abort(rid)

    def abort_all(self) -> None:
        """Abort every request in flight; each one's callback gets its final, aborted output."""
        with self._rid_lock:
            rids = list(self._inflight)
        for rid in rids:
            self.abort(rid)

    # -- control ------------------------------------------------------------------------------------

    def flush_cache(self) -> bool:
        if self.scheduler is None:
            return True
        return self.scheduler.call(self.scheduler.flush_cache)

    def stats(self) -> dict[str, Any]:
        if self.scheduler is None:
            return self.encoder.stats()
        return self.scheduler.call(self.scheduler.stats)

    @property
    def num_compiled_programs(self) -> int:
        if self.scheduler is None:
            return self.encoder.num_compiled_programs
        return self.runner.num_compiled_programs

    def get_server_info(self) -> dict[str, Any]:
        info = self.stats()
        max_total = self.pool.max_total_tokens if self.scheduler is not None else 0
        # A generation keeps a position for its first output token, and /encode and /classify do
        # not; every input keeps a slot of the KV cache free (`request_checks.check_request`).
        longest = self.model_info.context_length - (1 if self.model_info.is_generation else 0)
        if max_total:
            longest = min(longest, max_total - 1)
        info.update(
            max_total_num_tokens=max_total,
            max_req_input_len=longest,
            version=VERSION,
            num_compiled_programs=self.num_compiled_programs,
            num_pending_compiles=self.runner.step_programs.num_pending if self.scheduler is not None else 0,
        )
        return info

    # -- expert distribution, weights, profiling ----------------------------------------------------

    def _moe_runner(self) -> ModelRunner | None:
        """The runner whose MoE layers record; None for a model without experts, whose record
        stays empty (the reference answers these routes for any model, as the contract does)."""
        if self.scheduler is None or not self.runner.num_experts:
            logger.warning("This engine runs no MoE layers: its expert distribution record stays empty.")
            return None
        return self.runner

    def start_expert_distribution_record(self) -> None:
        runner = self._moe_runner()
        if runner is None:
            return

        def start() -> None:
            runner.take_expert_histogram()
            runner.set_recording(True)

        self.scheduler.call(start)

    def stop_expert_distribution_record(self) -> None:
        runner = self._moe_runner()
        if runner is not None:
            self.scheduler.call(lambda: runner.set_recording(False))

    def dump_expert_distribution_record(self, directory: str | Path = ".") -> str:
        """Write the counts since the last start or dump to CSV, then reset them (the header alone
        for a model without experts)."""
        return str(write_expert_distribution(self.take_expert_histogram(), directory))

    def take_expert_histogram(self) -> np.ndarray:
        """The top-k counts `[layers, experts]` since the last start or take, then reset them
        (`[0, 0]` for a model without experts); `--dp-size` adds up its replicas' before writing."""
        runner = self._moe_runner()
        if runner is None:
            return np.zeros((0, 0), np.int64)
        return self.scheduler.call(runner.take_expert_histogram)

    def start_profile(self, output_dir: str | None = None, num_steps: int | None = None) -> str:
        if self.scheduler is None:
            raise ValueError("Profiling traces the generation steps; this model has none.")
        return self.scheduler.call(lambda: self.scheduler.profiler.start(output_dir, num_steps))

    def stop_profile(self) -> str:
        if self.scheduler is None:
            raise ValueError("Profiling traces the generation steps; this model has none.")
        return self.scheduler.call(self.scheduler.profiler.stop)

    def update_weights_from_disk(
        self, model_path: str, load_format: str | None = None
    ) -> tuple[bool, str, int]:
        """Load, check and swap in new weights between two steps; the old ones keep serving on failure.

        One update at a time: a second one's admission hold must not be lifted by the first's resume.
        """
        with self._weights_lock:
            return self._update_weights_from_disk(model_path, load_format)

    def _update_weights_from_disk(self, model_path: str, load_format: str | None) -> tuple[bool, str, int]:
        if not path_exists(model_path):
            return False, f"Failed to get weights iterator: {model_path} (repository not found).", 0
        mirrored = isinstance(getattr(self, "runner", None), multi_node.MirroredRunner)
        if mirrored:  # every other node loads first: a node that cannot read it fails the update
            failure = self.runner.stage_weights(model_path, load_format)
            if failure is not None:
                return False, f"Failed to update weights: {failure}", 0
        try:
            new = self._stage_weights(model_path, load_format)
            pooling = load_pooling(model_path) if self.encoder is not None else None
        except Exception as exc:  # any failure leaves the serving weights untouched
            if mirrored:
                self.runner.drop_weights()
            return False, f"Failed to update weights: {exc}", 0
        paused = self._swap(new, pooling)
        # The model object must not pin the weights it was loaded with.
        nnx.update(self.model, self.runner.params if self.scheduler is not None else self.encoder.params)
        self.model_info.model_path = model_path
        self.server_args.model_path = model_path
        return True, "Succeeded to update model weights.", paused

    def _stage_weights(self, model_path: str, load_format: str | None) -> Any:
        """A checkpoint's weights checked against the serving ones and placed as they are (split
        over the devices as they are), ready to swap in; raises on any failure."""
        pure = load_params_for(
            self.model,
            model_path,
            load_format or "auto",
            on_host=self.mesh is not None,
        )
        if self.mesh is not None:
            pure = group_for_shards(pure, self.model.cfg, self.server_args.tp_size, self._experts_by_expert)
        old = self.runner.params if self.encoder is None else self.encoder.params
        new = jax.tree.map(lambda leaf: leaf, old)
        nnx.replace_by_pure_dict(new, pure)
        if self.encoder is None:
            return self.runner.place_params(new)
        # each leaf's placement (committed or not) as it was, or every jit cache would miss
        return jax.tree.map(
            lambda fresh, leaf: jax.device_put(fresh, leaf.sharding if leaf.committed else None), new, old
        )

    def _swap(self, new_params: Any, pooling: Pooling | None) -> int:
        """Hold queued requests, let running ones finish, swap, flush the prefix cache, resume."""
        if self.scheduler is None:
            self.encoder.swap_params(new_params, pooling)
            return 0
        scheduler = self.scheduler
        paused = scheduler.call(lambda: scheduler.hold_admission(True))
        try:
            while not scheduler.call(scheduler.running_drained):
                time.sleep(0.005)

            def swap() -> int:
                self.runner.swap_params(new_params)
                scheduler.radix.flush()
                return len(scheduler.waiting)

            paused = max(paused, scheduler.call(swap))
        finally:
            scheduler.call(lambda: scheduler.hold_admission(False))
        return paused

    def shutdown(self) -> None:
        if self.scheduler is not None:
            profiler = self.scheduler.profiler
            if profiler.active and self.scheduler.error is None:  # write a trace in progress out
                try:
                    self.scheduler.call(lambda: profiler.stop() if profiler.active else None)
                except Exception:  # a lost trace must not keep the engine from stopping
                    logger.exception("The trace in progress could not be written")
            self.scheduler.shutdown()
        if self.encoder is not None:
            self.encoder.shutdown()
        if self.nodes is not None:  # the runner told the other nodes to stop
            multi_node.leave()

    # -- offline use ----------------------------------------------------------------------------------

    def _make_requests(
        self, prompt, input_ids, sampling_params, kind, **extra
    ) -> tuple[list[EngineRequest], bool]:
        if (prompt is None) == (input_ids is None):
            raise ValueError("Give exactly one of prompt or input_ids.")
        single = isinstance(prompt, str) or (
            input_ids is not None and input_ids and isinstance(input_ids[0], int)
        )
        if prompt is not None:
            prompts = [prompt] if single else list(prompt)
            id_lists = [self.tokenize(p) for p in prompts]
        else:
            id_lists = [list(input_ids)] if single else [list(x) for x in input_ids]
        params_list = (
            sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(id_lists)
        )
        requests = []
        for ids, params in zip(id_lists, params_list, strict=True):
            parsed = params if isinstance(params, SamplingParams) else SamplingParams.from_dict(params or {})
            parsed.validate()
            for sample in range(parsed.n):  # n samples per prompt: [p0 x n, p1 x n, ...] as /generate
                request = EngineRequest(
                    rid=uuid.uuid4().hex,
                    input_ids=ids,
                    sampling_params=parsed.for_sample(sample),
                    kind=kind,
                    **extra,
                )
                self.validate_request(request)
                requests.append(request)
        return requests, single and len(requests) == 1

    def _run_blocking(self, requests: list[EngineRequest]) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        done = threading.Event()
        lock = threading.Lock()

        def collect(output: RequestOutput) -> None:
            if output.finished:
                with lock:
                    results[output.rid] = output
                    if len(results) == len(requests):
                        done.set()

        for request in requests:
            self.submit(request, collect)
        done.wait()
        return [results[r.rid] for r in requests]

    def generate(self, prompt=None, sampling_params=None, input_ids=None, stream: bool = False, **extra):
        """Offline generation; the result has the /generate response's shape (a list for a batch)."""
        requests, single = self._make_requests(
            prompt, input_ids, sampling_params, "generate", stream=stream, **extra
        )
        skip = self.tokenizer is None
        if stream:
            if not single:
                raise ValueError("Offline streaming takes one prompt.")
            return self._stream(requests[0], skip)
        outputs = self._run_blocking(requests)
        responses = [
            generate_response(r, o, self.tokenizer, skip) for r, o in zip(requests, outputs, strict=True)
        ]
        return responses[0] if single else responses

    def _stream(self, request: EngineRequest, skip: bool) -> Iterator[dict]:
        events: queue.Queue = queue.Queue()
        self.submit(request, events.put)
        while True:
            output = events.get()
            yield generate_response(request, output, self.tokenizer, skip)
            if output.finished:
                return

    def encode(self, prompt=None, input_ids=None):
        """Offline embedding or reward scores, shaped like /encode's answer."""
        kind = self.model_info.embedding_kind or "embed"
        requests, single = self._make_requests(prompt, input_ids, None, kind)
        responses = [embedding_response(o) for o in self._run_blocking(requests)]
        return responses[0] if single else responses
