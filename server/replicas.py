"""Data parallelism (`--dp-size N`): N engine processes, each serving the whole model on devices of
its own, behind the API of one `EngineClient`.

As the reference's data-parallel controller does, each request goes to one replica, in turn
(`--load-balance-method round_robin`, the reference's default) or to the one with the fewest
requests in flight (`shortest_queue`), and its outputs and aborts stay with that replica. What
concerns the model goes to every replica: a weight swap, a cache flush, the expert record and
profiling; statistics are added up. Replica i runs on the host's GPUs i x tp ... (i + 1) x tp - 1
(`--tp-size` each); on a CPU every replica has the host's CPU.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from runtime.expert_stats import write_expert_distribution
from runtime.io_struct import EngineRequest, OutputCallback, RequestOutput
from runtime.paths import NOT_PROFILING, default_profile_dir
from runtime.request_checks import check_not_in_flight, check_request
from runtime.server_args import ServerArgs
from server.engine_client import EngineClient

logger = logging.getLogger("sglax.replicas")

# Statistics that are counts or rates of the whole server: the replicas' figures added up. The
# others (ratios, latencies) are averaged.
_SUMMED = frozenset(
    {
        "num_running_reqs",
        "num_queue_reqs",
        "num_used_tokens",
        "num_free_pages",
        "num_cached_pages",
        "num_total_pages",
        "gen_throughput",
        "last_gen_throughput",
        "num_served",
        "num_steps",
        "num_retracted_reqs",
        "num_compiled_programs",
        "num_pending_compiles",
    }
)
# What one request may use: where replicas' KV pools differ, the smallest's.
_SMALLEST = frozenset({"max_total_num_tokens", "max_req_input_len"})


def replica_devices(replica: int, per_replica: int, visible: str | None) -> str:
    """The `CUDA_VISIBLE_DEVICES` of `replica`: its `per_replica` GPUs among those the server may
    use (`visible`, the server's own `CUDA_VISIBLE_DEVICES`, or all the host's)."""
    ids = [d for d in visible.split(",") if d.strip()] if visible else None
    chosen = range(replica * per_replica, (replica + 1) * per_replica)
    return ",".join(ids[i] for i in chosen if i < len(ids)) if ids is not None else ",".join(map(str, chosen))


def merge_stats(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """One server's statistics from its replicas': counts summed, the limits of one request the
    smallest replica's, the token usage weighted by each replica's pages, other figures kept
    where all agree and averaged where they differ (ratios, latencies); each replica's own
    under `replicas`."""
    merged: dict[str, Any] = {}
    for key in dict.fromkeys(key for s in stats for key in s):  # every replica's keys, in order
        values = [s[key] for s in stats if key in s]
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        if not numbers or (key not in _SUMMED and len(set(values)) == 1):
            merged[key] = values[0]
        elif key in _SMALLEST:
            merged[key] = min(values)
        elif key in _SUMMED:
            merged[key] = sum(values)
        else:
            merged[key] = sum(values) / len(values)
    weighed = [(s["token_usage"], s.get("num_total_pages") or 0) for s in stats if "token_usage" in s]
    if weighed and sum(pages for _, pages in weighed):
        merged["token_usage"] = sum(u * n for u, n in weighed) / sum(n for _, n in weighed)
    merged["replicas"] = stats
    return merged


def _stop_starting(starts: list[concurrent.futures.Future], others: set[Any]) -> None:
    """Stop the replicas of a start given up: those loaded as a server stops them, those still
    loading killed (a load may take minutes, and the process being started is not known to its
    `EngineClient` until it has loaded), until every start has ended. `others`: the process's
    children from before, left alone."""
    for start in starts:
        if start.done() and not start.cancelled() and start.exception() is None:
            start.result().shutdown()
    while not all(start.done() for start in starts):
        for child in set(multiprocessing.active_children()) - others:
            child.kill()
        time.sleep(0.05)


class EngineReplicas:
    """`EngineClient`'s API over `--dp-size` engine processes (see the module's docstring)."""

    def __init__(self, server_args: ServerArgs, on_exit: Callable[[], None] | None = None) -> None:
        count, visible = server_args.dp_size, os.environ.get("CUDA_VISIBLE_DEVICES")
        # Each replica seeds its requests' samplers from a seed of its own: with one seed, the
        # k-th request of every replica would draw the same tokens.
        ones = [
            dataclasses.replace(server_args, dp_size=1, random_seed=server_args.random_seed + i)
            for i in range(count)
        ]
        others = set(multiprocessing.active_children())
        starts: list[concurrent.futures.Future] = []
        with concurrent.futures.ThreadPoolExecutor(count) as pool:  # they load side by side
            # The submits sit inside the `try`: a replica's process may exist before the last
            # submit returns, and a Ctrl-C there must stop it too. Else the pool's exit waits out
            # every load: the likely cause of one timeout of the Ctrl-C test on a loaded box.
            try:
                for i, one in enumerate(ones):
                    devices = replica_devices(i, server_args.tp_size, visible)
                    starts.append(pool.submit(EngineClient, one, on_exit, devices))
                concurrent.futures.wait(starts, return_when=concurrent.futures.FIRST_EXCEPTION)
                failed = next(
                    (start.exception() for start in starts if start.done() and start.exception()), None
                )
                if failed is not None:
                    raise failed
            except BaseException:  # a replica that cannot start, or Ctrl-C: none may outlive the start
                pool.shutdown(wait=False, cancel_futures=True)  # a start not yet begun never begins
                _stop_starting(starts, others)
                raise
        self.replicas = [start.result() for start in starts]
        first = self.replicas[0]
        self.server_args = dataclasses.replace(
            first.server_args, dp_size=count, random_seed=server_args.random_seed
        )
        # Requests are checked against the smallest KV pool (pools sized from free memory differ).
        tightest = min(self.replicas, key=lambda r: r.request_limits.kv_capacity or 0)
        self.request_limits, self.tokenizer, self.model_info = (
            tightest.request_limits,
            first.tokenizer,
            first.model_info,
        )
        self._lock = threading.Lock()
        self._owner: dict[str, EngineClient] = {}  # each request in flight, and its replica
        self._turns = itertools.count()  # round_robin's
        logger.info("%d engine replicas serve (data parallelism).", count)

    # -- requests --------------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        return self.replicas[0].tokenize(text)

    def validate_request(self, req: EngineRequest) -> None:
        check_request(req, self.request_limits)
        with self._lock:
            check_not_in_flight(req.rid, self._owner)  # on any replica

    def submit(self, req: EngineRequest, callback: OutputCallback) -> None:
        with self._lock:
            check_not_in_flight(req.rid, self._owner)
            if self.server_args.load_balance_method == "shortest_queue":
                replica = min(self.replicas, key=lambda r: r.num_in_flight)
            else:
                replica = self.replicas[next(self._turns) % len(self.replicas)]
            self._owner[req.rid] = replica

        def relay(output: RequestOutput) -> None:
            if output.finished:
                with self._lock:
                    self._owner.pop(req.rid, None)
            callback(output)

        try:
            replica.submit(req, relay)
        except BaseException:
            with self._lock:
                self._owner.pop(req.rid, None)
            raise

    def abort(self, rid: str) -> None:
        with self._lock:
            replica = self._owner.get(rid)
        if replica is not None:
            replica.abort(rid)

    def abort_all(self) -> None:
        for replica in self.replicas:
            replica.abort_all()

    # -- control calls: every replica --------------------------------------------------------------

    def _each(self, call: Callable[[int, EngineClient], Any]) -> list[Any]:
        """`call(index, replica)` on every replica at once; the first error once all have answered."""
        return [future.result() for future in self._on_all(call)]

    def _on_all(self, call: Callable[[int, EngineClient], Any]) -> list[concurrent.futures.Future]:
        """`call(index, replica)` on every replica at once; each one's answer, or its error."""
        with concurrent.futures.ThreadPoolExecutor(len(self.replicas)) as pool:
            return [pool.submit(call, i, replica) for i, replica in enumerate(self.replicas)]

    def flush_cache(self) -> bool:
        return all(self._each(lambda _, r: r.flush_cache()))

    def stats(self) -> dict[str, Any]:
        return merge_stats(self._each(lambda _, r: r.stats()))

    def get_server_info(self) -> dict[str, Any]:
        infos = self._each(lambda _, r: r.get_server_info())
        merged = {**infos[0], **merge_stats(infos)}
        merged["max_total_num_tokens"] = infos[0]["max_total_num_tokens"]  # what one request may use
        merged["dp_size"] = self.server_args.dp_size
        args = self.server_args.to_dict()
        merged["replicas"] = [{k: v for k, v in info.items() if k not in args} for info in infos]  # state
        return merged

    def start_expert_distribution_record(self) -> None:
        self._each(lambda _, r: r.start_expert_distribution_record())

    def stop_expert_distribution_record(self) -> None:
        self._each(lambda _, r: r.stop_expert_distribution_record())

    def dump_expert_distribution_record(self, directory: str | Path = ".") -> str:
        """One CSV of every replica's counts added up, as one engine's dump would be."""
        histograms = self._each(lambda _, r: r.take_expert_histogram())
        return str(write_expert_distribution(np.sum(histograms, axis=0), directory))

    def start_profile(self, output_dir: str | None = None, num_steps: int | None = None) -> str:
        """Each replica traces into a folder of its own under `output_dir` (`replica<i>`): the
        traces of two processes of one host would otherwise share file names. All start or none
        does: where one refuses (one already tracing), those that started stop again. With
        `num_steps`, each replica stops after that many of its own steps."""
        base = Path(output_dir or default_profile_dir())
        answers = self._on_all(lambda i, r: r.start_profile(str(base / f"replica{i}"), num_steps))
        refused = next((a.exception() for a in answers if a.exception() is not None), None)
        if refused is None:
            return answers[0].result()
        for replica, answer in zip(self.replicas, answers, strict=True):
            if answer.exception() is None:
                try:
                    replica.stop_profile()
                except Exception as exc:  # one that stopped by itself meanwhile (num_steps)
                    logger.warning("A replica's trace could not be stopped: %s", exc)
        raise refused

    def stop_profile(self) -> str:
        """Stop every replica that is tracing; a 400 only where none was (one that received no
        work since a start with `num_steps` still traces, the others stopped by themselves)."""
        answers = self._on_all(lambda _, r: r.stop_profile())
        errors = [a.exception() for a in answers if a.exception() is not None]
        failed = next((e for e in errors if NOT_PROFILING not in str(e)), None)
        if failed is not None:  # a trace that could not be written, an engine gone
            raise failed
        if len(errors) == len(answers):
            raise errors[0]
        return next(a.result() for a in answers if a.exception() is None)

    def update_weights_from_disk(
        self, model_path: str, load_format: str | None = None
    ) -> tuple[bool, str, int]:
        """Every replica swaps (each holds its queue and lets its running requests finish); a
        success where all succeed. Each checks the checkpoint before it swaps, so a checkpoint
        that fails the checks fails them on every replica and none swaps; a replica failing
        alone (a read error) is logged, and the answer is its failure."""
        answers = self._each(lambda _, r: r.update_weights_from_disk(model_path, load_format))
        failed = next((answer for answer in answers if not answer[0]), None)
        if failed is not None:
            if any(success for success, _, _ in answers):
                logger.error("A weight update succeeded on some replicas only: %s", failed[1])
            return failed
        self.server_args.model_path = model_path  # the replicas' own copies changed there
        return True, answers[0][1], sum(paused for _, _, paused in answers)

    def shutdown(self) -> None:
        self._each(lambda _, r: r.shutdown())
