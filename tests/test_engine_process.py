"""The engine in its own process: the client's outputs equal the in-process engine's, outputs
cross the pipe as deltas, control calls keep their errors, and the server goes down with an
engine process that dies (or never starts) instead of hanging its clients."""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from runtime.detokenizer import StreamedText
from runtime.engine import Engine
from runtime.io_struct import EngineRequest, RequestOutput
from runtime.output_deltas import NOTHING_SENT, DeltaDecoder, OutputDeltas
from runtime.sampling_params import SamplingParams
from runtime.server_args import ServerArgs
from server.engine_client import EngineClient
from server.utils import find_free_port, terminate_process
from tests.fixture_spec import compile_level_for
from tests.server_helpers import start_server

ENGINE_STARTED = re.compile(r"Engine process (\d+) started\.")


def _output(rid: str, ids: list[int], text: str | None, finished: bool = False) -> RequestOutput:
    return RequestOutput(rid, ids, text, finished, None, 3, len(ids), 0)


def test_deltas_rebuild_every_cumulative_output() -> None:
    """Interleaved requests, a text that stops being a prefix (a trimmed stop), no text at all,
    logprob lists beside the ids."""
    with_logprobs = [_output("c", [2, 3][:n], "t" * n) for n in (1, 2)]
    for n, output in enumerate(with_logprobs, start=1):
        output.output_token_logprobs = [(-0.5 * k, t) for k, t in enumerate(output.output_ids)]
        output.output_top_logprobs = [[(-0.1, 9), (-0.2, 8)]] * n
        output.input_token_logprobs = [(None, 1), (-1.5, 2)]  # the prompt's travel whole
    stream = [
        *with_logprobs,
        _output("a", [5], "x"),
        _output("b", [7], None),
        _output("a", [5, 6], "xy"),
        _output("b", [7, 8, 9], None),
        _output("a", [5, 6, 4], "xyz!"),
        _output("b", [7, 8, 9, 1], None, finished=True),
        _output("a", [5, 6, 4, 2], "xq", finished=True),  # not an extension of "xyz!"
        _output("a", [3], "new"),  # the id may come back (a new request); nothing of the old is kept
    ]
    cutters: dict[str, OutputDeltas] = {}  # one per request, as each `Req` holds its own
    decoder = DeltaDecoder()
    previous: dict[str, list[int]] = {}
    sizes, deltas = [], []
    for sent in stream:
        cutter = cutters.setdefault(sent.rid, OutputDeltas())
        if sent.finished:
            del cutters[sent.rid]  # the id may come back: a new request, a new cutter
        delta = cutter.cut(copy.deepcopy(sent))
        deltas.append(copy.deepcopy(delta[0]))
        sizes.append(len(delta[0].output_ids))
        got = decoder.decode(copy.deepcopy(delta))
        assert vars(got) == vars(sent)
        assert got.output_ids is not previous.get(sent.rid), "an earlier output's list must not change"
        previous[sent.rid] = got.output_ids
    assert sizes == [1, 1, 1, 1, 1, 2, 1, 1, 1, 1]  # only the new ids travel
    second = deltas[1]  # request "c"'s second output: its new logprob entries, its prompt's whole
    assert second.output_token_logprobs == [(-0.5, 3)]
    assert second.output_top_logprobs == [[(-0.1, 9), (-0.2, 8)]]
    assert second.input_token_logprobs == [(None, 1), (-1.5, 2)]
    assert deltas[-1].output_ids == [3] and deltas[-1].text == "new"  # nothing of the old request

    # The scheduler hands the request's own lists, which keep growing after the cut.
    live_ids, live_cutter = [1, 2], OutputDeltas()
    first = live_cutter.cut(RequestOutput("d", live_ids, None, False, None, 3, 2, 0))
    live_ids.append(3)
    second = live_cutter.cut(RequestOutput("d", live_ids, None, False, None, 3, 3, 0))
    assert (first[0].output_ids, first[1], second[0].output_ids, second[1][0]) == (
        [1, 2],
        NOTHING_SENT,
        [3],
        2,
    )
    assert first[0].output_ids is not live_ids


