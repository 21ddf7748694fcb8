"""Step times of our engine per bucket, set against this machine's roofline, measured here.

The machine first: streaming-read bandwidth (numpy sum from one thread and
split over two, a jitted JAX sum, a jitted [1 x H] x [H x V] product that
streams the LM head) and matmul rate (jitted float32 2048^3, plus the skinny
LM-head shapes [B x H] x [H x V] that decode batches produce). Then the
engine's own `ModelRunner` runs hand-built batches with the shapes the
scheduler would build (same buckets), warmed up, timed in steady state:

- decode at batch B (each row `--decode-context` tokens deep, in its own run of KV pages, as the
  allocator places a sequence's pages),
- prefill of S sequences of N fresh tokens, and mixed decode + prefill steps.

Per case: ms/step (pipelined: steps dispatched back to back as the overlap
scheduler does; and synced: each step waited for), tokens/s, the bandwidth
floor (weights read once plus the KV read, over the measured two-thread
bandwidth) and how far above it the step is, and the achieved GFLOP/s (useful
FLOPs: real tokens, attention over the visible keys) against the matmul rate.
On a GPU the roofline is the device's copy bandwidth and bf16 matmul rate.

    python scripts/bench_one_batch.py                      # SmolLM2, default cases
    python scripts/bench_one_batch.py --decode-batches 1 32 --prefill-cases 1x512 --iters 10
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import logging
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_common import (  # noqa: E402
    DEFAULT_MODEL,
    MIN_TOKEN_ID,
    format_table,
    load_note,
    machine_info,
    model_config,
    write_json,
)

# ----------------------------------------------------------------------------- the machine


def best_time(fn: Callable[[], Any], repeats: int) -> float:
    """The fastest of `repeats` calls (after one untimed call): the machine's capability, not its noise."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return min(samples)


def measure_machine(hidden: int, vocab: int, skinny_rows: list[int], repeats: int) -> dict[str, Any]:
    """Streaming-read bandwidth (bytes/s) and float32 matmul rate (FLOP/s), each several ways."""
    import jax
    import jax.numpy as jnp

    host = np.ones(64 << 20, np.float32)  # 256 MB: far beyond any cache
    halves = np.array_split(host, 2)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        two_threads = best_time(lambda: list(pool.map(np.sum, halves)), repeats)
    one_thread = best_time(lambda: np.sum(host), repeats)
    device = jnp.asarray(host)
    jax_sum = jax.jit(jnp.sum)
    jax_sum_s = best_time(lambda: jax_sum(device).block_until_ready(), repeats)

    head = jnp.ones((hidden, vocab), jnp.float32)
    dot = jax.jit(jnp.dot)
    skinny = {}
    for rows in skinny_rows:
        x = jnp.ones((rows, hidden), jnp.float32)
        seconds = best_time(lambda x=x: dot(x, head).block_until_ready(), repeats)
        skinny[rows] = {
            "ms": seconds * 1e3,
            "gb_s": (head.nbytes + x.nbytes + rows * vocab * 4) / seconds / 1e9,
            "gflop_s": 2 * rows * hidden * vocab / seconds / 1e9,
        }

    n = 2048
    a = jnp.ones((n, n), jnp.float32)
    matmul_s = best_time(lambda: dot(a, a).block_until_ready(), repeats)
    return {
        "bandwidth_source": "numpy read (2 threads)",
        "bandwidth_gb_s": host.nbytes / two_threads / 1e9,
        "numpy_read_1thread_gb_s": host.nbytes / one_thread / 1e9,
        "jax_sum_gb_s": host.nbytes / jax_sum_s / 1e9,
        "matmul_source": "float32 matmul 2048^3",
        "matmul_gflop_s": 2 * n**3 / matmul_s / 1e9,
        "lm_head_dot": {f"{rows}x{hidden}x{vocab}": value for rows, value in skinny.items()},
        "load": load_note(),
    }


