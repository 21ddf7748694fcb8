"""Data parallelism (`--dp-size 2`): a real server of two engine replicas, against HF's outputs and
against what one engine answers, on the routes that concern both replicas."""

from __future__ import annotations

import concurrent.futures
import csv
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.engine import Engine
from runtime.server_args import ServerArgs
from server.replicas import EngineReplicas, merge_stats, replica_devices
from server.utils import find_free_port
from tests import fixture_spec as spec
from tests.conftest import greedy_agrees, load_reference, prompts_of
from tests.server_helpers import ServerProcess, generate_batch_ids, start_server, wait_idle


def test_each_replica_gets_its_own_gpus() -> None:
    assert replica_devices(0, 1, None) == "0" and replica_devices(1, 1, None) == "1"
    assert replica_devices(1, 2, None) == "2,3"
    assert replica_devices(1, 2, "4,5,6,7") == "6,7"  # among the GPUs the server was given


def test_statistics_add_up() -> None:
    """Counts summed, the token usage weighted by pages (cached pages are not in use), a figure
    all replicas share kept as it is (an int stays one), others averaged."""
    one = {"num_running_reqs": 2, "num_total_pages": 30, "token_usage": 0.5, "cache_hit_rate": 0.5}
    two = {"num_running_reqs": 1, "num_total_pages": 10, "token_usage": 0.1, "cache_hit_rate": 0.0}
    for stats in (one, two):
        stats["max_req_input_len"] = 2047
    two["max_total_num_tokens"], one["max_total_num_tokens"] = 1024, 4096  # pools of two sizes
    merged = merge_stats([one, two])
    assert merged["max_total_num_tokens"] == 1024  # what one request may use anywhere
    assert merged["num_running_reqs"] == 3 and merged["num_total_pages"] == 40
    assert merged["token_usage"] == pytest.approx((0.5 * 30 + 0.1 * 10) / 40)
    assert merged["cache_hit_rate"] == 0.25
    assert merged["max_req_input_len"] == 2047 and isinstance(merged["max_req_input_len"], int)
    assert merged["replicas"] == [one, two]


def test_an_engine_is_one_replica() -> None:
    with pytest.raises(ValueError, match="an Engine is one replica"):
        Engine(model_path=str(spec.models_dir() / spec.TINY_LLAMA), dp_size=2)


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    logs = tmp_path_factory.mktemp("dp")
    server = start_server(spec.models_dir() / spec.TINY_LLAMA, "--dp-size", "2", log_dir=logs, cwd=logs)
    yield server
    server.stop()


def test_two_replicas_serve_hf_greedy_tokens_side_by_side(two: ServerProcess) -> None:
    """Requests sent together spread over both replicas (each serves some), and every answer is
    HF's greedy tokens."""
    ref = load_reference(spec.TINY_LLAMA)
    prompts = prompts_of(ref)
    n = len(ref["greedy_0"])
    answers: dict[int, list[int]] = {}

    def ask(i: int) -> None:
        answers[i] = generate_batch_ids(two, [prompts[i % len(prompts)]], n)[0]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    for i, ids in answers.items():
        k = i % len(prompts)
        result = greedy_agrees(ids, ref[f"greedy_{k}"], ref[f"greedy_margin_{k}"])
        assert result, f"request {i}: {result}"
    info = wait_idle(two)
    assert info["dp_size"] == 2 and len(info["replicas"]) == 2
    assert all(replica["num_steps"] > 0 for replica in info["replicas"]), info["replicas"]
    assert info["num_total_pages"] == sum(r["num_total_pages"] for r in info["replicas"])
    assert info["num_free_pages"] + info["num_cached_pages"] == info["num_total_pages"]


def test_replicas_draw_samples_of_their_own(two: ServerProcess) -> None:
    """Each replica seeds its requests from a seed of its own: n samples spread over both
    replicas (round robin) are n different ones, as on one engine."""
    body = {"input_ids": [5, 6, 7], "sampling_params": {"temperature": 1.0, "max_new_tokens": 8, "n": 4}}
    for _ in range(2):
        r = two.post("/generate", {**body, "return_logprob": True})
        assert r.status_code == 200, r.text
        samples = [tuple(e[1] for e in a["meta_info"]["output_token_logprobs"]) for a in r.json()]
        assert len(set(samples)) == 4, samples


def test_an_abort_reaches_the_replica_running_the_request(two: ServerProcess) -> None:
    body = {
        "input_ids": [5, 6, 7],
        "rid": "long-one",
        "sampling_params": {"max_new_tokens": 1500, "ignore_eos": True, "temperature": 0.5},
    }
    answers: list = []
    thread = threading.Thread(target=lambda: answers.append(two.post("/generate", body)))
    thread.start()
    while two.get("/get_server_info").json()["num_running_reqs"] < 1:
        assert thread.is_alive(), answers
        time.sleep(0.05)
    assert two.post("/abort_request", {"rid": "long-one"}).status_code == 200
    thread.join(timeout=60)
    assert answers[0].json()["meta_info"]["finish_reason"]["type"] == "abort"
    wait_idle(two)
    assert two.post("/flush_cache").status_code == 200  # on both replicas


