"""Load generator for a server speaking SGLang's native API (/generate) or the OpenAI API.

Sends seeded random-token prompts (token ids, so no tokenizer skews lengths),
streamed so that each request's time to first token and inter-token latencies
are seen as the client sees them, and reports throughput and latency the way
SGLang's own `bench_serving` does.

    # against a running server
    python scripts/bench_serving.py --base-url http://127.0.0.1:30000 \\
        --num-prompts 32 --input-len-range 128 512 --output-len-range 64 64

    # start our server on a free port, bench it, stop it (one command, one figure)
    python scripts/bench_serving.py --launch .cache/models/SmolLM2-135M-Instruct \\
        --server-args "--max-total-tokens 32768" --num-prompts 32 --output-file out.json

    # shared 1000-token prefix, one request at a time: TTFT of cold prefixes vs cache hits
    python scripts/bench_serving.py --launch MODEL --shared-prefix-len 1000 \\
        --shared-prefix-groups 4 --input-len-range 16 16 --output-len-range 8 8 \\
        --num-prompts 16 --max-concurrency 1

Arrivals: `--request-rate R` draws Poisson arrivals (inf sends everything at
once); `--max-concurrency C` caps requests in flight. Inter-token latency on the
native API is per token: an event that brings k new tokens counts as k gaps of
(its delay / k); on the OpenAI API each non-empty chunk counts as one token.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import shlex
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import numpy as np
import orjson
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_common import (  # noqa: E402
    MIN_TOKEN_ID,
    REPO_ROOT,
    BenchRequest,
    add_workload_args,
    check_workload_args,
    load_note,
    machine_info,
    requests_from_args,
    sample_random_requests,
    summarize,
    vocab_size_of,
    workload_json,
    write_json,
)

from server.utils import find_free_port, terminate_process  # noqa: E402

READY_MESSAGE = "The server is fired up and ready to roll!"
HTTP_TIMEOUT = 30.0
COMPILE_WAIT_S = 600.0  # the longest the warm-up pass waits for the server's background compiles


@dataclasses.dataclass
class RequestResult:
    """What one streamed request looked like from the client."""

    prompt_len: int
    output_len_requested: int
    success: bool = False
    error: str = ""
    output_len: int = 0
    ttft: float = 0.0  # seconds from sending to the first token
    latency: float = 0.0  # seconds from sending to the last event
    itl: list[float] = dataclasses.field(default_factory=list)  # seconds between tokens
    cached_tokens: int | None = None  # prompt tokens the server served from its prefix cache
    group: int = -1
    sent_at: float = 0.0  # seconds after the benchmark started


# ----------------------------------------------------------------------------- HTTP helpers


def http_json(url: str, body: dict[str, Any] | None = None, timeout: float = HTTP_TIMEOUT) -> Any:
    """GET (or POST `body`) and decode a JSON answer; control calls need no event loop."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