def measure_accelerator(repeats: int) -> dict[str, Any]:
    """On a GPU the roofline is the device's: its copy bandwidth and bf16 matmul rate, as bench_kernels."""
    import jax
    from bench_kernels import measure_ceilings

    ceilings = measure_ceilings(on_gpu=True, iterations=repeats)
    return {
        "device": jax.devices()[0].device_kind,
        "bandwidth_source": "device copy (bytes read + written)",
        "bandwidth_gb_s": ceilings.bandwidth / 1e9,
        "matmul_source": f"{ceilings.matmul_dtype} matmul 8192^3",
        "matmul_gflop_s": ceilings.flops / 1e9,
    }


# ----------------------------------------------------------------------------- the model's cost


@dataclasses.dataclass(frozen=True)
class ModelCost:
    """Per-token FLOPs and per-step bytes of a dense decoder, from its HF config."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    weight_bytes: int  # every parameter
    embed_bytes: int  # the input embedding table
    itemsize: int  # bytes per weight and KV element

    @classmethod
    def from_config(cls, config: dict[str, Any], weight_bytes: int, itemsize: int) -> ModelCost:
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        vocab = int(config["vocab_size"])
        return cls(
            layers=int(config["num_hidden_layers"]),
            hidden=hidden,
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            intermediate=int(config["intermediate_size"]),
            vocab=vocab,
            tied=bool(config.get("tie_word_embeddings", False)),
            weight_bytes=weight_bytes,
            embed_bytes=vocab * hidden * itemsize,
            itemsize=itemsize,
        )

    @property
    def streamed_weight_bytes(self) -> int:
        """Bytes a step must read: all weights, but an untied embedding table is only gathered from."""
        return self.weight_bytes if self.tied else self.weight_bytes - self.embed_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.itemsize

    def linear_flops(self, tokens: int) -> float:
        """Projections and MLP of every layer."""
        q_o = 2 * self.hidden * self.heads * self.head_dim
        k_v = 2 * self.hidden * self.kv_heads * self.head_dim
        mlp = 3 * self.hidden * self.intermediate
        return 2.0 * tokens * self.layers * (q_o + k_v + mlp)

    def attention_flops(self, visible_keys: int) -> float:
        """QK^T and PV over `visible_keys` (query, key) pairs, all heads and layers."""
        return 4.0 * self.layers * self.heads * self.head_dim * visible_keys

    def head_flops(self, rows: int) -> float:
        return 2.0 * rows * self.hidden * self.vocab


# ----------------------------------------------------------------------------- batches


@dataclasses.dataclass
class Case:
    """One step shape: `decode` rows of `context` tokens each, then prefill sequences of fresh tokens."""

    name: str
    decode: int
    context: int
    prefill: list[int]

    @property
    def real_tokens(self) -> int:
        return self.decode + sum(self.prefill)

    def pages(self, page_size: int) -> int:
        rows = self.decode * -(-(self.context + 1) // page_size)
        return rows + sum(-(-n // page_size) for n in self.prefill)

    def flops(self, cost: ModelCost) -> float:
        visible = self.decode * (self.context + 1) + sum(n * (n + 1) // 2 for n in self.prefill)
        return (
            cost.linear_flops(self.real_tokens)
            + cost.attention_flops(visible)
            + cost.head_flops(self.decode + len(self.prefill))
        )

    def bytes_read(self, cost: ModelCost) -> float:
        """Weights once, plus the KV each decode row attends over (prefill KV is written, then read hot)."""
        return cost.streamed_weight_bytes + self.decode * (self.context + 1) * cost.kv_bytes_per_token


def build_batch(case: Case, runner: Any, buckets: Any, page_size: int, rng: np.random.Generator) -> Any:
    """The `ScheduledBatch` the scheduler would build for this case (same buckets, same padding)."""
    from runtime.batch import ScheduledBatch, sampler_rows, step_shape
    from runtime.sampling import SamplingRow, make_sampling_batch
    from runtime.sampling_params import SamplingParams

    ps = page_size
    kv_after = [case.context + 1] * case.decode + list(case.prefill)
    shape = step_shape(buckets, ps, case.decode, list(case.prefill), kv_after)
    num_decode, max_q, width = shape.decode, shape.max_q, shape.width
    num_tokens, num_seqs = shape.tokens, shape.decode + shape.prefill_seqs

    input_ids = np.zeros(num_tokens, np.int32)
    positions = np.zeros(num_tokens, np.int32)
    write_slots = np.arange(num_tokens, dtype=np.int32) % ps
    cu_q_lens = np.zeros(num_seqs + 1, np.int32)
    kv_lens = np.zeros(num_seqs, np.int32)
    page_table = np.zeros((num_seqs, width), np.int32)
    sample_rows = np.zeros(num_seqs, np.int32)
    sample_valid = np.zeros(sampler_rows(num_seqs), np.bool_)
    next_page = 1

    def take_pages(count: int) -> np.ndarray:
        nonlocal next_page
        pages = np.arange(next_page, next_page + count, dtype=np.int32)
        next_page += count
        return pages

    # Each decode row's pages follow each other, as the allocator places them (runtime/kv_pool.py).
    decode_pages = -(-(case.context + 1) // ps)
    row_pages = take_pages(decode_pages * case.decode).reshape(case.decode, decode_pages)
    cu_q_lens[1 : num_decode + 1] = np.arange(1, num_decode + 1)
    for seq in range(case.decode):
        pages = row_pages[seq]
        pos = case.context
        input_ids[seq] = rng.integers(MIN_TOKEN_ID, runner.vocab_size)
        positions[seq] = pos
        write_slots[seq] = pages[pos // ps] * ps + pos % ps
        kv_lens[seq] = pos + 1
        page_table[seq, : len(pages)] = pages
        sample_rows[seq] = seq
        sample_valid[seq] = True
    offset = num_decode
    for i, take in enumerate(case.prefill):
        seq = num_decode + i
        pages = take_pages(-(-take // ps))
        span = np.arange(take)
        input_ids[offset : offset + take] = rng.integers(MIN_TOKEN_ID, runner.vocab_size, size=take)
        positions[offset : offset + take] = span
        write_slots[offset : offset + take] = pages[span // ps] * ps + span % ps
        kv_lens[seq] = take
        page_table[seq, : len(pages)] = pages
        cu_q_lens[seq + 1] = offset + take
        sample_rows[seq] = offset + take - 1
        sample_valid[seq] = True
        offset += take
    cu_q_lens[num_decode + len(case.prefill) + 1 :] = offset
    greedy = SamplingRow(params=SamplingParams(temperature=0.0), seed=0, output_index=0, penalty_slot=0)
    real_rows = case.decode + len(case.prefill)
    return ScheduledBatch(
        input_ids=input_ids,
        token_source=np.full(num_tokens, -1, np.int32),
        positions=positions,
        cu_q_lens=cu_q_lens,
        kv_lens=kv_lens,
        page_table=page_table,
        write_slots=write_slots,
        num_tokens=case.real_tokens,
        num_decode_seqs=num_decode,
        max_prefill_q_len=max_q,
        sample_rows=sample_rows,
        sample_valid=sample_valid,
        sampling=make_sampling_batch([greedy] * real_rows, len(sample_valid)),
    )


def time_case(runner: Any, batch: Any, iters: int, warmup: int) -> tuple[float, float]:
    """(pipelined, synced) seconds per step after `warmup` steps that compile and settle."""
    for _ in range(warmup):
        runner.run(batch).next_tokens.block_until_ready()
    synced = []
    for _ in range(iters):
        start = time.perf_counter()
        runner.run(batch).next_tokens.block_until_ready()
        synced.append(time.perf_counter() - start)
    start = time.perf_counter()
    outputs = [runner.run(batch) for _ in range(iters)]
    outputs[-1].next_tokens.block_until_ready()
    pipelined = (time.perf_counter() - start) / iters
    return pipelined, statistics.median(synced)


def trace_case(runner: Any, batch: Any, directory: Path, steps: int, pipelined: bool = False) -> None:
    """An XLA trace of `steps` steps, each waited for, so the device timeline shows whole steps;
    or `pipelined`, launched back to back as the timing's steps are, waited for at the end: the
    gaps a step launched behind another leaves on the device, and the host's work between."""
    import jax

    with jax.profiler.trace(str(directory), create_perfetto_trace=True):
        if pipelined:
            launched = [runner.run(batch) for _ in range(steps)]
            launched[-1].next_tokens.block_until_ready()
        else:
            for _ in range(steps):
                runner.run(batch).next_tokens.block_until_ready()


