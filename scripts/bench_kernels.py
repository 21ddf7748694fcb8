"""Time the Mosaic GPU kernels against their XLA references on realistic shapes.

    python scripts/bench_kernels.py            # every case
    python scripts/bench_kernels.py --quick    # fewer, smaller cases (the default on CPU)

For each case it prints the median time, the achieved GB/s (bytes that must
move: KV pages read, Q read, output written) and TFLOP/s (useful FLOPs only:
causal attention counts visible positions), each against the device's
ceilings measured here: a large copy (memory bandwidth) and a large bf16
matmul (tensor throughput). On CPU, or with JAX < 0.11, only the references
run; the line says why the kernel does not.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernels_pallas import _backend  # noqa: E402
from kernels_pallas import moe_routing as moe  # noqa: E402
from kernels_pallas import ragged_paged_attention as rpa  # noqa: E402


def time_fn(fn: Callable[..., Any], *args: Any, iterations: int) -> float:
    """Median wall time of `fn(*args)` in seconds, after one compile-and-warm-up call."""
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(iterations):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


@dataclasses.dataclass(frozen=True)
class Ceilings:
    bandwidth: float  # bytes / s, from a large elementwise copy
    flops: float  # FLOP / s, from a large matmul
    matmul_dtype: str


def measure_ceilings(on_gpu: bool, iterations: int) -> Ceilings:
    """Memory bandwidth from `x + 1` over a large array (read + write); compute from a large matmul."""
    copy_elements = (1 << 28) if on_gpu else (1 << 24)
    x = jnp.ones((copy_elements,), jnp.bfloat16 if on_gpu else jnp.float32)
    seconds = time_fn(jax.jit(lambda a: a + 1), x, iterations=iterations)
    bandwidth = 2 * x.nbytes / seconds
    del x
    size, dtype = (8192, jnp.bfloat16) if on_gpu else (1024, jnp.float32)
    a = jnp.ones((size, size), dtype)
    seconds = time_fn(jax.jit(lambda p, q: p @ q), a, a, iterations=iterations)
    return Ceilings(bandwidth, 2 * size**3 / seconds, jnp.dtype(dtype).name)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    args: tuple
    reference: Callable[..., Any]
    kernel: Callable[..., Any] | None  # None: the kernel cannot take these inputs
    skip_reason: str
    bytes_moved: float
    flops: float


def attention_case(
    name: str,
    *,
    q_heads: int,
    kv_heads: int,
    head_dim: int,
    decode_kv_lens: list[int],
    prefills: list[tuple[int, int]],
    page_size: int = 16,
    dtype: Any = jnp.bfloat16,
) -> Case:
    """A scheduled batch: decode rows (one token each), then (q_len, cached_prefix) prefill chunks."""
    rng = np.random.default_rng(0)
    q_lens = [1] * len(decode_kv_lens) + [q for q, _ in prefills]
    kv_lens = list(decode_kv_lens) + [q + cached for q, cached in prefills]
    pages = [-(-kv // page_size) for kv in kv_lens]
    num_pages = 1 + sum(pages)
    width = max(pages)
    page_ids = rng.permutation(np.arange(1, num_pages))  # a fragmented pool, as after some serving
    table = np.zeros((len(kv_lens), width), np.int32)
    used = 0
    for seq, count in enumerate(pages):
        table[seq, :count] = page_ids[used : used + count]
        used += count
    num_tokens = sum(q_lens)
    meta = rpa.AttentionMetadata(
        cu_q_lens=jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32),
        kv_lens=jnp.asarray(kv_lens, jnp.int32),
        page_table=jnp.asarray(table),
        write_slots=jnp.zeros((num_tokens,), jnp.int32),
        num_tokens=jnp.int32(num_tokens),
        num_decode_seqs=len(decode_kv_lens),
        max_prefill_q_len=max([q for q, _ in prefills], default=0),
    )
    pool_shape = (1, num_pages, page_size, kv_heads, head_dim)
    k_pool = jnp.asarray(rng.standard_normal(pool_shape), dtype)
    v_pool = jnp.asarray(rng.standard_normal(pool_shape), dtype)
    q = jnp.asarray(rng.standard_normal((num_tokens, q_heads, head_dim)), dtype)
    itemsize = jnp.dtype(dtype).itemsize
    kv_bytes = sum(kv_lens) * kv_heads * head_dim * 2 * itemsize
    visible = sum(kv - q + i + 1 for q, kv in zip(q_lens, kv_lens, strict=True) for i in range(q))
    scale = head_dim**-0.5
    reason = _backend.UNAVAILABLE_REASON or rpa.kernel_unsupported_reason(q, k_pool)
    return Case(
        name,
        (q, k_pool, v_pool, jnp.int32(0), meta),
        jax.jit(functools.partial(rpa.ragged_paged_attention_reference, sm_scale=scale)),
        None if reason else jax.jit(functools.partial(rpa.ragged_paged_attention_mgpu, sm_scale=scale)),
        reason,
        kv_bytes + 2 * q.nbytes,
        4.0 * head_dim * q_heads * visible,
    )


def routing_case(name: str, *, num_tokens: int, num_experts: int, top_k: int, renormalize: bool) -> Case:
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((num_tokens, num_experts)), jnp.float32)
    valid = jnp.ones((num_tokens,), bool)
    options = dict(top_k=top_k, renormalize=renormalize)
    reason = _backend.UNAVAILABLE_REASON
    return Case(
        name,
        (logits, valid),
        jax.jit(functools.partial(moe.route_tokens_reference, **options)),
        None if reason else jax.jit(functools.partial(moe.route_tokens_mgpu, **options)),
        reason,
        logits.nbytes + num_tokens * top_k * 16,
        0.0,
    )


def grouped_matmul_case(
    name: str, *, num_tokens: int, top_k: int, experts: int, depth: int, width: int
) -> Case:
    """The expert matmul of a routed batch: T * top_k rows, sorted by expert, with a skewed split."""
    rng = np.random.default_rng(0)
    rows = num_tokens * top_k
    lhs = jnp.asarray(rng.standard_normal((rows, depth)), jnp.bfloat16)
    rhs = jnp.asarray(rng.standard_normal((experts, depth, width)) * depth**-0.5, jnp.bfloat16)
    share = rng.dirichlet(np.full(experts, 0.5))
    sizes = np.floor(share * rows).astype(np.int32)
    sizes[np.argmax(sizes)] += rows - sizes.sum()
    group_sizes = jnp.asarray(sizes)
    reason = _backend.UNAVAILABLE_REASON or moe.grouped_matmul_unsupported_reason(lhs, rhs)
    return Case(
        name,
        (lhs, rhs, group_sizes),
        jax.jit(moe.grouped_matmul_reference),
        None if reason else jax.jit(moe.grouped_matmul_mgpu),
        reason,
        lhs.nbytes + rhs.nbytes + rows * width * 2,
        2.0 * rows * depth * width,
    )


def build_cases(quick: bool) -> list[Case]:
    """SmolLM2-135M (9 q / 3 kv heads) and Qwen2.5-0.5B (14 / 2), head_dim 64; Qwen1.5-MoE-A2.7B routing."""
    smollm2 = dict(q_heads=9, kv_heads=3, head_dim=64)
    qwen = dict(q_heads=14, kv_heads=2, head_dim=64)
    qwen_moe = dict(top_k=4, experts=60)
    cases = [
        attention_case("smollm2 decode 32 x kv 512", decode_kv_lens=[512] * 32, prefills=[], **smollm2),
        attention_case("smollm2 prefill 512 (fresh)", decode_kv_lens=[], prefills=[(512, 0)], **smollm2),
        routing_case(
            "qwen1.5-moe route 256 tokens", num_tokens=256, num_experts=60, top_k=4, renormalize=False
        ),
        grouped_matmul_case("qwen1.5-moe up 256 tok", num_tokens=256, depth=2048, width=1408, **qwen_moe),
    ]
    if quick:
        return cases
    mixed = [int(x) for x in np.random.default_rng(1).integers(100, 4000, 128)]
    return cases + [
        attention_case("smollm2 decode 256 x kv 2048", decode_kv_lens=[2048] * 256, prefills=[], **smollm2),
        attention_case(
            "smollm2 float32 decode 256 x kv 2048 (bf16 parts)",
            decode_kv_lens=[2048] * 256,
            prefills=[],
            dtype=jnp.float32,
            **smollm2,
        ),
        attention_case("qwen2.5-0.5b decode 128 x kv 100..4000", decode_kv_lens=mixed, prefills=[], **qwen),
        attention_case("qwen2.5-0.5b prefill 2048 (fresh)", decode_kv_lens=[], prefills=[(2048, 0)], **qwen),
        attention_case(
            "qwen2.5-0.5b mixed: 64 decodes + chunk 1024 over 3072",
            decode_kv_lens=[1500] * 64,
            prefills=[(1024, 3072)],
            **qwen,
        ),
        attention_case(
            "qwen2.5-0.5b decode 128 x kv 2048, pages of 64",
            decode_kv_lens=[2048] * 128,
            prefills=[],
            page_size=64,
            **qwen,
        ),
        routing_case(
            "qwen1.5-moe route 8192 tokens", num_tokens=8192, num_experts=60, top_k=4, renormalize=False
        ),
        grouped_matmul_case("qwen1.5-moe up 4096 tok", num_tokens=4096, depth=2048, width=1408, **qwen_moe),
        grouped_matmul_case("qwen1.5-moe down 4096 tok", num_tokens=4096, depth=1408, width=2048, **qwen_moe),
    ]


def report(label: str, seconds: float, case: Case, ceilings: Ceilings) -> str:
    bandwidth = case.bytes_moved / seconds
    share = bandwidth / ceilings.bandwidth
    line = f"  {label:<10}{seconds * 1e3:9.3f} ms {bandwidth / 1e9:9.1f} GB/s ({share:6.1%})"
    if case.flops:
        flops = case.flops / seconds
        line += f" {flops / 1e12:8.2f} TFLOP/s ({flops / ceilings.flops:6.1%})"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, smaller cases (default on CPU)")
    parser.add_argument(
        "--iterations", type=int, default=0, help="timed calls per case (default 20 GPU, 3 CPU)"
    )
    options = parser.parse_args()
    on_gpu = _backend.on_gpu()
    iterations = options.iterations or (20 if on_gpu else 3)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}), JAX {jax.__version__}")
    ceilings = measure_ceilings(on_gpu, iterations)
    print(
        f"ceilings: copy {ceilings.bandwidth / 1e9:.1f} GB/s, "
        f"{ceilings.matmul_dtype} matmul {ceilings.flops / 1e12:.2f} TFLOP/s"
    )
    kernel_note = "" if on_gpu else "the Mosaic GPU kernels need a GPU; timing the XLA references only"
    if kernel_note:
        print(kernel_note)
    for case in build_cases(options.quick or not on_gpu):
        print(case.name)
        print(report("reference", time_fn(case.reference, *case.args, iterations=iterations), case, ceilings))
        if not on_gpu:
            continue
        if case.kernel is None:
            print(f"  kernel    not run: {case.skip_reason}")
            continue
        print(report("kernel", time_fn(case.kernel, *case.args, iterations=iterations), case, ceilings))


if __name__ == "__main__":
    main()