def _requests() -> list[EngineRequest]:
    greedy = SamplingParams(temperature=0.0, max_new_tokens=20, ignore_eos=True)
    stopped = SamplingParams(temperature=0.0, max_new_tokens=40, min_new_tokens=4, stop=["e"])
    sampled = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=12, sampling_seed=3)
    return [
        EngineRequest(
            rid="greedy",
            input_ids=[1, 5, 9, 14],
            sampling_params=greedy,
            stream=True,
            return_hidden_states=True,
        ),
        EngineRequest(rid="stopped", input_ids=[3, 8, 2], sampling_params=stopped, stream=True),
        EngineRequest(
            rid="sampled",
            input_ids=[4, 4, 7, 30, 2],
            sampling_params=sampled,
            stream=True,
            return_logprob=True,
            top_logprobs_num=2,
            token_ids_logprob=[1, 2],
        ),
        EngineRequest(rid="whole", input_ids=[9, 9, 9], sampling_params=greedy),
    ]


def _comparable(output: RequestOutput) -> dict[str, Any]:
    """An output's fields as JSON values, less its timings."""
    timings = ("e2e_latency", "first_token_latency")
    return json.loads(json.dumps({k: v for k, v in vars(output).items() if k not in timings}))


def _close(a: Any, b: Any) -> bool:
    """Equal, floats within 1e-4: the two engines may run a step at different padded shapes (one
    borrows a compiled program the other compiled)."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-4
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    return a == b


def _run(engine: Any, requests_: list[EngineRequest]) -> dict[str, list[dict[str, Any]]]:
    """Every output of each request, comparable."""
    seen: dict[str, list[dict[str, Any]]] = {r.rid: [] for r in requests_}
    done = threading.Semaphore(0)

    def note(output: RequestOutput) -> None:
        seen[output.rid].append(_comparable(output))
        if output.finished:
            done.release()

    for request in requests_:
        engine.validate_request(request)
        engine.submit(request, note)
    for _ in requests_:
        assert done.acquire(timeout=300)
    return seen


def test_engine_client_streams_what_the_engine_streams(
    tiny_llama_path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    args = dict(
        model_path=str(tiny_llama_path),
        max_total_tokens=4096,
        random_seed=0,
        xla_backend_optimization_level=compile_level_for(tiny_llama_path),
    )
    engine = Engine(ServerArgs(**args))
    try:
        expected = _run(engine, _requests())
    finally:
        engine.shutdown()
    client = EngineClient(ServerArgs(**args))
    try:
        got = _run(client, _requests())
        assert _close(got, expected), (got, expected)
        assert {rid: len(outputs) > 1 for rid, outputs in got.items()} == {
            "greedy": True,
            "stopped": True,
            "sampled": True,
            "whole": False,
        }
        assert got["stopped"][-1]["finish_reason"]["type"] == "stop", got["stopped"][-1]
        # Checks and control calls answer as the engine's do, across the pipe.
        long_params = SamplingParams(max_new_tokens=1500)
        long_one = EngineRequest(rid="dup", input_ids=[1], sampling_params=long_params)
        finished = threading.Event()
        client.submit(long_one, lambda output: finished.set() if output.finished else None)
        with pytest.raises(ValueError, match="already in flight"):
            client.validate_request(EngineRequest(rid="dup", input_ids=[1]))
        with pytest.raises(ValueError, match="outside the vocabulary"):
            client.validate_request(EngineRequest(rid="bad", input_ids=[10**9]))
        with pytest.raises(ValueError, match="Profiling is not in progress"):
            client.stop_profile()
        # A model without experts answers the record's calls, as the reference does: its record
        # is the header alone.
        client.start_expert_distribution_record()
        written = Path(client.dump_expert_distribution_record(tmp_path))
        assert written.read_text().splitlines() == ["layer_id,expert_id,count"]
        client.stop_expert_distribution_record()
        assert client.flush_cache() is False  # a request runs
        client.abort("dup")
        assert finished.wait(60)
        assert client.stats()["num_running_reqs"] == 0
        assert client.flush_cache() is True
        _a_text_that_fails_ends_its_request_alone(client, monkeypatch)
    finally:
        client.shutdown()
    assert client._process.exitcode == 0


def _a_text_that_fails_ends_its_request_alone(client: EngineClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """The HTTP side makes a request's text (no stop strings); if that fails, the request ends
    with the error and is aborted in the engine, and its id comes free once the engine ended it."""
    made_here = SamplingParams(temperature=0.0, max_new_tokens=40, ignore_eos=True)
    made_there = SamplingParams(temperature=0.0, max_new_tokens=40, ignore_eos=True, stop=["never"])
    original = StreamedText.text_of

    def fails_at_three(self: StreamedText, output_ids: list[int], finished: bool, reason: Any) -> str:
        if len(output_ids) >= 3:
            raise RuntimeError("no text for this id")
        return original(self, output_ids, finished, reason)

    monkeypatch.setattr(StreamedText, "text_of", fails_at_three)
    runs = [
        EngineRequest(rid="broken", input_ids=[1, 5, 9], sampling_params=made_here, stream=True),
        EngineRequest(rid="fine", input_ids=[2, 6], sampling_params=made_there, stream=True),
    ]
    seen = _run(client, runs)
    broken, fine = seen["broken"][-1], seen["fine"][-1]
    assert broken["finished"] and "Cannot detokenize the output: no text for this id" in broken["error"]
    assert [o["finished"] for o in seen["broken"]] == [False, False, True]  # nothing after its end
    assert fine["error"] is None and len(fine["output_ids"]) == 40
    monkeypatch.setattr(StreamedText, "text_of", original)
    deadline = time.monotonic() + 30
    while "broken" in client._callbacks:  # in flight until the engine's own final output
        assert time.monotonic() < deadline
        time.sleep(0.05)
    again = _run(client, runs[:1])["broken"][-1]
    assert again["error"] is None and len(again["output_ids"]) == 40
    assert client.stats()["num_running_reqs"] == 0


def _gone_within(pid: int, seconds: float) -> bool:
    """Whether process `pid` has exited (a zombie counts as exited) within `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.1)
    return False


def _engine_pid(log_path: Path) -> int:
    match = ENGINE_STARTED.search(log_path.read_text())
    assert match, log_path.read_text()[-2000:]
    return int(match.group(1))


def test_a_dead_engine_fails_its_requests_and_stops_the_server(tiny_llama_path: Path, tmp_path: Path) -> None:
    server = start_server(tiny_llama_path, log_dir=tmp_path)
    try:
        params = {"max_new_tokens": 1500, "ignore_eos": True}
        body = {"input_ids": [1, 2, 3], "sampling_params": params, "stream": True}
        with requests.post(server.url + "/generate", json=body, stream=True, timeout=120) as r:
            lines = r.iter_lines()
            next(line for line in lines if line)
            os.kill(_engine_pid(server.log_path), signal.SIGKILL)
            events = [line for line in lines if line]
        assert events[-1] == b"data: [DONE]"
        assert "engine process exited" in json.loads(events[-2][len(b"data: ") :])["error"]["message"]
        assert server.process.wait(timeout=120) == 1
    finally:
        server.stop()


def test_a_port_in_use_is_refused_before_the_model_loads(tiny_llama_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = [sys.executable, "-m", "server.launch_server", "--model-path", str(tiny_llama_path)]
        argv += ["--port", str(port)]
        started = time.monotonic()
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert f"Cannot serve on 127.0.0.1:{port}: Address already in use" in result.stdout + result.stderr
    assert ENGINE_STARTED.search(result.stdout + result.stderr) is None  # no engine process was started
    assert time.monotonic() - started < 60


def test_a_model_the_engine_cannot_serve_exits_with_one(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["NoSuchModelForCausalLM"]}))
    argv = [sys.executable, "-m", "server.launch_server", "--model-path", str(tmp_path)]
    argv += ["--port", str(find_free_port("127.0.0.1")), "--skip-tokenizer-init"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=120)
    finally:
        terminate_process(process)
    assert process.returncode == 1
    assert b"Cannot serve" in output, output[-2000:]
    pid = int(ENGINE_STARTED.search(output.decode()).group(1))
    assert _gone_within(pid, 10), "the engine process outlived the server"


def test_the_engine_process_does_not_outlive_a_server_killed_while_it_loads(
    tiny_llama_path: Path, tmp_path: Path
) -> None:
    argv = [sys.executable, "-m", "server.launch_server", "--model-path", str(tiny_llama_path)]
    argv += ["--port", str(find_free_port("127.0.0.1")), "--max-total-tokens", "4096"]
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not ENGINE_STARTED.search(log_path.read_text()):
            assert time.monotonic() < deadline and process.poll() is None, log_path.read_text()[-2000:]
            time.sleep(0.05)
        process.kill()  # the engine is still importing or loading: nothing reads its pipe yet
        process.wait()
        pid = _engine_pid(log_path)
        assert _gone_within(pid, 15), "the engine process outlived the server"
        assert "ready to roll" not in log_path.read_text()
    finally:
        terminate_process(process)


def test_a_crashed_scheduler_answers_its_requests_then_ends_the_engine_process(
    tiny_llama_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step that raises (a bug, a device out of memory) fails the scheduler for good: the
    worker sends the requests' error outputs, then exits with 1 (here recorded, not done), so
    the HTTP process sees the pipe close and stops the server."""
    import multiprocessing

    from server.engine_worker import OUTPUTS, READY, SUBMIT, EngineWorker

    level = compile_level_for(tiny_llama_path)
    engine = Engine(
        ServerArgs(
            model_path=str(tiny_llama_path),
            max_total_tokens=1024,
            random_seed=0,
            xla_backend_optimization_level=level,
        )
    )
    here, there = multiprocessing.Pipe()
    worker = EngineWorker(engine, there)
    exits: list[int] = []
    worker.exit_process = exits.append

    def broken_step(batch: Any) -> Any:
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory (a stand-in)")

    monkeypatch.setattr(engine.runner, "forward", broken_step)
    serving = threading.Thread(target=worker.serve, daemon=True)
    serving.start()
    try:
        assert here.poll(60) and here.recv()[0] == READY
        here.send(
            (SUBMIT, EngineRequest(rid="doomed", input_ids=[5, 6, 7], sampling_params=SamplingParams()))
        )
        deadline = time.monotonic() + 60
        answered = []
        while not exits and time.monotonic() < deadline:
            if here.poll(0.1):
                message = here.recv()
                if message[0] == OUTPUTS:
                    answered += message[1]
        assert exits == [1]
        assert answered and answered[-1][0].rid == "doomed" and answered[-1][0].finished
        assert "out of memory" in answered[-1][0].error
    finally:
        here.close()  # the worker's main loop ends on the closed pipe and shuts the engine down
        serving.join(timeout=60)


def test_a_text_that_fails_ends_its_request_once_when_one_message_holds_two_of_its_outputs() -> None:
    """The engine's sender puts whatever arrived since its last send into one message, so two
    steps' outputs of a request can come together: when the first one's text fails, the second
    must not fail the request (and abort it) again."""
    from threading import Lock

    from server.engine_worker import ABORT

    class FailingText:
        def text_of(self, output_ids: list[int], finished: bool, reason: Any) -> str:
            raise RuntimeError("no text")

    client = object.__new__(EngineClient)  # its delivery alone: no engine process
    client._lock, client._deltas = Lock(), DeltaDecoder()
    sent: list[tuple] = []
    client._send = sent.append
    seen: list[RequestOutput] = []
    request = EngineRequest(rid="x", input_ids=[1, 2, 3])
    client._callbacks = {"x": (request, seen.append, FailingText())}
    cutter = OutputDeltas()
    message = [cutter.cut(_output("x", [5], None)), cutter.cut(_output("x", [5, 6], None))]
    client._deliver(message)
    assert [(o.finished, "no text" in (o.error or "")) for o in seen] == [(True, True)]
    assert sent == [(ABORT, "x")]
