"""Smoke test of scripts/bench_one_batch.py on the tiny model: it runs, prints its table, fills its JSON.

No timing is asserted (a shared two-core machine); what is checked is that every
case ran with the scheduler's bucket shapes and that both roofline sources work.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import bench_one_batch  # noqa: E402
import trace_summary  # noqa: E402


@pytest.mark.parametrize("given_roofline", [True, False])
def test_bench_one_batch_runs_every_case(tiny_llama_path, tmp_path, capsys, given_roofline):
    output = tmp_path / "one_batch.json"
    argv = ["--model-path", str(tiny_llama_path), "--decode-batches", "1", "3", "--prefill-cases", "2x20"]
    argv += ["--mixed-cases", "2+1x16", "--iters", "2", "--warmup", "1", "--repeats", "1"]
    argv += ["--output-file", str(output)]
    if given_roofline:
        argv += ["--skip-machine", "--bandwidth", "10", "--matmul-rate", "100"]
    payload = bench_one_batch.main(argv)
    assert [case["case"] for case in payload["cases"]] == [
        "decode b=1",
        "decode b=3",
        "prefill 2x20",
        "mixed 2+1x16",
    ]
    assert [case["real_tokens"] for case in payload["cases"]] == [1, 3, 40, 18]
    for case in payload["cases"]:
        assert case["padded_tokens"] >= case["real_tokens"] and case["ms_pipelined"] > 0
        assert case["bandwidth_floor_ms"] > 0 and case["gflop_s"] > 0
    machine = payload["machine"]
    assert machine["bandwidth_gb_s"] == 10 if given_roofline else machine["bandwidth_gb_s"] > 0
    assert json.loads(output.read_text())["cases"] == payload["cases"]
    assert "decode b=3" in capsys.readouterr().out


@pytest.mark.parametrize("pipelined", [False, True])
def test_traced_steps_summarise_op_by_op(tiny_llama_path, tmp_path, capsys, pipelined):
    argv = ["--model-path", str(tiny_llama_path), "--decode-batches", "2", "--prefill-cases", "--mixed-cases"]
    argv += ["--iters", "2", "--warmup", "1", "--skip-machine", "--bandwidth", "10", "--matmul-rate", "100"]
    argv += ["--profile-dir", str(tmp_path), "--profile-steps", "3"] + ["--profile-pipelined"] * pipelined
    bench_one_batch.main(argv)
    traces = list((tmp_path / "decode_b=2").rglob("*.trace.json.gz"))
    assert len(traces) == 1
    capsys.readouterr()
    trace_summary.main([str(tmp_path / "decode_b=2"), "--steps", "3", "--top", "5"])
    out = capsys.readouterr().out
    assert "busy" in out and "per step (of 3)" in out
    assert "ThunkExecutor" not in out  # wrappers of the ops, left out
