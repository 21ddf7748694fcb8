"""Output throughput of the engine in this process, with no HTTP server, on bench_serving's workload.

Beside `bench_serving.py --launch` on the same machine and the same flags, the
difference is what serving adds to a step: the HTTP layer (the event loop's
SSE streams, which share the GIL with the scheduler thread), the request
parsing and the per-request output work of the server. On a GPU the served
batch-64 loop is host-bound (docs/benchmarks.md), and this splits that host
time between the engine's own loop and the server around it.

All prompts go to `Engine.generate` at once, greedy, ignoring EOS, as
`bench_serving.py` sends them with an infinite request rate:

    python scripts/bench_offline.py --model-path M --server-args "--max-total-tokens 24576" \\
        --num-prompts 32 --input-len-range 32 256 --output-len-range 256 256 --warmup-pass
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_common import (  # noqa: E402
    DEFAULT_MODEL,
    add_workload_args,
    format_table,
    load_note,
    machine_info,
    requests_from_args,
    vocab_size_of,
    workload_json,
    write_json,
)


def run_pass(engine: Any, workload: list) -> tuple[float, int]:
    """One pass of the whole workload: its wall time and the output tokens it produced."""
    params = [{"temperature": 0.0, "max_new_tokens": r.output_len, "ignore_eos": True} for r in workload]
    started = time.perf_counter()
    outputs = engine.generate(input_ids=[r.prompt_ids for r in workload], sampling_params=params)
    elapsed = time.perf_counter() - started
    return elapsed, sum(o["meta_info"]["completion_tokens"] for o in outputs)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-path", default=str(DEFAULT_MODEL))
    parser.add_argument("--server-args", default="", help="The server's flags, one string.")
    add_workload_args(parser)
    parser.add_argument("--warmup-pass", action="store_true", help="Run the workload once unmeasured first.")
    parser.add_argument(
        "--repeats", type=int, default=1, help="Measured passes (prefix cache flushed before each)."
    )
    parser.add_argument("--output-file", default=None)
    args = parser.parse_args(argv)

    from runtime.engine import Engine
    from runtime.server_args import parse_server_args

    server_args = parse_server_args(["--model-path", args.model_path, *shlex.split(args.server_args)])
    vocab = vocab_size_of(args.model_path)
    workload = requests_from_args(args, vocab)
    started = time.monotonic()
    engine = Engine(server_args)
    ready = time.monotonic() - started
    passes = []
    try:
        if args.warmup_pass:
            run_pass(engine, workload)
        for _ in range(args.repeats):
            engine.flush_cache()
            programs_before = engine.num_compiled_programs
            load = load_note()
            elapsed, tokens = run_pass(engine, workload)
            passes.append(
                {
                    "duration_s": elapsed,
                    "output_tokens": tokens,
                    "output_throughput": tokens / elapsed,
                    "programs_compiled": engine.num_compiled_programs - programs_before,
                    "load": load,
                }
            )
    finally:
        engine.shutdown()
    result = {
        "model_path": args.model_path,
        "server_args": args.server_args,
        "machine": machine_info(),
        "start_to_ready_s": ready,
        "workload": {**workload_json(args, vocab), "warmup_pass": args.warmup_pass},
        "passes": passes,
    }
    rows = [
        [
            i + 1,
            p["output_tokens"],
            f"{p['duration_s']:.2f}",
            f"{p['output_throughput']:.2f}",
            p["programs_compiled"],
        ]
        for i, p in enumerate(passes)
    ]
    print(format_table(["pass", "output tokens", "seconds", "output tok/s", "compiled"], rows))
    print(f"engine ready in {ready:.1f} s; {load_note()}")
    write_json(args.output_file, result)
    return result


if __name__ == "__main__":
    main()
