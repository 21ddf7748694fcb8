"""Where a serving process's Python threads spend their time, from a py-spy recording.

    py-spy record -p PID --gil --nonblocking --threads --format raw -o host.txt -d 5 -r 500
    python scripts/host_profile_summary.py host.txt [--top 15] [--lines]

py-spy's raw format is one collapsed stack per line (`thread;frame;...;frame COUNT`).
For each thread this prints its share of the samples, then the functions it spends
the most samples in: inclusive (the function and what it calls) and self (the
innermost frame). With `--gil` only the thread holding the GIL is sampled (py-spy's
idle detection counts waits too): that is the Python work the scheduler thread and
the event loop take turns at, which a decode step waits on once the device is
fast; with `--idle` instead, every thread's wall time, waits included (where a
thread sits in a call that released the GIL: a dispatch, a transfer, a lock).
`--lines` keeps each frame's file:line, to tell apart the calls of one function
(docs/profiling.md). Record the server with `--subprocesses`: the scheduler runs in the
engine's process, a child of the HTTP one; each thread is then named with its process id.
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

# py-spy --subprocesses starts each stack with the process chain, `process PID:"COMMAND";` per
# level; a command line may hold `;` and `"` itself, so each ends where the next level or the
# thread begins.
PROCESS_PREFIX = re.compile(r'(?:process (\d+):".*?";(?=process \d+:"|thread \())*')


def read_stacks(path: Path, lines: bool = False) -> list[tuple[str, list[str], int]]:
    """`(thread, frames outermost first, samples)` of each line; frames lose their file:line
    unless `lines`. With --subprocesses, a thread is named with its process's id."""
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        processes = PROCESS_PREFIX.match(stack)
        thread, *frames = stack[processes.end() :].split(";")
        if processes.group(1):
            thread = f"process {processes.group(1)} {thread}"
        stacks.append((thread, [frame if lines else frame.split(" (")[0] for frame in frames], int(count)))
    return stacks


def summarize(stacks: list[tuple[str, list[str], int]], top: int) -> str:
    total = sum(count for _, _, count in stacks) or 1
    per_thread: dict[str, int] = collections.Counter()
    inclusive: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    own: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for thread, frames, count in stacks:
        per_thread[thread] += count
        for frame in set(frames):
            inclusive[thread][frame] += count
        if frames:
            own[thread][frames[-1]] += count
    lines = [f"{total} samples"]
    for thread, samples in per_thread.most_common():
        lines.append(f"\n{thread}: {samples} samples ({samples / total:.0%})")
        for title, table in (("inclusive", inclusive[thread]), ("self", own[thread])):
            lines.append(f"  {title}:")
            lines += [f"    {n:6d} {n / samples:5.0%}  {frame}" for frame, n in table.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("recording", type=Path, help="py-spy record --format raw output")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--lines", action="store_true", help="keep each frame's file:line")
    args = parser.parse_args()
    print(summarize(read_stacks(args.recording, args.lines), args.top))


if __name__ == "__main__":
    main()
