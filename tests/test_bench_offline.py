"""Smoke test of scripts/bench_offline.py on the tiny model (no timing asserted)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests import fixture_spec as spec

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bench_common  # noqa: E402
import bench_offline  # noqa: E402


def test_bench_offline_counts_every_token_and_writes_its_result(tmp_path, capsys):
    folder = spec.models_dir() / "tiny-llama"
    if not (folder / "config.json").is_file():
        pytest.skip(f"{folder} missing: run `make fixtures`")
    out = tmp_path / "offline.json"
    args = [
        "--model-path",
        str(folder),
        "--server-args",
        " ".join(
            [
                "--max-total-tokens 2048 --max-running-requests 4 --chunked-prefill-size 64",
                *spec.compile_level_flags(folder),
            ]
        ),
        "--num-prompts",
        "6",
        "--input-len-range",
        "5",
        "40",
        "--output-len-range",
        "3",
        "9",
        "--warmup-pass",
        "--repeats",
        "2",
        "--output-file",
        str(out),
    ]
    result = bench_offline.main(args)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    workload = bench_common.sample_random_requests(
        6, (5, 40), (3, 9), bench_common.vocab_size_of(folder), seed=0
    )
    expected = sum(r.output_len for r in workload)
    assert [p["output_tokens"] for p in result["passes"]] == [expected, expected]
    # the warm pass compiled what the measured passes run
    assert all(p["programs_compiled"] == 0 and p["output_throughput"] > 0 for p in result["passes"])
    # at least one step per token of the longest request; the scheduler's CPU clock read (Linux)
    assert all(p["steps"] >= max(r.output_len for r in workload) for p in result["passes"])
    assert all(p["scheduler_cpu_ms_per_step"] > 0 for p in result["passes"])
    assert all(p["dispatch_cpu_ms_per_step"] is None for p in result["passes"])  # a CPU has none
    assert "output tok/s" in capsys.readouterr().out
    threaded = [*args[:3], args[3] + " --dispatch-thread on", *args[4:-2]]
    streamed = bench_offline.main([*threaded, "--stream", "--repeats", "1"])
    assert [p["output_tokens"] for p in streamed["passes"]] == [expected]
    assert streamed["workload"]["stream"] is True
    assert all(p["dispatch_cpu_ms_per_step"] > 0 for p in streamed["passes"])
    constrained = bench_offline.main(
        [*args[:-2], "--repeats", "1", "--regex", "[a-z ]+", "--constrained", "4"]
    )
    assert [p["output_tokens"] for p in constrained["passes"]] == [expected]  # EOS banned to the end
    assert constrained["workload"]["constrained"] == 4
