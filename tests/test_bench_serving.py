"""Smoke test of scripts/bench_serving.py against a real server (tiny model, tiny workload).

No timing is asserted: on a shared two-core machine timings say nothing. What
is checked is that the load generator talks to both APIs, counts every token,
fills every field of its JSON result, and sees prefix-cache hits as such.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import fixture_spec as spec

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bench_common  # noqa: E402
import bench_serving  # noqa: E402

SERVER_FLAGS = [
    "--max-total-tokens",
    "2048",
    "--max-running-requests",
    "4",
    "--chunked-prefill-size",
    "64",
    "--log-level",
    "warning",
]
METRIC_KEYS = {
    "completed",
    "failed",
    "duration_s",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "input_throughput",
    "output_throughput",
    "total_throughput",
    "ttft_ms",
    "itl_ms",
    "tpot_ms",
    "e2e_latency_ms",
}
STAT_KEYS = {"mean", "median", "p99"}


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    folder = spec.models_dir() / "tiny-llama"
    if not (folder / "config.json").is_file():
        pytest.skip(f"{folder} missing: run `make fixtures`")
    flags = [*SERVER_FLAGS, *spec.compile_level_flags(folder)]
    server = bench_serving.LaunchedServer(str(folder), flags, log=None)
    try:
        ready = server.wait_ready(timeout=300)
        assert ready > 0
        yield server.base_url
    finally:
        server.stop()
    assert server.process.poll() is not None


def run_bench(tmp_path: Path, url: str, *extra: str) -> dict[str, Any]:
    out = tmp_path / "result.json"
    argv = ["--base-url", url, "--num-prompts", "3", "--input-len-range", "8", "24"]
    argv += ["--output-len-range", "4", "6", "--disable-tqdm", "--output-file", str(out), *extra]
    returned = bench_serving.main(argv)
    written = json.loads(out.read_text())
    assert written["metrics"] == json.loads(json.dumps(returned["metrics"]))
    return written


def check_result(result: dict[str, Any], backend: str, prefix_len: int = 0) -> None:
    assert result["backend"] == backend
    assert result["errors"] == []
    metrics = result["metrics"]
    assert METRIC_KEYS <= metrics.keys()
    for key in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_latency_ms"):
        assert STAT_KEYS <= metrics[key].keys()
    assert metrics["completed"] == 3 and metrics["failed"] == 0
    assert metrics["total_output_tokens"] == metrics["total_output_tokens_requested"]
    for request in result["requests"]:
        assert request["success"]
        assert 8 + prefix_len <= request["prompt_len"] <= 24 + prefix_len
        assert 4 <= request["output_len"] <= 6
        assert 0 < request["ttft_s"] <= request["latency_s"]
    assert {"cores", "loadavg"} <= result["machine"].keys()
    assert result["workload"]["num_prompts"] == 3


def test_workload_is_seeded() -> None:
    args = (5, (10, 20), (3, 4), 1000, 7)
    first = bench_common.sample_random_requests(*args)
    assert first == bench_common.sample_random_requests(*args)
    assert first != bench_common.sample_random_requests(*args[:-1], 8)
    for request in first:
        assert 10 <= request.prompt_len <= 20 and 3 <= request.output_len <= 4
        assert all(bench_common.MIN_TOKEN_ID <= t < 1000 for t in request.prompt_ids)
    shared = bench_common.sample_random_requests(*args, shared_prefix_len=6, shared_prefix_groups=2)
    assert [r.group for r in shared] == [0, 1, 0, 1, 0]
    assert shared[0].prompt_ids[:6] == shared[2].prompt_ids[:6] != shared[1].prompt_ids[:6]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--input-len-range", "16", "8"], "--input-len-range A B needs 1 <= A <= B, got 16 8"),
        (["--output-len-range", "0", "0"], "--output-len-range A B needs 1 <= A <= B, got 0 0"),
        (["--num-prompts", "0"], "--num-prompts must be at least 1"),
        (["--extra-request-body", "notjson"], "--extra-request-body must be a JSON object"),
    ],
)
def test_a_workload_it_cannot_draw_is_a_usage_error(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench_serving.parse_args(["--base-url", "http://127.0.0.1:1", *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_native_backend(base_url: str, tmp_path: Path) -> None:
    result = run_bench(tmp_path, base_url)
    check_result(result, "sglax")
    assert "programs_compiled_during_run" in result["server_info"]


def test_a_warm_up_pass_leaves_nothing_compiling_for_the_measured_one(base_url: str, tmp_path: Path) -> None:
    result = run_bench(tmp_path, base_url, "--warmup-pass")
    check_result(result, "sglax")
    assert result["workload"]["warmup_pass"]
    assert result["server_info"]["pending_compiles_at_start"] == 0


def test_openai_backend(base_url: str, tmp_path: Path) -> None:
    check_result(run_bench(tmp_path, base_url, "--backend", "openai", "--request-rate", "20"), "openai")


def test_shared_prefix_hits(base_url: str, tmp_path: Path) -> None:
    """One at a time after a flush: the first request computes the prefix, the next two reuse it."""
    result = run_bench(tmp_path, base_url, "--shared-prefix-len", "32", "--max-concurrency", "1")
    check_result(result, "sglax", prefix_len=32)
    metrics = result["metrics"]
    assert metrics["ttft_cold_ms"]["count"] == 1
    assert metrics["ttft_hit_ms"]["count"] == 2
    assert [r["cached_tokens"] for r in result["requests"]][1:] == [32, 32]
