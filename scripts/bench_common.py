"""What the benchmark scripts share: the prompt generator, statistics, machine facts, output.

`bench_serving.py` and `bench_hf_baseline.py` must send the very same prompts
for their ratios to mean anything, so both draw them here from one seeded
generator: token ids straight from the vocabulary (no tokenizer in the loop,
so a prompt's length is exactly what was asked).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import socket
import statistics
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO_ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"
# Ids below this are special or byte-level tokens in the usual BPE vocabularies; random prompts skip them.
MIN_TOKEN_ID = 100


@dataclasses.dataclass(frozen=True)
class BenchRequest:
    """One prompt of a workload: its token ids, how many tokens to generate, its shared-prefix group."""

    prompt_ids: list[int]
    output_len: int
    group: int = -1  # index of the shared prefix it starts with; -1 when prompts share nothing

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


def sample_random_requests(
    num_prompts: int,
    input_len_range: tuple[int, int],
    output_len_range: tuple[int, int],
    vocab_size: int,
    seed: int,
    shared_prefix_len: int = 0,
    shared_prefix_groups: int = 1,
) -> list[BenchRequest]:
    """Random-token prompts, the same for every script given the same arguments.

    Lengths are uniform in the inclusive ranges. With `shared_prefix_len` N, each
    prompt is one of `shared_prefix_groups` random N-token prefixes (round robin)
    followed by a random suffix whose length is drawn from `input_len_range`.
    """
    low_in, high_in = input_len_range
    low_out, high_out = output_len_range
    if not 1 <= low_in <= high_in:
        raise ValueError(f"input length range must satisfy 1 <= A <= B, got {input_len_range}")
    if not 1 <= low_out <= high_out:
        raise ValueError(f"output length range must satisfy 1 <= A <= B, got {output_len_range}")
    if vocab_size <= MIN_TOKEN_ID:
        raise ValueError(f"vocab size {vocab_size} leaves no ids at or above {MIN_TOKEN_ID}")
    if shared_prefix_len < 0 or shared_prefix_groups < 1:
        raise ValueError("shared prefix length must be >= 0 and groups >= 1")
    rng = np.random.default_rng(seed)
    input_lens = rng.integers(low_in, high_in + 1, size=num_prompts)
    output_lens = rng.integers(low_out, high_out + 1, size=num_prompts)
    prefixes = [
        rng.integers(MIN_TOKEN_ID, vocab_size, size=shared_prefix_len).tolist()
        for _ in range(shared_prefix_groups if shared_prefix_len else 0)
    ]
    requests = []
    for index in range(num_prompts):
        body = rng.integers(MIN_TOKEN_ID, vocab_size, size=int(input_lens[index])).tolist()
        group = index % shared_prefix_groups if prefixes else -1
        prefix = prefixes[group] if prefixes else []
        requests.append(BenchRequest(prefix + body, int(output_lens[index]), group))
    return requests


def add_workload_args(parser: Any) -> None:
    """The flags that define a workload, identical in every script that replays it."""
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len-range", type=int, nargs=2, default=(128, 512), metavar=("A", "B"))
    parser.add_argument("--output-len-range", type=int, nargs=2, default=(64, 64), metavar=("A", "B"))
    parser.add_argument("--seed", type=int, default=0, help="Seed of the prompt generator.")
    parser.add_argument(
        "--shared-prefix-len",
        type=int,
        default=0,
        help="Every prompt starts with an N-token shared prefix (then a suffix of --input-len-range).",
    )
    parser.add_argument(
        "--shared-prefix-groups", type=int, default=1, help="Distinct shared prefixes, assigned round robin."
    )


def check_workload_args(parser: Any, args: Any) -> None:
    """Refuse, as argparse refuses any bad flag, workloads `sample_random_requests` cannot draw."""
    for flag, (low, high) in (
        ("--input-len-range", args.input_len_range),
        ("--output-len-range", args.output_len_range),
    ):
        if not 1 <= low <= high:
            parser.error(f"{flag} A B needs 1 <= A <= B, got {low} {high}")
    if args.num_prompts < 1:
        parser.error(f"--num-prompts must be at least 1, got {args.num_prompts}")
    if args.shared_prefix_len < 0 or args.shared_prefix_groups < 1:
        parser.error("--shared-prefix-len must be at least 0 and --shared-prefix-groups at least 1")


def requests_from_args(args: Any, vocab_size: int) -> list[BenchRequest]:
    """The workload the parsed `add_workload_args` flags describe."""
    return sample_random_requests(
        args.num_prompts,
        tuple(args.input_len_range),
        tuple(args.output_len_range),
        vocab_size,
        args.seed,
        args.shared_prefix_len,
        args.shared_prefix_groups,
    )


def workload_json(args: Any, vocab_size: int) -> dict[str, Any]:
    """The parsed `add_workload_args` flags as a result file records them."""
    return {
        "num_prompts": args.num_prompts,
        "input_len_range": list(args.input_len_range),
        "output_len_range": list(args.output_len_range),
        "shared_prefix_len": args.shared_prefix_len,
        "shared_prefix_groups": args.shared_prefix_groups,
        "seed": args.seed,
        "vocab_size": vocab_size,
    }


def model_config(model_path: str | Path) -> dict[str, Any]:
    """config.json of an HF model folder."""
    return json.loads((Path(model_path) / "config.json").read_text())


def vocab_size_of(model_path: str | Path) -> int:
    """The vocabulary size a random prompt may draw from (the model's embedding rows)."""
    return int(model_config(model_path)["vocab_size"])


def summarize(values: Sequence[float], scale: float = 1.0) -> dict[str, float]:
    """Mean, median, p99, min and max of `values` times `scale` (zeros when empty)."""
    if not values:
        return {"mean": 0.0, "median": 0.0, "p99": 0.0, "min": 0.0, "max": 0.0}
    data = np.asarray(values, dtype=np.float64) * scale
    return {
        "mean": float(data.mean()),
        "median": float(np.median(data)),
        "p99": float(np.percentile(data, 99)),
        "min": float(data.min()),
        "max": float(data.max()),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def code_version() -> str:
    """The commit the figures were taken at, marked dirty when the tree has uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}{'-dirty' if dirty else ''}" if commit else "unknown"


def machine_info() -> dict[str, Any]:
    """What a figure depends on besides the code: the host, its cores and how busy it was."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {
        "hostname": socket.gethostname(),
        "cpu": _cpu_model(),
        "cores": usable,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "code": code_version(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def load_note() -> str:
    """`uptime`-style load averages, printed next to each figure."""
    one, five, fifteen = os.getloadavg()
    return f"load average: {one:.2f}, {five:.2f}, {fifteen:.2f}"


def write_json(path: str | Path | None, payload: dict[str, Any]) -> None:
    """Write a result file (its folder is created), keys in insertion order, and say so; no path,
    no file (a script's `--output-file` is optional)."""
    if path is None:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table (floats to 2 decimals)."""

    def cell(value: Any) -> str:
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells)
    return "\n".join(lines)


def median(values: Sequence[float]) -> float:
    """statistics.median, 0.0 for no values."""
    return statistics.median(values) if values else 0.0
