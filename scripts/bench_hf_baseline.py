"""The peer's figures: the same prompts as bench_serving.py through HF transformers `generate`.

What a user would run without a serving engine: torch on CPU, float32, greedy,
`min_new_tokens = max_new_tokens` so every prompt yields exactly the tokens the
server is asked for. Three measurements, each printed with the load average:

- one at a time: each prompt alone, output tokens / total wall time;
- static batches of `--batch-size` (16), left-padded, every row generating the
  batch's longest output length (the useful tokens are counted);
- batch-1 decode after a `--decode-prompt-len` (128) token prompt: prefill time
  (generate of one token) and decode tok/s = (new - 1) / (total - prefill).

    python scripts/bench_hf_baseline.py --num-prompts 32 --input-len-range 128 512 \\
        --output-len-range 64 64 --output-file hf.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (  # noqa: E402
    DEFAULT_MODEL,
    BenchRequest,
    add_workload_args,
    check_workload_args,
    format_table,
    load_note,
    machine_info,
    model_config,
    requests_from_args,
    sample_random_requests,
    workload_json,
    write_json,
)


def load_model(model_path: str, threads: int) -> tuple[Any, Any]:
    """The HF model in float32 on CPU, eval mode, torch limited to `threads` threads."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.eval()
    return model, torch


def generation_config(model: Any, new_tokens: int) -> Any:
    """Greedy, exactly `new_tokens` new tokens (EOS cannot end a row early)."""
    from transformers import GenerationConfig

    config = model.config
    eos = config.eos_token_id
    pad = config.pad_token_id if config.pad_token_id is not None else (eos if isinstance(eos, int) else 0)
    return GenerationConfig(
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=pad,
        eos_token_id=eos,
        use_cache=True,
    )


def generate(model: Any, torch: Any, rows: list[list[int]], new_tokens: int) -> tuple[float, int]:
    """Left-pad `rows` into one batch and generate; returns (seconds, new tokens per row)."""
    config = generation_config(model, new_tokens)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), config.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, width - len(row) :] = 1
    with torch.inference_mode():
        start = time.perf_counter()
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
        seconds = time.perf_counter() - start
    return seconds, int(output.shape[1] - width)


def run_single(model: Any, torch: Any, requests: list[BenchRequest]) -> dict[str, Any]:
    """Each prompt alone, in order; throughput over the whole sequence of calls."""
    total_s, output_tokens, input_tokens = 0.0, 0, 0
    for index, request in enumerate(requests):
        seconds, produced = generate(model, torch, [request.prompt_ids], request.output_len)
        if produced != request.output_len:
            raise RuntimeError(f"prompt {index}: {produced} tokens generated, {request.output_len} asked")
        total_s += seconds
        output_tokens += produced
        input_tokens += request.prompt_len
        print(f"  single {index + 1}/{len(requests)}: {produced / seconds:.2f} tok/s", flush=True)
    return {
        "requests": len(requests),
        "duration_s": total_s,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "output_throughput": output_tokens / total_s,
        "total_throughput": (input_tokens + output_tokens) / total_s,
        "load": load_note(),
    }


def run_batches(model: Any, torch: Any, requests: list[BenchRequest], batch_size: int) -> dict[str, Any]:
    """Static batches in prompt order, left-padded; the useful tokens are those each prompt asked for."""
    total_s, useful, generated, input_tokens = 0.0, 0, 0, 0
    for start in range(0, len(requests), batch_size):
        batch = requests[start : start + batch_size]
        new_tokens = max(r.output_len for r in batch)
        seconds, produced = generate(model, torch, [r.prompt_ids for r in batch], new_tokens)
        total_s += seconds
        useful += sum(r.output_len for r in batch)
        generated += produced * len(batch)
        input_tokens += sum(r.prompt_len for r in batch)
        print(f"  batch of {len(batch)}: {produced * len(batch) / seconds:.2f} tok/s", flush=True)
    return {
        "requests": len(requests),
        "batch_size": batch_size,
        "duration_s": total_s,
        "input_tokens": input_tokens,
        "output_tokens": useful,
        "generated_tokens": generated,
        "output_throughput": useful / total_s,
        "total_throughput": (input_tokens + useful) / total_s,
        "load": load_note(),
    }


def run_decode(
    model: Any, torch: Any, vocab: int, seed: int, prompt_len: int, new_tokens: int, repeats: int
) -> dict[str, Any]:
    """Batch-1 decode rate after a prompt: medians of `repeats` prefill-only and full generations."""
    prompt = sample_random_requests(1, (prompt_len, prompt_len), (1, 1), vocab, seed + 7)[0].prompt_ids
    prefill = statistics.median(generate(model, torch, [prompt], 1)[0] for _ in range(repeats))
    total = statistics.median(generate(model, torch, [prompt], new_tokens)[0] for _ in range(repeats))
    return {
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "prefill_s": prefill,
        "total_s": total,
        "decode_tok_s": (new_tokens - 1) / (total - prefill),
        "load": load_note(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-path", default=str(DEFAULT_MODEL))
    add_workload_args(parser)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--modes", nargs="+", choices=("single", "batch", "decode"), default=["single", "batch", "decode"]
    )
    parser.add_argument(
        "--single-prompts", type=int, default=None, help="Run one-at-a-time on the first N prompts only."
    )
    parser.add_argument("--decode-prompt-len", type=int, default=128)
    parser.add_argument("--decode-new-tokens", type=int, default=128)
    parser.add_argument("--decode-repeats", type=int, default=2)
    parser.add_argument("--output-file", default=None)
    args = parser.parse_args(argv)
    check_workload_args(parser, args)

    import transformers

    model, torch = load_model(args.model_path, args.threads)
    vocab = int(model_config(args.model_path)["vocab_size"])
    requests = requests_from_args(args, vocab)
    generate(model, torch, [requests[0].prompt_ids[:16]], 4)  # first-call overheads out of the figures
    result: dict[str, Any] = {
        "peer": f"HF transformers {transformers.__version__} + torch {torch.__version__}",
        "model_path": args.model_path,
        "threads": args.threads,
        "machine": machine_info(),
        "workload": workload_json(args, vocab),
    }
    rows = []
    if "single" in args.modes:
        subset = requests[: args.single_prompts] if args.single_prompts else requests
        result["single"] = run_single(model, torch, subset)
        rows.append(
            ["one at a time", len(subset), result["single"]["output_throughput"], result["single"]["load"]]
        )
    if "batch" in args.modes:
        result["batch"] = run_batches(model, torch, requests, args.batch_size)
        label = f"static batches of {args.batch_size}"
        rows.append([label, len(requests), result["batch"]["output_throughput"], result["batch"]["load"]])
    if "decode" in args.modes:
        result["decode"] = run_decode(
            model,
            torch,
            vocab,
            args.seed,
            args.decode_prompt_len,
            args.decode_new_tokens,
            args.decode_repeats,
        )
        decode = result["decode"]
        label = f"batch-1 decode after {args.decode_prompt_len} (prefill {decode['prefill_s']:.3f} s)"
        rows.append([label, 1, decode["decode_tok_s"], decode["load"]])
    print(result["peer"], f"{args.threads} threads,", Path(args.model_path).name)
    print(format_table(["mode", "prompts", "output tok/s", "load"], rows))
    write_json(args.output_file, result)
    return result


if __name__ == "__main__":
    main()