def test_a_weight_swap_reaches_every_replica(two: ServerProcess) -> None:
    """After a swap to other weights, concurrent requests (both replicas) all answer as the new
    weights do on one engine; then back."""
    ref = load_reference(spec.TINY_LLAMA)
    prompt = prompts_of(ref)[1]
    other = spec.models_dir() / spec.TINY_LLAMA_SHARDED
    level = spec.compile_level_for(other)
    engine = Engine(model_path=str(other), max_total_tokens=4096, xla_backend_optimization_level=level)
    try:
        greedy = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
        answer = engine.generate(input_ids=prompt, sampling_params=greedy, return_logprob=True)
        expected = [entry[1] for entry in answer["meta_info"]["output_token_logprobs"]]
    finally:
        engine.shutdown()
    original = spec.models_dir() / spec.TINY_LLAMA
    try:
        r = two.post("/update_weights_from_disk", {"model_path": str(other)})
        assert r.status_code == 200 and r.json()["success"], r.text
        assert two.get("/get_model_info").json()["model_path"] == str(other)
        assert generate_batch_ids(two, [prompt] * 4, 8) == [expected] * 4
    finally:
        r = two.post("/update_weights_from_disk", {"model_path": str(original)})
    assert r.status_code == 200 and r.json()["success"], r.text
    for ids in generate_batch_ids(two, [prompt] * 4, 8):
        result = greedy_agrees(ids, ref["greedy_1"][:8], ref["greedy_margin_1"][:8])
        assert result, f"swapped back: {result}"


def test_profiling_traces_each_replica_into_a_folder_of_its_own(two: ServerProcess, tmp_path: Path) -> None:
    """With num_steps each replica stops after its own steps: one request runs on one replica, so
    the other still traces, and a stop ends it (a 200: some replica was tracing)."""
    r = two.post("/start_profile", {"output_dir": str(tmp_path), "num_steps": 2})
    assert r.status_code == 200, r.text
    assert two.post("/start_profile", {"output_dir": str(tmp_path)}).status_code == 400  # already
    generate_batch_ids(two, [[5, 6, 7]], 4)
    assert two.post("/stop_profile").status_code == 200
    assert two.post("/stop_profile").status_code == 400  # none is tracing now
    assert sorted(p.name for p in tmp_path.iterdir()) == ["replica0", "replica1"]
    assert all(any(folder.rglob("*.xplane.pb")) for folder in tmp_path.iterdir())


def test_the_expert_dump_is_one_file_of_both_replicas(two: ServerProcess) -> None:
    """A dense model's dump: one CSV, the header alone, written in the server's directory."""
    for route in ("/start_expert_distribution_record", "/stop_expert_distribution_record"):
        assert two.post(route).status_code == 200
    assert two.post("/dump_expert_distribution_record").status_code == 200
    workdir = Path(two.log_path).parent
    (dump,) = workdir.glob("expert_distribution_rank0_*.csv")
    assert list(csv.reader(dump.open())) == [["layer_id", "expert_id", "count"]]


def engines_of(session: int) -> list[str]:
    """The engine processes (multiprocessing spawns) in a server's process group."""
    command = ["pgrep", "-g", str(session), "-f", "--", "spawn_main"]
    return subprocess.run(command, capture_output=True, text=True).stdout.split()


def test_ctrl_c_while_the_replicas_load_stops_them_all(tmp_path: Path) -> None:
    """SIGINT while the engines load: the server exits and leaves no engine process behind (the
    replicas loading are stopped, not waited for)."""
    model = str(spec.models_dir() / spec.TINY_LLAMA)
    argv = [sys.executable, "-m", "server.launch_server", "--model-path", model, "--dp-size", "2"]
    argv += ["--port", str(find_free_port("127.0.0.1")), "--max-total-tokens", "4096"]
    log = (tmp_path / "server.log").open("wb")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    server = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(engines_of(server.pid)) < 2:  # both replicas loading (warm-up on)
            assert time.monotonic() < deadline and server.poll() is None, "the engines never started"
            time.sleep(0.05)
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) != 0
        deadline = time.monotonic() + 10
        while engines_of(server.pid):
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-2000:]
            time.sleep(0.1)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


def test_ctrl_c_between_two_replica_starts_stops_the_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C that lands after the first replica's process started, before the second is
    submitted: the start stops at once and leaves no engine process (it used to wait for the
    first replica to load, then leave it running). The interrupt is raised where the signal
    handler would raise it; the engine processes are real."""
    submit = concurrent.futures.ThreadPoolExecutor.submit

    def submit_then_interrupt(pool, fn, *args):
        if multiprocessing.active_children():  # the first replica's process is up: Ctrl-C now
            raise KeyboardInterrupt
        future = submit(pool, fn, *args)
        deadline = time.monotonic() + 60
        while not multiprocessing.active_children():
            assert time.monotonic() < deadline and not future.done(), "the first replica never started"
            time.sleep(0.01)
        return future

    monkeypatch.setattr(concurrent.futures.ThreadPoolExecutor, "submit", submit_then_interrupt)
    args = ServerArgs(model_path=str(spec.models_dir() / spec.TINY_LLAMA), dp_size=2, max_total_tokens=4096)
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        EngineReplicas(args)
    assert not multiprocessing.active_children()
    assert time.monotonic() - start < 30


def test_replicas_split_over_devices_of_their_own(tmp_path: Path) -> None:
    """`--dp-size 2 --tp-size 2`: two replicas, each split over two devices (on a CPU, two forced
    devices per engine process): HF's greedy tokens from both."""
    ref = load_reference(spec.TINY_LLAMA)
    prompts = prompts_of(ref)
    flags = {"XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"}
    server = start_server(
        spec.models_dir() / spec.TINY_LLAMA, "--dp-size", "2", "--tp-size", "2", log_dir=tmp_path, env=flags
    )
    try:
        # round robin: the batch's requests alternate between the replicas
        for i, ids in enumerate(generate_batch_ids(server, prompts, len(ref["greedy_0"]))):
            result = greedy_agrees(ids, ref[f"greedy_{i}"], ref[f"greedy_margin_{i}"])
            assert result, f"prompt {i}: {result}"
        info = wait_idle(server)
        assert (info["dp_size"], info["tp_size"]) == (2, 2)
        assert all(replica["num_steps"] > 0 for replica in info["replicas"])
    finally:
        server.stop()