def flush_cache(base_url: str) -> bool:
    """Empty the server's prefix cache so earlier traffic cannot help this run; False if refused."""
    request = urllib.request.Request(base_url + "/flush_cache", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
            return response.status == 200
    except urllib.error.URLError:
        return False


def server_info(base_url: str) -> dict[str, Any]:
    """/get_server_info, or {} for servers without it (OpenAI-only servers)."""
    try:
        info = http_json(base_url + "/get_server_info")
    except (urllib.error.URLError, OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def wait_for_background_compiles(base_url: str, timeout: float = COMPILE_WAIT_S) -> float:
    """Seconds spent waiting until the server reports no step programs compiling in the background
    (`num_pending_compiles`; a server without the field is not waited for). Shapes the warm-up
    pass borrowed programs for compile aside after it: on an H200, five such compiles (about 3 s
    each) ran into the measured pass, which then ran on the borrowed programs beside them."""
    started = time.monotonic()
    while server_info(base_url).get("num_pending_compiles", 0) and time.monotonic() - started < timeout:
        time.sleep(0.2)
    return time.monotonic() - started


def served_model_name(base_url: str) -> str:
    """The first model of /v1/models: what an OpenAI request must name."""
    listing = http_json(base_url + "/v1/models")
    return str(listing["data"][0]["id"])


def resolve_vocab_size(args: argparse.Namespace, base_url: str) -> int:
    """--vocab-size, else the config of --tokenizer / --launch, else of the model the server names."""
    if args.vocab_size:
        return int(args.vocab_size)
    local = args.tokenizer or args.launch
    if local:
        return vocab_size_of(local)
    try:
        model_path = http_json(base_url + "/get_model_info")["model_path"]
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError):
        model_path = None
    if model_path and (Path(model_path) / "config.json").is_file():
        return vocab_size_of(model_path)
    raise SystemExit("Cannot tell the vocabulary size: pass --vocab-size or --tokenizer MODEL_FOLDER.")


# ----------------------------------------------------------------------------- launching our server


class LaunchedServer:
    """Our server in its own process group on a free port, timed from spawn to ready.

    uvicorn answers HTTP before the server's warm-up request has finished, so
    ready means the line `launch_server` logs once warm, or (when the log level
    hides that line) the first one-token /generate that completes.
    """

    def __init__(self, model_path: str, server_args: list[str], log: TextIO | None) -> None:
        self.port = find_free_port("127.0.0.1")
        self.base_url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "server.launch_server", "--model-path", model_path]
        argv += ["--host", "127.0.0.1", "--port", str(self.port), *server_args]
        self.command = shlex.join(argv)
        self._log = log
        self._ready = threading.Event()
        self._ready_at = math.inf
        self.lines: list[str] = []
        self.started_at = time.perf_counter()
        self.process = subprocess.Popen(
            argv,
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            text=True,
            bufsize=1,
        )
        self._reader = threading.Thread(target=self._read_output, name="server-log", daemon=True)
        self._reader.start()

    def _read_output(self) -> None:
        """Drain the server's output (a full pipe would block it), spot the readiness line."""
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines = [*self.lines[-199:], line]
            if self._log is not None:
                self._log.write(line)
                self._log.flush()
            if READY_MESSAGE in line and not self._ready.is_set():
                self._ready_at = time.perf_counter()
                self._ready.set()

    def _probe(self, timeout: float) -> bool:
        """A one-token generation once HTTP is up; True when it came back."""
        try:
            with urllib.request.urlopen(self.base_url + "/health", timeout=2) as response:
                if response.status != 200:
                    return False
            body = {"input_ids": [MIN_TOKEN_ID] * 4, "sampling_params": {"max_new_tokens": 1}}
            http_json(self.base_url + "/generate", body, timeout=timeout)
        except (urllib.error.URLError, OSError, ValueError):
            return False
        return True

    def wait_ready(self, timeout: float) -> float:
        """Seconds from process start to ready; raises if the server dies or stalls."""
        deadline = self.started_at + timeout
        while not self._ready.wait(0.2):
            if self.process.poll() is not None:
                tail = "".join(self.lines[-20:])
                raise RuntimeError(f"server exited with code {self.process.returncode}:\n{tail}")
            now = time.perf_counter()
            if now > deadline:
                raise TimeoutError(f"server not ready after {timeout:.0f} s")
            if self._probe(deadline - now):
                return min(self._ready_at, time.perf_counter()) - self.started_at
        return self._ready_at - self.started_at

    def stop(self) -> None:
        terminate_process(self.process)
        self._reader.join(timeout=5)


# ----------------------------------------------------------------------------- one request