# ----------------------------------------------------------------------------- main


def parse_cases(args: argparse.Namespace) -> list[Case]:
    cases = [Case(f"decode b={b}", b, args.decode_context, []) for b in args.decode_batches]
    for spec in args.prefill_cases:
        seqs, length = (int(x) for x in spec.split("x"))
        cases.append(Case(f"prefill {seqs}x{length}", 0, 0, [length] * seqs))
    for spec in args.mixed_cases:
        rows, prefill = spec.split("+")
        seqs, length = (int(x) for x in prefill.split("x"))
        cases.append(Case(f"mixed {rows}+{seqs}x{length}", int(rows), args.decode_context, [length] * seqs))
    return cases


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-path", default=str(DEFAULT_MODEL))
    parser.add_argument(
        "--load-format", default="auto", help="dummy: random weights (scripts/write_model_config.py)."
    )
    parser.add_argument("--dtype", default="auto")
    parser.add_argument(
        "--attention-backend", default="auto", help="auto, pallas or reference (as the server flag)."
    )
    parser.add_argument("--layer-loop", default="scan", help="scan or unrolled (as the server flag).")
    parser.add_argument(
        "--fused-greedy-sampling", default="auto", help="auto, on or off (as the server flag)."
    )
    parser.add_argument("--decode-batches", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--decode-context", type=int, default=256, help="KV depth of each decode row.")
    parser.add_argument("--prefill-cases", nargs="*", default=["1x64", "1x128", "1x256", "1x512", "4x128"])
    parser.add_argument("--mixed-cases", nargs="*", default=["32+1x256"], help="DECODE_ROWS+SEQSxLEN")
    parser.add_argument("--chunked-prefill-size", type=int, default=2048)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="Repeats of each machine measurement.")
    parser.add_argument("--skip-machine", action="store_true", help="Use --bandwidth/--matmul-rate instead.")
    parser.add_argument("--bandwidth", type=float, default=None, help="GB/s, with --skip-machine.")
    parser.add_argument("--matmul-rate", type=float, default=None, help="GFLOP/s, with --skip-machine.")
    parser.add_argument("--output-file", default=None)
    parser.add_argument(
        "--profile-dir",
        default=None,
        help="Also trace --profile-steps synced steps of each case with jax.profiler, one run per case "
        "in a subfolder (read them with scripts/trace_summary.py).",
    )
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument(
        "--profile-pipelined",
        action="store_true",
        help="Trace the steps launched back to back (as the ms/step column runs them), not synced.",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    # The engine's XLA CPU flags, before the machine measurements start JAX's CPU client.
    from runtime.xla_cpu import set_xla_cpu_flags

    set_xla_cpu_flags()

    config = model_config(args.model_path)
    cases = parse_cases(args)
    decode_rows = sorted({1, *(c.decode for c in cases if c.decode)})
    import jax

    print(f"machine ({load_note()}) ...", flush=True)
    if args.skip_machine:
        if args.bandwidth is None or args.matmul_rate is None:
            parser.error("--skip-machine needs --bandwidth and --matmul-rate")
        machine = {
            "bandwidth_source": "given (--bandwidth)",
            "bandwidth_gb_s": args.bandwidth,
            "matmul_source": "given (--matmul-rate)",
            "matmul_gflop_s": args.matmul_rate,
        }
    elif jax.default_backend() == "gpu":
        machine = measure_accelerator(args.repeats)
    else:
        machine = measure_machine(
            int(config["hidden_size"]), int(config["vocab_size"]), decode_rows, args.repeats
        )
    bandwidth = machine["bandwidth_gb_s"] * 1e9
    matmul_rate = machine["matmul_gflop_s"] * 1e9

    from models.loader import param_shapes
    from runtime.engine import Engine
    from runtime.server_args import ServerArgs

    page_size = 16
    pages = max(c.pages(page_size) for c in cases) + 1
    engine = Engine(
        ServerArgs(
            model_path=args.model_path,
            max_total_tokens=pages * page_size,
            max_running_requests=max(decode_rows),
            chunked_prefill_size=args.chunked_prefill_size,
            page_size=page_size,
            random_seed=0,
            load_format=args.load_format,
            dtype=args.dtype,
            skip_tokenizer_init=args.load_format == "dummy",  # a config-only folder has no tokenizer
            attention_backend=args.attention_backend,
            layer_loop=args.layer_loop,
            fused_greedy_sampling=args.fused_greedy_sampling,
        )
    )
    rows = []
    results = []
    try:
        runner, buckets = engine.runner, engine.scheduler.buckets
        params = jax.tree_util.tree_leaves(param_shapes(engine.model))
        weight_bytes = sum(math.prod(p.shape) * p.dtype.itemsize for p in params)
        cost = ModelCost.from_config(config, weight_bytes, params[0].dtype.itemsize)
        rng = np.random.default_rng(0)
        for case in cases:
            batch = build_batch(case, runner, buckets, page_size, rng)
            pipelined, synced = time_case(runner, batch, args.iters, args.warmup)
            if args.profile_dir:
                directory = Path(args.profile_dir) / case.name.replace(" ", "_")
                trace_case(runner, batch, directory, args.profile_steps, args.profile_pipelined)
            floor = case.bytes_read(cost) / bandwidth
            compute_floor = case.flops(cost) / matmul_rate
            gflops = case.flops(cost) / pipelined / 1e9
            result = {
                "case": case.name,
                "real_tokens": case.real_tokens,
                "padded_tokens": int(batch.num_padded_tokens),
                "ms_pipelined": pipelined * 1e3,
                "ms_synced": synced * 1e3,
                "tok_s": case.real_tokens / pipelined,
                "bandwidth_floor_ms": floor * 1e3,
                "x_bandwidth_floor": pipelined / floor,
                "compute_floor_ms": compute_floor * 1e3,
                "gflop_s": gflops,
                "fraction_of_matmul_rate": gflops * 1e9 / matmul_rate,
                "load": load_note(),
            }
            results.append(result)
            rows.append(
                [
                    case.name,
                    f"{case.real_tokens}/{batch.num_padded_tokens}",
                    result["ms_pipelined"],
                    result["ms_synced"],
                    result["tok_s"],
                    result["bandwidth_floor_ms"],
                    result["x_bandwidth_floor"],
                    result["gflop_s"],
                    f"{100 * result['fraction_of_matmul_rate']:.0f}%",
                ]
            )
            print(f"  {case.name}: {pipelined * 1e3:.1f} ms/step ({load_note()})", flush=True)
    finally:
        engine.shutdown()

    print(f"\n{Path(args.model_path).name}: {cost.weight_bytes / 1e6:.0f} MB of weights, {load_note()}")
    print(f"machine: {machine['bandwidth_source']} {machine['bandwidth_gb_s']:.1f} GB/s", end="")
    if "jax_sum_gb_s" in machine:
        one_thread, jax_sum = machine["numpy_read_1thread_gb_s"], machine["jax_sum_gb_s"]
        print(f", {one_thread:.1f} GB/s (1 thread), jax sum {jax_sum:.1f} GB/s", end="")
    print(f"; {machine['matmul_source']} {machine['matmul_gflop_s']:.0f} GFLOP/s")
    for shape, value in machine.get("lm_head_dot", {}).items():
        rate = f"{value['gb_s']:.1f} GB/s, {value['gflop_s']:.0f} GFLOP/s"
        print(f"  LM head dot {shape}: {value['ms']:.2f} ms, {rate}")
    headers = [
        "case",
        "tokens",
        "ms/step",
        "ms synced",
        "tok/s",
        "bw floor ms",
        "x floor",
        "GFLOP/s",
        "of matmul",
    ]
    print(format_table(headers, rows))
    payload = {
        "model_path": args.model_path,
        "machine_info": machine_info(),
        "machine": machine,
        "weights_mb": cost.weight_bytes / 1e6,
        "streamed_weights_mb": cost.streamed_weight_bytes / 1e6,
        "decode_context": args.decode_context,
        "cases": results,
    }
    write_json(args.output_file, payload)
    return payload


if __name__ == "__main__":
    main()
