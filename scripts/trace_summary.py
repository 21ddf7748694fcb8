"""Where a traced step's time goes: the busiest timelines of a jax.profiler trace, op by op.

    python scripts/trace_summary.py TRACE_DIR_OR_FILE [--steps N] [--top 20]

Reads the Chrome trace-event file (`*.trace.json.gz`) that `jax.profiler`
writes beside its `.xplane.pb` (under `plugins/profile/<run>/`; from
`/start_profile` or `bench_one_batch.py --profile-dir`). For each timeline of
the device (on a GPU, its streams: one event per kernel) or, on a CPU, of
XLA's own threads, it prints the busy time, the number of events, and the
events that take the most time in all, per step when `--steps` is given. The
Python threads' events (the host loop) are left out: they nest, and their sum
means nothing.
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any


def find_trace(path: Path) -> Path:
    if path.is_file():
        return path
    traces = sorted(path.rglob("*.trace.json.gz"))
    if not traces:
        raise SystemExit(f"no *.trace.json.gz under {path}")
    return traces[-1]  # the latest run


def timelines(events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Complete events by "process / thread", device timelines first, host XLA threads if none."""
    processes = {
        e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e["name"] == "process_name"
    }
    threads = {
        (e["pid"], e["tid"]): e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e["name"] == "thread_name"
    }
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for event in events:
        if event.get("ph") != "X" or "dur" not in event:
            continue
        process = processes.get(event["pid"], str(event["pid"]))
        thread = threads.get((event["pid"], event["tid"]), str(event["tid"]))
        grouped[f"{process} / {thread}"].append(event)
    device = {name: evs for name, evs in grouped.items() if "/device:" in name}
    if device:
        return device
    return {name: evs for name, evs in grouped.items() if "XLA" in name.split(" / ")[-1]}


def summarize(events: list[dict[str, Any]], steps: int, top: int) -> list[str]:
    total: Counter[str] = Counter()
    count: Counter[str] = Counter()
    events = [e for e in events if not e["name"].startswith("ThunkExecutor")]  # CPU: wrappers of the ops
    for event in events:
        total[event["name"]] += event["dur"]
        count[event["name"]] += 1
    busy = sum(total.values())
    span = max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)
    per = f" per step (of {steps})" if steps > 1 else ""
    lines = [
        f"  busy {busy / steps / 1e3:.3f} ms{per} over a span of {span / steps / 1e3:.3f} ms; "
        f"{len(events) / steps:.0f} events{per}"
    ]
    for name, micros in total.most_common(top):
        share = micros / busy if busy else 0.0
        lines.append(
            f"  {micros / steps / 1e3:9.3f} ms {share:6.1%} {count[name] / steps:7.1f}x  {name[:110]}"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--steps", type=int, default=1, help="Steps in the trace: figures are per step.")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--timelines", type=int, default=4, help="How many of the busiest timelines to show.")
    args = parser.parse_args(argv)
    trace = find_trace(args.path)
    with gzip.open(trace, "rt") as handle:
        data = json.load(handle)
    events = data["traceEvents"] if isinstance(data, dict) else data
    print(f"{trace}")
    busiest = sorted(timelines(events).items(), key=lambda item: -sum(e["dur"] for e in item[1]))
    for name, timeline in busiest[: args.timelines]:
        print(name)
        print("\n".join(summarize(timeline, args.steps, args.top)))


if __name__ == "__main__":
    main()