async def iter_sse(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The `data:` payloads of a server-sent-event stream, as they arrive."""
    buffer = b""
    async for chunk in response.content.iter_any():
        buffer += chunk.replace(b"\r\n", b"\n")
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    yield line[5:].strip()


def native_body(request: BenchRequest, args: argparse.Namespace) -> dict[str, Any]:
    """A streamed /generate request of token ids."""
    sampling = {
        "max_new_tokens": request.output_len,
        "temperature": args.temperature,
        "ignore_eos": args.ignore_eos,
    }
    return {"input_ids": request.prompt_ids, "sampling_params": sampling, "stream": True, **args.extra_body}


def openai_body(request: BenchRequest, args: argparse.Namespace, model: str) -> dict[str, Any]:
    """A streamed /v1/completions request of token ids, asking for the usage chunk."""
    return {
        "model": model,
        "prompt": request.prompt_ids,
        "max_tokens": request.output_len,
        "temperature": args.temperature,
        "ignore_eos": args.ignore_eos,
        "stream": True,
        "stream_options": {"include_usage": True},
        **args.extra_body,
    }


async def send_native(
    session: aiohttp.ClientSession, base_url: str, request: BenchRequest, args: argparse.Namespace
) -> RequestResult:
    """One /generate stream; token counts come from meta_info.completion_tokens."""
    result = RequestResult(request.prompt_len, request.output_len, group=request.group)
    start = time.perf_counter()
    last_time, last_count = start, 0
    async with session.post(base_url + "/generate", json=native_body(request, args)) as response:
        if response.status != 200:
            result.error = f"HTTP {response.status}: {(await response.text())[:300]}"
            return result
        async for data in iter_sse(response):
            if data == b"[DONE]":
                break
            # An event holds every output id so far: at 1024 ids the stdlib's json took 35 us an
            # event, orjson 12, and on a small box the load generator shares the server's cores.
            event = orjson.loads(data)
            if "error" in event:
                result.error = str(event["error"].get("message", event["error"]))
                return result
            meta = event.get("meta_info", {})
            count = int(meta.get("completion_tokens", 0))
            now = time.perf_counter()
            if count > last_count:
                if last_count == 0:
                    result.ttft = now - start
                else:
                    gap = (now - last_time) / (count - last_count)
                    result.itl.extend([gap] * (count - last_count))
                last_time, last_count = now, count
            if meta.get("cached_tokens") is not None:
                result.cached_tokens = int(meta["cached_tokens"])
    result.latency = time.perf_counter() - start
    result.output_len = last_count
    result.success = last_count > 0 or request.output_len == 0
    if not result.success:
        result.error = "the stream ended without a token"
    return result


async def send_openai(
    session: aiohttp.ClientSession,
    base_url: str,
    request: BenchRequest,
    args: argparse.Namespace,
    model: str,
) -> RequestResult:
    """One /v1/completions stream; each non-empty text chunk is one token, the usage chunk the count."""
    result = RequestResult(request.prompt_len, request.output_len, group=request.group)
    start = time.perf_counter()
    last_time, chunks, usage_tokens = start, 0, None
    body = openai_body(request, args, model)
    async with session.post(base_url + "/v1/completions", json=body) as response:
        if response.status != 200:
            result.error = f"HTTP {response.status}: {(await response.text())[:300]}"
            return result
        async for data in iter_sse(response):
            if data == b"[DONE]":
                break
            event = orjson.loads(data)
            if event.get("object") == "error" or "error" in event:
                result.error = str(event.get("message") or event.get("error"))
                return result
            now = time.perf_counter()
            choices = event.get("choices") or []
            if choices and choices[0].get("text"):
                if chunks == 0:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last_time)
                chunks += 1
                last_time = now
            usage = event.get("usage")
            if usage:
                usage_tokens = usage.get("completion_tokens")
                details = usage.get("prompt_tokens_details") or {}
                if details.get("cached_tokens") is not None:
                    result.cached_tokens = int(details["cached_tokens"])
    result.latency = time.perf_counter() - start
    result.output_len = int(usage_tokens) if usage_tokens is not None else chunks
    result.success = chunks > 0
    if not result.success:
        result.error = "the stream ended without text"
    return result


# ----------------------------------------------------------------------------- the run


async def arrivals(requests: list[BenchRequest], rate: float, seed: int) -> AsyncIterator[BenchRequest]:
    """Requests in order, spaced by exponential gaps of mean 1/rate (Poisson); all at once for inf."""
    rng = np.random.default_rng(seed + 1)
    for index, request in enumerate(requests):
        if index and math.isfinite(rate):
            await asyncio.sleep(float(rng.exponential(1.0 / rate)))
        yield request


async def run_requests(
    requests: list[BenchRequest],
    args: argparse.Namespace,
    base_url: str,
    model: str,
    show_progress: bool,
    rate: float,
) -> tuple[list[RequestResult], float]:
    """Send `requests` as the arrival process says; returns per-request results and the wall time."""
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=args.request_timeout)
    limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    progress = tqdm(total=len(requests), disable=not show_progress, desc="requests", unit="req")
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()

        async def one(request: BenchRequest) -> RequestResult:
            async def send() -> RequestResult:
                sent = time.perf_counter() - start
                try:
                    if args.backend == "sglax":
                        result = await send_native(session, base_url, request, args)
                    else:
                        result = await send_openai(session, base_url, request, args, model)
                except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
                    result = RequestResult(request.prompt_len, request.output_len, group=request.group)
                    result.error = f"{type(exc).__name__}: {exc}"
                result.sent_at = sent
                progress.update(1)
                return result

            if limit is None:
                return await send()
            async with limit:
                return await send()

        tasks = [asyncio.create_task(one(request)) async for request in arrivals(requests, rate, args.seed)]
        results = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - start
    progress.close()
    return results, duration


def compute_metrics(
    results: list[RequestResult], duration: float, split_by_cache: bool = False
) -> dict[str, Any]:
    """Throughput and latency figures over the successful requests (latencies in ms).

    With `split_by_cache`, TTFT is also split by what the server reported as
    cached: requests with no cached prompt token (cold) and the rest (hits).
    """
    done = [r for r in results if r.success]
    input_tokens = sum(r.prompt_len for r in done)
    output_tokens = sum(r.output_len for r in done)
    itls = [gap for r in done for gap in r.itl]
    tpots = [(r.latency - r.ttft) / (r.output_len - 1) for r in done if r.output_len > 1]
    metrics: dict[str, Any] = {
        "completed": len(done),
        "failed": len(results) - len(done),
        "duration_s": duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "total_output_tokens_requested": sum(r.output_len_requested for r in done),
        "request_throughput": len(done) / duration if duration else 0.0,
        "input_throughput": input_tokens / duration if duration else 0.0,
        "output_throughput": output_tokens / duration if duration else 0.0,
        "total_throughput": (input_tokens + output_tokens) / duration if duration else 0.0,
        "concurrency": sum(r.latency for r in done) / duration if duration else 0.0,
        "ttft_ms": summarize([r.ttft for r in done], 1e3),
        "itl_ms": summarize(itls, 1e3),
        "tpot_ms": summarize(tpots, 1e3),
        "e2e_latency_ms": summarize([r.latency for r in done], 1e3),
    }
    known = [r for r in done if r.cached_tokens is not None]
    if known:
        metrics["cached_tokens_total"] = sum(r.cached_tokens or 0 for r in known)
    if known and split_by_cache:
        cold = [r.ttft for r in known if r.cached_tokens == 0]
        hit = [r.ttft for r in known if r.cached_tokens > 0]
        metrics["ttft_cold_ms"] = summarize(cold, 1e3) | {"count": len(cold)}
        metrics["ttft_hit_ms"] = summarize(hit, 1e3) | {"count": len(hit)}
        if cold and hit:
            metrics["ttft_hit_over_cold"] = float(np.mean(hit) / np.mean(cold))
    return metrics


def print_report(metrics: dict[str, Any], args: argparse.Namespace, base_url: str) -> None:
    """SGLang bench_serving's summary block."""
    width = 50
    lines = [
        " Serving Benchmark Result ".center(width, "="),
        f"{'Backend:':<34}{args.backend:>16}",
        f"{'Server:':<24}{base_url:>26}",
        f"{'Request rate / max concurrency:':<34}{f'{args.request_rate} / {args.max_concurrency}':>16}",
        f"{'Successful requests:':<34}{metrics['completed']:>16}",
        f"{'Failed requests:':<34}{metrics['failed']:>16}",
        f"{'Benchmark duration (s):':<34}{metrics['duration_s']:>16.2f}",
        f"{'Total input tokens:':<34}{metrics['total_input_tokens']:>16}",
        f"{'Total generated tokens:':<34}{metrics['total_output_tokens']:>16}",
        f"{'Request throughput (req/s):':<34}{metrics['request_throughput']:>16.2f}",
        f"{'Input token throughput (tok/s):':<34}{metrics['input_throughput']:>16.2f}",
        f"{'Output token throughput (tok/s):':<34}{metrics['output_throughput']:>16.2f}",
        f"{'Total token throughput (tok/s):':<34}{metrics['total_throughput']:>16.2f}",
        f"{'Concurrency:':<34}{metrics['concurrency']:>16.2f}",
    ]
    for key, title in (
        ("e2e_latency_ms", "End-to-End Latency"),
        ("ttft_ms", "Time to First Token"),
        ("tpot_ms", "Time per Output Token (excl. 1st token)"),
        ("itl_ms", "Inter-Token Latency"),
        ("ttft_cold_ms", "TTFT, prefix not cached"),
        ("ttft_hit_ms", "TTFT, prefix cache hit"),
    ):
        if key not in metrics:
            continue
        lines.append(f" {title} ".center(width, "-"))
        stats = metrics[key]
        for stat in ("mean", "median", "p99"):
            lines.append(f"{f'{stat.capitalize()} (ms):':<34}{stats[stat]:>16.2f}")
        if "count" in stats:
            lines.append(f"{'Requests:':<34}{stats['count']:>16}")
    if "ttft_hit_over_cold" in metrics:
        lines.append(f"{'TTFT hit / cold (mean):':<34}{metrics['ttft_hit_over_cold']:>16.3f}")
    lines.append("=" * width)
    print("\n".join(lines), flush=True)


def warmup_requests(args: argparse.Namespace, workload: list[BenchRequest], vocab: int) -> list[BenchRequest]:
    """Short requests of fresh random ids (so they never seed the prefix cache with a workload prompt)."""
    if not args.warmup_requests or not workload:
        return []
    length = workload[0].prompt_len
    return sample_random_requests(
        args.warmup_requests, (length, length), (8, 8), vocab, seed=args.seed + 1_000_003
    )


async def bench(
    args: argparse.Namespace, base_url: str, workload: list[BenchRequest], vocab: int
) -> dict[str, Any]:
    """Warm up, flush, run the workload once, and gather what the JSON holds."""
    model = args.model or (served_model_name(base_url) if args.backend == "openai" else "")
    flush = args.flush_cache and args.backend == "sglax"
    warm = warmup_requests(args, workload, vocab)
    if warm:
        results, _ = await run_requests(warm, args, base_url, model, False, math.inf)
        failures = [r.error for r in results if not r.success]
        if failures:
            raise SystemExit(f"warm-up request failed: {failures[0]}")
    if args.warmup_pass:
        print("warm-up pass over the whole workload (not measured) ...", flush=True)
        await run_requests(workload, args, base_url, model, not args.disable_tqdm, args.request_rate)
        if args.backend == "sglax":
            waited = wait_for_background_compiles(base_url)
            print(f"waited {waited:.1f} s for the server's background compiles", flush=True)
    if flush and not flush_cache(base_url):
        print("warning: the server refused /flush_cache", file=sys.stderr)
    info_before = server_info(base_url) if args.backend == "sglax" else {}
    load_before = load_note()
    results, duration = await run_requests(
        workload, args, base_url, model, not args.disable_tqdm, args.request_rate
    )
    load_after = load_note()
    info_after = server_info(base_url) if args.backend == "sglax" else {}
    metrics = compute_metrics(results, duration, split_by_cache=args.shared_prefix_len > 0)
    errors = sorted({r.error for r in results if not r.success})
    payload: dict[str, Any] = {
        "backend": args.backend,
        "base_url": base_url,
        "model": model or info_after.get("model_path", ""),
        "machine": machine_info(),
        "load_before": load_before,
        "load_after": load_after,
        "workload": {
            **workload_json(args, vocab),
            "request_rate": args.request_rate,
            "max_concurrency": args.max_concurrency,
            "temperature": args.temperature,
            "ignore_eos": args.ignore_eos,
            "warmup_pass": args.warmup_pass,
        },
        "metrics": metrics,
        "errors": errors[:10],
    }
    if info_after:
        before = info_before.get("num_compiled_programs")
        after = info_after.get("num_compiled_programs")
        payload["server_info"] = {
            "num_compiled_programs": after,
            "programs_compiled_during_run": None if before is None or after is None else after - before,
            "pending_compiles_at_start": info_before.get("num_pending_compiles"),
            "max_total_num_tokens": info_after.get("max_total_num_tokens"),
            "max_running_requests": info_after.get("max_running_requests"),
            "chunked_prefill_size": info_after.get("chunked_prefill_size"),
        }
    payload["requests"] = [
        {
            "prompt_len": r.prompt_len,
            "output_len": r.output_len,
            "success": r.success,
            "error": r.error,
            "sent_at_s": round(r.sent_at, 6),
            "ttft_s": round(r.ttft, 6),
            "latency_s": round(r.latency, 6),
            "cached_tokens": r.cached_tokens,
            "group": r.group,
            "itl_s": [round(gap, 6) for gap in r.itl],
        }
        for r in results
    ]
    return payload


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    target = parser.add_argument_group("server")
    target.add_argument(
        "--backend", choices=("sglax", "openai"), default="sglax", help="native or OpenAI API"
    )
    target.add_argument("--base-url", default=None, help="Overrides --host/--port.")
    target.add_argument("--host", default="127.0.0.1")
    target.add_argument("--port", type=int, default=30000)
    target.add_argument("--model", default=None, help="OpenAI model name; default: the first of /v1/models.")
    target.add_argument(
        "--launch", metavar="MODEL_PATH", default=None, help="Start our server on a free port."
    )
    target.add_argument("--server-args", default="", help="Extra launch flags for --launch, one string.")
    target.add_argument("--server-log", default=None, help="Write the launched server's output here.")
    target.add_argument("--launch-timeout", type=float, default=900.0)
    workload = parser.add_argument_group("workload")
    add_workload_args(workload)
    workload.add_argument("--vocab-size", type=int, default=None, help="Default: from the model's config.")
    workload.add_argument("--tokenizer", default=None, help="Model folder whose config gives the vocab size.")
    workload.add_argument("--temperature", type=float, default=0.0)
    workload.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    workload.add_argument("--extra-request-body", default="{}", help="JSON merged into every request body.")
    load = parser.add_argument_group("load")
    load.add_argument(
        "--request-rate", type=float, default=math.inf, help="Poisson rate, req/s; inf: at once."
    )
    load.add_argument("--max-concurrency", type=int, default=None)
    load.add_argument("--request-timeout", type=float, default=3600.0, help="Seconds a stream may stall.")
    run = parser.add_argument_group("run")
    run.add_argument("--warmup-requests", type=int, default=1, help="Short unmeasured requests first.")
    run.add_argument(
        "--warmup-pass", action="store_true", help="Run the whole workload once unmeasured first."
    )
    run.add_argument(
        "--flush-cache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="POST /flush_cache before the measured run (native backend).",
    )
    run.add_argument("--output-file", default=None, help="Write the JSON result here.")
    run.add_argument("--disable-tqdm", action="store_true")
    args = parser.parse_args(argv)
    check_workload_args(parser, args)
    try:
        args.extra_body = json.loads(args.extra_request_body)
    except ValueError:
        args.extra_body = None
    if not isinstance(args.extra_body, dict):
        parser.error("--extra-request-body must be a JSON object")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        parser.error("--max-concurrency must be at least 1")
    if args.request_rate <= 0:
        parser.error("--request-rate must be positive (inf sends all at once)")
    return args


def run(args: argparse.Namespace, log: TextIO | None) -> dict[str, Any]:
    """Launch our server if asked, bench, report; the launched server is always stopped."""
    server: LaunchedServer | None = None
    launch_info: dict[str, Any] = {}
    try:
        if args.launch:
            server = LaunchedServer(args.launch, shlex.split(args.server_args), log)
            print(f"launching: {server.command}", flush=True)
            ready = server.wait_ready(args.launch_timeout)
            print(f"server ready in {ready:.1f} s ({load_note()})", flush=True)
            launch_info = {"command": server.command, "start_to_ready_s": ready}
            base_url = server.base_url
        else:
            base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
        vocab = resolve_vocab_size(args, base_url)
        workload = requests_from_args(args, vocab)
        payload = asyncio.run(bench(args, base_url, workload, vocab))
    finally:
        if server is not None:
            server.stop()
    if launch_info:
        payload["launch"] = launch_info
    print_report(payload["metrics"], args, base_url)
    print(f"({payload['load_after']})")
    if payload["errors"]:
        print(f"errors: {payload['errors']}", file=sys.stderr)
    write_json(args.output_file, payload)
    return payload


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(open(args.server_log, "w")) if args.server_log else None
        return run(args, log)


if __name__ == "__main__":
    main()
