"""Output throughput of the engine in this process, with no HTTP server, on bench_serving's workload.

Beside `bench_serving.py --launch` on the same machine and the same flags, the
difference is what serving adds to a step: the pipe to the HTTP process and
the HTTP layer (request parsing, the SSE streams). `--stream` has every request
stream, its outputs taken as the server's engine process takes them (what is
new since the previous output, every step). Each pass also reports the
scheduler thread's CPU time per step: the host loop's own work (scheduling,
dispatch, reading tokens back, building outputs), which on a GPU must stay
under the device step for the device to stay busy; with a dispatch thread
(`--dispatch-thread`, a GPU's default), the forward's dispatch is that thread's
CPU time, reported apart.

All prompts go to the engine at once, greedy, ignoring EOS, as
`bench_serving.py` sends them with an infinite request rate:

    python scripts/bench_offline.py --model-path M --server-args "--max-total-tokens 24576" \\
        --num-prompts 32 --input-len-range 32 256 --output-len-range 256 256 --warmup-pass

`--regex R --constrained N` has the first N requests follow a regex (structured output), for
its cost beside the unconstrained ones.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_common import (  # noqa: E402
    DEFAULT_MODEL,
    add_workload_args,
    check_workload_args,
    format_table,
    load_note,
    machine_info,
    requests_from_args,
    vocab_size_of,
    workload_json,
    write_json,
)

# A streamed pass gives up after this long (a lost final output would hang it).
STREAM_TIMEOUT_S = 3600


def pass_params(workload: list, regex: str | None = None, constrained: int = 0) -> list[dict[str, Any]]:
    """Each request's sampling parameters: greedy, ignoring EOS; the first `constrained` follow
    `regex`, with EOS banned until their length instead (an EOS the grammar accepts would end them
    early, whatever ignore_eos says)."""
    params = [{"temperature": 0.0, "max_new_tokens": r.output_len, "ignore_eos": True} for r in workload]
    for p in params[:constrained] if regex else ():
        p.update(regex=regex, ignore_eos=False, min_new_tokens=p["max_new_tokens"])
    return params


def run_pass(engine: Any, workload: list, stream: bool, params: list[dict[str, Any]]) -> tuple[float, int]:
    """One pass of the whole workload: its wall time and the output tokens it produced.

    With `stream`, every request streams, and its outputs reach a callback as they reach the
    server's engine process (what is new since the previous output, every step)."""
    started = time.perf_counter()
    if not stream:
        outputs = engine.generate(input_ids=[r.prompt_ids for r in workload], sampling_params=params)
        return time.perf_counter() - started, sum(o["meta_info"]["completion_tokens"] for o in outputs)
    from runtime.io_struct import EngineRequest
    from runtime.sampling_params import SamplingParams

    finished: list = []
    done = threading.Event()

    def collect(delta: Any) -> None:
        output = delta[0]
        if output.finished:
            if output.error:
                print(f"request {output.rid} failed: {output.error}", file=sys.stderr)
            finished.append(output.completion_tokens)
            if len(finished) == len(workload):
                done.set()

    for r, p in zip(workload, params, strict=True):
        request = EngineRequest(
            rid=uuid.uuid4().hex,
            input_ids=r.prompt_ids,
            sampling_params=SamplingParams.from_dict(p),
            stream=True,
        )
        # as the engine's process takes them: deltas, text left to the HTTP process
        engine.submit(request, collect, deltas=True, detokenize=False)
    if not done.wait(STREAM_TIMEOUT_S):
        raise TimeoutError(f"{len(workload) - len(finished)} streamed requests did not finish")
    return time.perf_counter() - started, sum(finished)


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
    parser.add_argument(
        "--stream",
        action="store_true",
        help="Stream every request (as the served benchmark does): an output a step per request.",
    )
    parser.add_argument("--regex", default=None, help="Constrain requests to this regex (structured output).")
    parser.add_argument(
        "--constrained", type=int, default=None, help="How many requests follow --regex (default: all)."
    )
    parser.add_argument("--output-file", default=None)
    args = parser.parse_args(argv)
    check_workload_args(parser, args)

    from runtime.engine import Engine
    from runtime.server_args import parse_server_args

    server_args = parse_server_args(["--model-path", args.model_path, *shlex.split(args.server_args)])
    vocab = vocab_size_of(args.model_path)
    workload = requests_from_args(args, vocab)
    constrained = len(workload) if args.constrained is None else args.constrained
    params = pass_params(workload, args.regex, constrained)
    started = time.monotonic()
    engine = Engine(server_args)
    ready = time.monotonic() - started
    passes = []
    try:
        if args.warmup_pass:
            run_pass(engine, workload, args.stream, params)
            # Steps of the warm pass that borrowed a larger program queued their own: those finish
            # now, not inside a measured pass.
            engine.runner.wait_for_background_compiles()
        scheduler = engine.scheduler
        for _ in range(args.repeats):
            engine.flush_cache()
            programs_before = engine.num_compiled_programs
            load = load_note()
            steps_before, cpu_before = scheduler.num_steps, scheduler.thread_cpu_time()
            dispatch_before = scheduler.dispatch_thread_cpu_time()
            elapsed, tokens = run_pass(engine, workload, args.stream, params)
            steps = scheduler.num_steps - steps_before
            cpu, dispatch = scheduler.thread_cpu_time(), scheduler.dispatch_thread_cpu_time()
            passes.append(
                {
                    "duration_s": elapsed,
                    "output_tokens": tokens,
                    "output_throughput": tokens / elapsed,
                    "programs_compiled": engine.num_compiled_programs - programs_before,
                    "steps": steps,
                    "wall_ms_per_step": 1000 * elapsed / max(steps, 1),
                    # the host work of the loop: scheduling, dispatch, reading tokens back, outputs
                    "scheduler_cpu_ms_per_step": (
                        None if cpu is None else 1000 * (cpu - cpu_before) / max(steps, 1)
                    ),
                    # the forward's dispatch, where a thread of its own makes it (`--dispatch-thread`)
                    "dispatch_cpu_ms_per_step": (
                        None
                        if dispatch is None
                        else 1000 * (dispatch - (dispatch_before or 0.0)) / max(steps, 1)
                    ),
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
        "workload": {
            **workload_json(args, vocab),
            "warmup_pass": args.warmup_pass,
            "stream": args.stream,
            "regex": args.regex,
            "constrained": constrained if args.regex else 0,
        },
        "passes": passes,
    }
    rows = [
        [
            i + 1,
            p["output_tokens"],
            f"{p['duration_s']:.2f}",
            f"{p['output_throughput']:.2f}",
            p["programs_compiled"],
            p["steps"],
            f"{p['wall_ms_per_step']:.3f}",
            "-" if p["scheduler_cpu_ms_per_step"] is None else f"{p['scheduler_cpu_ms_per_step']:.3f}",
            "-" if p["dispatch_cpu_ms_per_step"] is None else f"{p['dispatch_cpu_ms_per_step']:.3f}",
        ]
        for i, p in enumerate(passes)
    ]
    headers = ["pass", "output tokens", "seconds", "output tok/s", "compiled", "steps", "ms/step"]
    print(format_table([*headers, "scheduler CPU ms/step", "dispatch CPU ms/step"], rows))
    print(f"engine ready in {ready:.1f} s; {load_note()}")
    write_json(args.output_file, result)
    return result


if __name__ == "__main__":
    main()
