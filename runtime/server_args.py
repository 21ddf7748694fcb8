"""`ServerArgs`: every launch flag, its default and its check.

One dataclass serves the CLI (`python -m server.launch_server`), the offline
`Engine(ServerArgs(...))` and `/get_server_info`, so a flag cannot mean one thing
on the command line and another in Python. Flag names are SGLang's where the idea
exists here; flags of SGLang that mean nothing on an XLA runtime (CUDA graphs,
torch.compile, Triton kernels, ...) are accepted with a one-line warning so that
launch lines written for the reference keep working.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import os
import random
from typing import Any

from runtime import paths
from runtime.weights import LOAD_FORMATS

logger = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16", "half", "float")  # the reference's spellings too
SCHEDULE_POLICIES = ("fcfs", "lpm")
LOAD_BALANCE_METHODS = ("round_robin", "shortest_queue")  # --dp-size: which replica takes a request
TOOL_CALL_PARSERS = ("qwen25", "llama3")  # server/tool_parsers.py
REASONING_PARSERS = ("deepseek-r1", "qwen3")  # server/reasoning_parsers.py
KERNEL_BACKENDS = ("auto", "pallas", "reference")
LAYER_LOOPS = ("scan", "unrolled")
# --burst-window-ms: longer would make a lone request wait visibly for company.
MAX_BURST_WINDOW_MS = 100.0
ON_OFF_AUTO = ("auto", "on", "off")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

# Attention backends of the reference: a launch line naming one still runs, on `auto`.
REFERENCE_ATTENTION_BACKENDS = ("flashinfer", "triton", "torch_native", "fa3", "flashmla", "cutlass_mla")


@dataclasses.dataclass(frozen=True)
class IgnoredFlag:
    """A reference flag that is parsed and dropped, with the reason shown in its warning."""

    flag: str
    reason: str
    takes_value: bool = False
    nargs: str | None = None


IGNORED_FLAGS: tuple[IgnoredFlag, ...] = (
    IgnoredFlag("--disable-cuda-graph", "there are no CUDA graphs: XLA compiles each batch bucket once"),
    IgnoredFlag("--cuda-graph-max-bs", "there are no CUDA graphs: XLA compiles each batch bucket once", True),
    IgnoredFlag(
        "--cuda-graph-bs", "there are no CUDA graphs: XLA compiles each batch bucket once", True, "+"
    ),
    IgnoredFlag("--disable-cuda-graph-padding", "there are no CUDA graphs"),
    IgnoredFlag("--enable-torch-compile", "the model is compiled by XLA, not torch.compile"),
    IgnoredFlag("--torch-compile-max-bs", "the model is compiled by XLA, not torch.compile", True),
    IgnoredFlag("--trust-remote-code", "model code comes from this package; no remote code is ever run"),
    IgnoredFlag("--disable-overlap-schedule", "the scheduler always overlaps host work with the device step"),
    IgnoredFlag("--enable-mixed-chunk", "prefill chunks and decodes are always batched together"),
    IgnoredFlag("--grammar-backend", "structured output always uses llguidance", True),
    IgnoredFlag("--sampling-backend", "sampling runs on device in the jitted step", True),
    IgnoredFlag("--quantization", "weights are served in --dtype (GGUF files are dequantized)", True),
    IgnoredFlag("--kv-cache-dtype", "the KV cache uses the model dtype", True),
    IgnoredFlag("--tokenizer-mode", "the HF fast tokenizer is always used", True),
    IgnoredFlag("--device", "the platform is the one JAX picks (set JAX_PLATFORMS to force one)", True),
    IgnoredFlag("--max-prefill-tokens", "the prefill budget of a step is --chunked-prefill-size", True),
    IgnoredFlag("--cpu-offload-gb", "weights stay on the device", True),
    IgnoredFlag("--enable-dp-attention", "data-parallel attention does not exist here"),
    IgnoredFlag("--disable-custom-all-reduce", "collectives are inserted by XLA"),
    IgnoredFlag("--enable-p2p-check", "collectives are inserted by XLA"),
    IgnoredFlag("--triton-attention-num-kv-splits", "there are no Triton kernels", True),
    IgnoredFlag("--enable-nan-detection", "not implemented by this runtime"),
    IgnoredFlag("--watchdog-timeout", "not implemented by this runtime", True),
    IgnoredFlag("--download-dir", "models are never downloaded: pass a local --model-path", True),
    IgnoredFlag("--revision", "models are never downloaded: pass a local --model-path", True),
    IgnoredFlag("--show-time-cost", "not implemented by this runtime"),
    IgnoredFlag("--decode-log-interval", "not implemented by this runtime", True),
    IgnoredFlag("--disable-outlines-disk-cache", "outlines is not used"),
    IgnoredFlag("--enable-memory-saver", "not implemented by this runtime"),
    IgnoredFlag("--disable-fast-image-processor", "images are not served"),
)


def _ignored_dest(flag: IgnoredFlag) -> str:
    """The argparse namespace attribute of an ignored flag (prefixed so it never clashes with a field)."""
    return "ignored_" + flag.flag.lstrip("-").replace("-", "_")


def _gpu_plugin_installed() -> bool:
    """Whether JAX will run on a GPU, judged without importing JAX (server args must stay cheap)."""
    platforms = os.environ.get("JAX_PLATFORMS", "").lower()
    if platforms:
        return "cuda" in platforms or "gpu" in platforms or "rocm" in platforms
    return any(
        importlib.util.find_spec(name) is not None
        for name in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin")
    )


@dataclasses.dataclass
class ServerArgs:
    """Every launch setting. Fields left None get a platform default in `__post_init__`."""

    # Model and tokenizer
    model_path: str
    tokenizer_path: str | None = None
    load_format: str = "auto"
    skip_tokenizer_init: bool = False
    is_embedding: bool = False
    context_length: int | None = None
    dtype: str = "auto"
    served_model_name: str | None = None
    chat_template: str | None = None
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None

    # HTTP server
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None
    enable_metrics: bool = False
    log_level: str = "info"
    log_requests: bool = False
    enable_cache_report: bool = False

    # Memory and scheduling
    mem_fraction_static: float | None = None
    max_running_requests: int | None = None
    max_total_tokens: int | None = None
    chunked_prefill_size: int | None = None
    schedule_policy: str = "fcfs"
    schedule_conservativeness: float = 0.0
    burst_window_ms: float | None = None
    disable_radix_cache: bool = False
    page_size: int = 16
    stream_interval: int = 1
    allow_auto_truncate: bool = False
    random_seed: int | None = None

    # Parallelism
    tp_size: int = 1
    ep_size: int = 1  # 1: MoE experts split by intermediate over --tp-size; = tp_size: by expert
    dp_size: int = 1
    load_balance_method: str = "round_robin"
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None

    # Kernels and compilation
    attention_backend: str = "auto"
    moe_backend: str = "auto"
    layer_loop: str = "scan"
    fused_greedy_sampling: str = "auto"
    dispatch_thread: str = "auto"
    warmup: bool = False
    enable_compile_cache: bool = True
    borrow_compiled_programs: bool = True
    compile_cache_dir: str | None = None
    xla_backend_optimization_level: int | None = None

    def __post_init__(self) -> None:
        """Fill platform defaults and reject settings that cannot work, naming the flag."""
        if not self.model_path:
            raise ValueError("--model-path is required.")
        if self.tokenizer_path is None:
            self.tokenizer_path = self.model_path
        if self.served_model_name is None:
            self.served_model_name = self.model_path
        if self.random_seed is None:
            self.random_seed = random.randint(0, 1 << 30)
        on_gpu = _gpu_plugin_installed()
        if self.max_running_requests is None:
            self.max_running_requests = 256 if on_gpu else 64
        if self.chunked_prefill_size is None:
            self.chunked_prefill_size = 8192 if on_gpu else 2048
        if self.burst_window_ms is None:
            self.burst_window_ms = 0.0 if on_gpu else 5.0
        if self.enable_compile_cache and self.compile_cache_dir is None:
            self.compile_cache_dir = str(paths.compile_cache_dir())
        if self.attention_backend in REFERENCE_ATTENTION_BACKENDS:
            logger.warning(
                "--attention-backend %s is a CUDA backend of the reference; using auto.",
                self.attention_backend,
            )
            self.attention_backend = "auto"
        self._check()

    def _check(self) -> None:
        """Raise ValueError with the flag's name for the first invalid setting found."""
        _check_choice("--load-format", self.load_format, LOAD_FORMATS)
        _check_choice("--dtype", self.dtype, DTYPES)
        _check_choice("--schedule-policy", self.schedule_policy, SCHEDULE_POLICIES)
        _check_choice("--load-balance-method", self.load_balance_method, LOAD_BALANCE_METHODS)
        if self.tool_call_parser is not None:
            _check_choice("--tool-call-parser", self.tool_call_parser, TOOL_CALL_PARSERS)
        if self.reasoning_parser is not None:
            _check_choice("--reasoning-parser", self.reasoning_parser, REASONING_PARSERS)
        _check_choice("--attention-backend", self.attention_backend, KERNEL_BACKENDS)
        _check_choice("--moe-backend", self.moe_backend, KERNEL_BACKENDS)
        _check_choice("--layer-loop", self.layer_loop, LAYER_LOOPS)
        _check_choice("--fused-greedy-sampling", self.fused_greedy_sampling, ON_OFF_AUTO)
        _check_choice("--dispatch-thread", self.dispatch_thread, ON_OFF_AUTO)
        _check_choice("--log-level", self.log_level.lower(), LOG_LEVELS)
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in [0, 65535], got {self.port}.")
        level = self.xla_backend_optimization_level
        if level is not None and not 0 <= level <= 3:
            raise ValueError(f"--xla-backend-optimization-level must be in [0, 3], got {level}.")
        if self.context_length is not None and self.context_length < 2:
            raise ValueError(f"--context-length must be at least 2, got {self.context_length}.")
        if self.mem_fraction_static is not None and not 0.0 < self.mem_fraction_static < 1.0:
            raise ValueError(f"--mem-fraction-static must be in (0, 1), got {self.mem_fraction_static}.")
        assert self.max_running_requests is not None and self.chunked_prefill_size is not None
        if self.max_running_requests < 1:
            raise ValueError(f"--max-running-requests must be at least 1, got {self.max_running_requests}.")
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ValueError(f"--page-size must be a power of two, got {self.page_size}.")
        if self.max_total_tokens is not None and self.max_total_tokens < self.page_size:
            raise ValueError(
                f"--max-total-tokens ({self.max_total_tokens}) must hold at least one page "
                f"(--page-size {self.page_size})."
            )
        if self.chunked_prefill_size != -1 and self.chunked_prefill_size < self.page_size:
            raise ValueError(
                "--chunked-prefill-size must be -1 (no chunking) or at least --page-size "
                f"({self.page_size}), got {self.chunked_prefill_size}."
            )
        if not 0.0 <= self.schedule_conservativeness < float("inf"):
            raise ValueError(
                "--schedule-conservativeness must be a number of at least 0, got "
                f"{self.schedule_conservativeness}."
            )
        if self.stream_interval < 1:
            raise ValueError(f"--stream-interval must be at least 1, got {self.stream_interval}.")
        assert self.burst_window_ms is not None
        if not 0.0 <= self.burst_window_ms <= MAX_BURST_WINDOW_MS:
            raise ValueError(
                f"--burst-window-ms must be in [0, {MAX_BURST_WINDOW_MS:g}], got {self.burst_window_ms}."
            )
        for name in ("tp_size", "ep_size", "dp_size", "nnodes"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}.")
        if self.ep_size not in (1, self.tp_size):
            raise ValueError(
                f"--ep-size {self.ep_size} with --tp-size {self.tp_size}: expert parallelism spans the "
                "tensor-parallel devices (--ep-size equal to --tp-size) or none (1); an expert "
                "split within a smaller group is not implemented."
            )
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank must be in [0, --nnodes={self.nnodes}), got {self.node_rank}.")
        if self.nnodes > 1:
            self._check_nodes()
        if self.skip_tokenizer_init and self.chat_template:
            raise ValueError("--chat-template needs a tokenizer: drop --skip-tokenizer-init.")

    def _check_nodes(self) -> None:
        """Several hosts serve one model split over all their devices (`runtime/multi_node.py`)."""
        if not self.dist_init_addr or ":" not in self.dist_init_addr:
            raise ValueError(
                f"--nnodes {self.nnodes} needs --dist-init-addr host:port, node 0's address (the same "
                "on every node)."
            )
        if self.tp_size % self.nnodes:
            raise ValueError(
                f"--nnodes {self.nnodes} splits the model over every node's devices: --tp-size "
                f"({self.tp_size}) must be a multiple of it (the devices of all nodes together)."
            )
        if self.dp_size > 1:
            raise ValueError("--dp-size with --nnodes is not implemented: one model spans the nodes.")

    @property
    def url(self) -> str:
        """The base URL clients use to reach this server."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def compiler_options(self) -> dict[str, Any] | None:
        """XLA options every program of the engine compiles with (`jax.jit`'s `compiler_options`)."""
        if self.xla_backend_optimization_level is None:
            return None
        return {"xla_backend_optimization_level": self.xla_backend_optimization_level}

    def to_dict(self) -> dict[str, Any]:
        """The settings as shown by /get_server_info; the API key is never echoed back."""
        values = dataclasses.asdict(self)
        if values["api_key"] is not None:
            values["api_key"] = "<redacted>"
        return values

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        """Declare every flag on `parser`, with SGLang's names and our defaults."""
        d = ServerArgs.__dataclass_fields__

        def default(name: str) -> Any:
            return d[name].default

        model = parser.add_argument_group("model")
        model.add_argument("--model-path", required=True, help="Local folder (HF layout) or .gguf file.")
        model.add_argument("--tokenizer-path", default=None, help="Defaults to --model-path.")
        model.add_argument("--load-format", default=default("load_format"), choices=LOAD_FORMATS)
        model.add_argument(
            "--skip-tokenizer-init",
            action="store_true",
            help="No tokenizer: requests send input_ids and responses carry output_ids.",
        )
        model.add_argument(
            "--is-embedding", action="store_true", help="Serve the model as an embedding model."
        )
        model.add_argument("--context-length", type=int, default=None, help="Defaults to the model config's.")
        model.add_argument("--dtype", default=default("dtype"), choices=DTYPES)
        model.add_argument("--served-model-name", default=None, help="The name in /v1/models.")
        model.add_argument(
            "--chat-template",
            default=None,
            help="A Jinja template (file or inline) overriding the tokenizer's.",
        )
        model.add_argument(
            "--tool-call-parser",
            default=None,
            choices=TOOL_CALL_PARSERS,
            help="Read the model's own tool calls out of chat answers (tool_choice auto) as tool_calls.",
        )
        model.add_argument(
            "--reasoning-parser",
            default=None,
            choices=REASONING_PARSERS,
            help="Return a reasoning model's <think> section as reasoning_content in chat answers.",
        )

        http = parser.add_argument_group("HTTP server")
        http.add_argument("--host", default=default("host"))
        http.add_argument("--port", type=int, default=default("port"))
        http.add_argument("--api-key", default=None, help="Require `Authorization: Bearer KEY`.")
        http.add_argument(
            "--enable-metrics", action="store_true", help="Serve Prometheus metrics at /metrics."
        )
        http.add_argument("--log-level", default=default("log_level"), choices=LOG_LEVELS, type=str.lower)
        http.add_argument("--log-requests", action="store_true", help="Log every request and its output.")
        http.add_argument(
            "--enable-cache-report",
            action="store_true",
            help="Report cached prompt tokens in OpenAI usage (prompt_tokens_details).",
        )

        sched = parser.add_argument_group("memory and scheduling")
        sched.add_argument("--mem-fraction-static", type=float, default=None)
        sched.add_argument("--max-running-requests", type=int, default=None)
        sched.add_argument("--max-total-tokens", type=int, default=None, help="KV pool size in tokens.")
        sched.add_argument(
            "--chunked-prefill-size", type=int, default=None, help="Tokens per prefill chunk; -1 disables."
        )
        sched.add_argument("--schedule-policy", default=default("schedule_policy"), choices=SCHEDULE_POLICIES)
        sched.add_argument(
            "--schedule-conservativeness",
            type=float,
            default=default("schedule_conservativeness"),
            help="Above 0, admission leaves running requests room to grow into (the reference's "
            "new-token ratio times this): fewer requests at once, fewer retracted. 0 (the default "
            "here; the reference's is 1.0): a request starts when its first chunk fits.",
        )
        sched.add_argument(
            "--burst-window-ms",
            type=float,
            default=None,
            help="An idle engine's first request waits until none has arrived for this long (at most "
            "10 times as long), so that a burst starts as one batch instead of a trickle of partial "
            "prefill steps (default 5 on a CPU, where a step costs up to seconds; 0, off, on a GPU).",
        )
        sched.add_argument("--disable-radix-cache", action="store_true")
        sched.add_argument("--page-size", type=int, default=default("page_size"))
        sched.add_argument("--stream-interval", type=int, default=default("stream_interval"))
        sched.add_argument(
            "--allow-auto-truncate",
            action="store_true",
            help="Truncate prompts longer than the context instead of rejecting them.",
        )
        sched.add_argument("--random-seed", type=int, default=None)

        para = parser.add_argument_group("parallelism")
        para.add_argument("--tp-size", "--tp", dest="tp_size", type=int, default=default("tp_size"))
        para.add_argument(
            "--ep-size",
            "--expert-parallel-size",
            "--ep",
            dest="ep_size",
            type=int,
            default=default("ep_size"),
            help="MoE layers: 1 splits each expert's intermediate over the --tp-size devices; equal "
            "to --tp-size gives each device whole experts (expert parallelism). Attention stays split "
            "by head either way.",
        )
        para.add_argument(
            "--enable-ep-moe",
            action="store_true",
            help="The reference's older spelling of --ep-size equal to --tp-size.",
        )
        para.add_argument("--dp-size", "--dp", dest="dp_size", type=int, default=default("dp_size"))
        para.add_argument(
            "--load-balance-method",
            default=default("load_balance_method"),
            help="With --dp-size: round_robin (the reference's default) sends requests to the "
            "replicas in turn; shortest_queue to the one with the fewest in flight.",
        )
        para.add_argument("--nnodes", type=int, default=default("nnodes"))
        para.add_argument("--node-rank", type=int, default=default("node_rank"))
        para.add_argument("--dist-init-addr", default=None, help="host:port of node 0 for jax.distributed.")

        kern = parser.add_argument_group("kernels and compilation")
        kern.add_argument(
            "--attention-backend",
            default=default("attention_backend"),
            choices=KERNEL_BACKENDS + REFERENCE_ATTENTION_BACKENDS,
            help="auto: the Pallas kernel on a GPU for steps with prefill chunks, the XLA reference for "
            "decode-only steps and elsewhere. CUDA names of the reference mean auto.",
        )
        kern.add_argument("--moe-backend", default=default("moe_backend"), choices=KERNEL_BACKENDS)
        kern.add_argument(
            "--layer-loop",
            default=default("layer_loop"),
            choices=LAYER_LOOPS,
            help="How a step runs the decoder layers: scan (default; one compiled layer in a loop) or "
            "unrolled (each layer its own code over the same weights: on an H200 no faster at "
            "batch 64, much slower at batch 1, longer compiles; docs/benchmarks.md).",
        )
        kern.add_argument(
            "--fused-greedy-sampling",
            default=default("fused_greedy_sampling"),
            choices=ON_OFF_AUTO,
            help="Sample greedily inside each step's forward, so that an all-greedy step without "
            "penalties dispatches one program instead of two (auto: on unless the backend is a CPU).",
        )
        kern.add_argument(
            "--dispatch-thread",
            default=default("dispatch_thread"),
            choices=ON_OFF_AUTO,
            help="Dispatch each step's forward from a thread of its own, so that launching its "
            "kernels overlaps the previous step's output work (auto: on unless the backend is a CPU, "
            "where XLA's own threads run the program).",
        )
        kern.add_argument(
            "--warmup",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="Compile and run one request before announcing readiness (default on).",
        )
        kern.add_argument(
            "--skip-server-warmup", dest="warmup", action="store_false", help="Same as --no-warmup."
        )
        kern.add_argument(
            "--enable-compile-cache",
            action=argparse.BooleanOptionalAction,
            default=default("enable_compile_cache"),
            help="JAX's persistent compilation cache (default on).",
        )
        kern.add_argument("--compile-cache-dir", default=None, help="Defaults to $SGLAX_CACHE/jax_compile.")
        kern.add_argument(
            "--borrow-compiled-programs",
            action=argparse.BooleanOptionalAction,
            default=default("borrow_compiled_programs"),
            help="A step of a new shape runs padded to a compiled program while its own compiles in the "
            "background (default on); off: it compiles first, and results never depend on compile timing.",
        )
        kern.add_argument(
            "--xla-backend-optimization-level",
            type=int,
            default=None,
            help="XLA's backend (LLVM) optimisation level for the engine's programs, 0-3 (default: "
            "XLA's own). 0 compiles faster and runs slower: for models so small that their compiles "
            "outweigh their steps, as in tests.",
        )

        ignored = parser.add_argument_group("reference flags accepted and ignored")
        for flag in IGNORED_FLAGS:
            if flag.takes_value:
                ignored.add_argument(
                    flag.flag,
                    dest=_ignored_dest(flag),
                    default=None,
                    nargs=flag.nargs,
                    help=argparse.SUPPRESS,
                )
            else:
                ignored.add_argument(
                    flag.flag,
                    dest=_ignored_dest(flag),
                    action="store_true",
                    default=False,
                    help=argparse.SUPPRESS,
                )

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> ServerArgs:
        """Build from a parsed namespace, warning once for each ignored reference flag given."""
        for flag in IGNORED_FLAGS:
            value = getattr(args, _ignored_dest(flag), None)
            if value not in (None, False):
                logger.warning("%s is ignored: %s.", flag.flag, flag.reason)
        if getattr(args, "enable_ep_moe", False):
            args.ep_size = args.tp_size
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{name: getattr(args, name) for name in names if hasattr(args, name)})


def _check_choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise a ValueError listing the valid values of `flag`."""
    if value not in choices:
        raise ValueError(f"{flag} must be one of {', '.join(choices)}; got {value!r}.")


def make_parser() -> argparse.ArgumentParser:
    """The launcher's parser; unknown flags are an error, as argparse does by default."""
    parser = argparse.ArgumentParser(
        prog="python -m server.launch_server",
        description="Serve a language model over SGLang's native HTTP API and the OpenAI API.",
    )
    ServerArgs.add_cli_args(parser)
    return parser


def parse_server_args(argv: list[str] | None = None) -> ServerArgs:
    """Parse a command line into ServerArgs; a failed check exits with argparse's usage error."""
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        return ServerArgs.from_cli_args(args)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # parser.error exits; this keeps type checkers aware
