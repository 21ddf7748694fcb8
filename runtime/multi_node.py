"""Serving over several hosts (`--nnodes N`): one model split over every host's devices.

JAX runs one controller per host (`jax.distributed`): a program whose arrays span the hosts'
devices must be run by every host, in the same order, with the same host inputs, or the
collectives inside it wait forever. Node 0 runs the server, the scheduler and the model runner
as on one host; every other node runs a follower: the same model and KV pool, split the same
way, and a loop that runs what node 0's runner runs.

- `NodeGroup`: the command connections, node 0 to each follower (`--dist-init-addr`'s port + 1;
  the JAX coordinator has the port itself).
- `MirroredRunner`: node 0's runner. Each call that runs programs on the devices is sent to the
  followers before it runs here, under one lock, so every host dispatches the same programs in
  the same order (and on a CPU runs them one at a time: `settle`). A step's device outputs a
  later call reads (its logits, its hidden states) are named by the step's number: each host
  reads its own.
- `follow`: a follower's loop.

A weight swap loads on every node first and swaps only when all loaded (`stage_weights`); a
node that cannot read the new checkpoint fails the update and every node keeps its weights.

The command connections carry pickles: keep the port inside the cluster, and set the same
secret in `SGLAX_NODE_AUTHKEY` on every node (the handshake's key; a fixed one otherwise).
A node that fails leaves at once (`abandon`): the others cannot go on without its devices, and
JAX's exit would wait for them.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from typing import Any

import jax

from runtime.server_args import ServerArgs

logger = logging.getLogger(__name__)

COMMAND_PORT_OFFSET = 1  # the command connections listen on the coordinator's port + 1
CONNECT_TIMEOUT_S = 120.0
STEPS_KEPT = 4  # the steps whose device outputs a later call may name: the last few only


def _authkey() -> bytes:
    return os.environ.get("SGLAX_NODE_AUTHKEY", "sglax-nodes").encode()


def initialize(args: ServerArgs) -> None:
    """Join the JAX processes of every node (before any other JAX call); on a CPU, the hosts'
    collectives go over Gloo."""
    if args.nnodes == 1:
        return
    if not args.dist_init_addr:
        raise ValueError(f"--nnodes {args.nnodes} needs --dist-init-addr host:port (node 0's address).")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.dist_init_addr, num_processes=args.nnodes, process_id=args.node_rank)
    if args.tp_size != jax.device_count():
        raise ValueError(
            f"--tp-size {args.tp_size} over {args.nnodes} nodes: the nodes have {jax.device_count()} "
            "devices in all, and the model is split over all of them."
        )
    logger.info(
        "Node %d of %d: %d local devices, %d in all",
        args.node_rank,
        args.nnodes,
        jax.local_device_count(),
        jax.device_count(),
    )


def abandon(code: int = 1) -> None:
    """Exit now, without waiting for the other nodes (JAX's exit would wait for every node)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def leave() -> None:
    """Leave JAX's processes together (every node waits for the others here), so that no node's
    JAX process sees another vanish and aborts."""
    try:
        jax.distributed.shutdown()
    except Exception:  # a node already gone: this one is stopping anyway
        logger.exception("Leaving the other nodes failed")


def settle(runner: Any) -> None:
    """On a CPU, wait for the programs a call ran. Its runtime runs programs with no data between
    them side by side (the next step's forward beside a step's logprob table), and their
    collectives may then meet in another order on each node: a mismatch, or a hang. On a GPU
    nothing waits: XLA runs a device's programs one after another on its stream."""
    if jax.default_backend() != "cpu":
        return
    state = (runner.pool.k_pool, runner.pool.v_pool, runner.output_counts, runner.prompt_mask)
    jax.block_until_ready((*state, runner.slot_tokens, runner.expert_hist, runner.recording))


def _command_address(args: ServerArgs) -> tuple[str, int]:
    assert args.dist_init_addr is not None
    host, port = args.dist_init_addr.rsplit(":", 1)
    return host, int(port) + COMMAND_PORT_OFFSET


class NodeGroup:
    """The command connections: on node 0 one per follower, on a follower the one to node 0."""

    def __init__(self, args: ServerArgs) -> None:
        self.rank = args.node_rank
        address = _command_address(args)
        if self.rank == 0:
            self.conns = _accept(address, args.nnodes - 1)
        else:
            self.conns = [_connect(address)]
        self.lock = threading.RLock()  # held while a call is sent and run: one order on every node

    def send(self, *message: Any) -> None:
        with self.lock:
            for rank, conn in enumerate(self.conns, start=1):
                try:
                    conn.send(message)
                except OSError as exc:
                    raise RuntimeError(
                        f"node {rank} is gone ({exc}): the model spans every node, so this server stops"
                    ) from exc

    def replies(self) -> list[Any]:
        """One reply from each follower (to a message that asks for one)."""
        return [conn.recv() for conn in self.conns]

    def smallest(self, value: int) -> int:
        """The smallest of every node's `value`, on every node: a figure each node works out for
        itself that must be one, such as the KV pool's pages from each node's free memory."""
        if self.rank == 0:
            agreed = min([value, *self.replies()])
            self.send("agreed", agreed)
            return agreed
        conn = self.conns[0]
        conn.send(value)
        message = conn.recv()
        assert message[0] == "agreed", message
        return message[1]

    def close(self) -> None:
        for conn in self.conns:
            conn.close()


def _within(seconds: float, work: Callable[[], Any], what: str) -> Any:
    """`work()`'s result, or a TimeoutError saying `what` did not happen in time (the work's
    thread is left behind: the node is about to stop)."""
    result: list[Any] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(work())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run, name="node-connect", daemon=True)
    thread.start()
    thread.join(seconds)
    if failure:
        raise failure[0]
    if not result:
        raise TimeoutError(f"{what} within {seconds:.0f} s")
    return result[0]


def _accept(address: tuple[str, int], followers: int) -> list[Connection]:
    """Node 0: the other nodes' command connections, once each has loaded its model share."""
    try:
        listener = Listener(address, authkey=_authkey())
    except OSError as exc:
        raise ValueError(
            f"cannot listen for the other nodes on {address[0]}:{address[1]} (--dist-init-addr's port "
            f"+ {COMMAND_PORT_OFFSET}, node 0's command port): {exc}"
        ) from exc
    conns: list[Connection] = []

    def accept_all() -> list[Connection]:
        while len(conns) < followers:
            try:
                conns.append(listener.accept())
            except AuthenticationError:
                logger.warning(
                    "A connection to the command port failed the handshake (another "
                    "SGLAX_NODE_AUTHKEY?); still waiting for the other nodes."
                )
        return conns

    try:
        return _within(
            CONNECT_TIMEOUT_S,
            accept_all,
            f"only {len(conns)} of the {followers} other nodes connected to {address[0]}:{address[1]}",
        )
    finally:
        listener.close()


def _connect(address: tuple[str, int]) -> Connection:
    """A follower: connect to node 0's command port, which opens once node 0 has loaded its share."""
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while True:
        try:
            return _within(
                max(deadline - time.monotonic(), 1.0),
                lambda: Client(address, authkey=_authkey()),
                f"node 0's command port {address[0]}:{address[1]} did not answer as an sglax node 0",
            )
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
        except AuthenticationError as exc:
            raise ValueError(
                f"node 0's command port {address[0]}:{address[1]} refused this node's handshake: set "
                "the same SGLAX_NODE_AUTHKEY on every node"
            ) from exc


class _MirroredPrograms:
    """Node 0's compiled step programs (`StepPrograms`): a shape it queues to compile aside, the
    followers queue too, so that they seldom compile inline while node 0 waits for them."""

    def __init__(self, programs: Any, nodes: NodeGroup) -> None:
        self._programs = programs
        self._nodes = nodes
        self._sent: set[Any] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._programs, name)

    def _send(self, shape: Any) -> None:
        if shape not in self._sent:
            self._sent.add(shape)
            self._nodes.send("prepare", shape)

    def prepare(self, shape: Any) -> None:
        self._send(shape)
        self._programs.prepare(shape)

    def shape_for(self, need: Any) -> Any:
        shape = self._programs.shape_for(need)
        if shape != need:  # borrowed: its own compiles aside
            self._send(need)
        return shape


class MirroredRunner:
    """Node 0's model runner: the runner's calls that run device programs go to every follower
    first (see the module's docstring), and so do the shapes it compiles; everything else is the
    runner's own."""

    def __init__(self, runner: Any, nodes: NodeGroup) -> None:
        self._runner = runner
        self._nodes = nodes
        self.step_programs = _MirroredPrograms(runner.step_programs, nodes)
        self._step_numbers = itertools.count()
        self._last_step = -1
        # id(step or device array) -> (step number, field), while the object lives (an entry goes
        # when its object does, so no id is named twice)
        self._named: dict[int, tuple[int, str]] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)

    def _mirror(self, name: str, *args: Any) -> Any:
        return self._call(name, args, *args)

    def _call(self, name: str, sent: tuple, *args: Any) -> Any:
        """Send `name` with `sent` (device outputs named), then run it here with `args`."""
        with self._nodes.lock:
            self._nodes.send(name, *sent)
            result = getattr(self._runner, name)(*args)
            settle(self._runner)
            return result

    def _ref(self, item: Any) -> tuple[int, str]:
        named = self._named.get(id(item))
        if named is None or named[0] <= self._last_step - STEPS_KEPT:
            raise RuntimeError("only the last few mirrored steps' outputs can be named to the other nodes")
        return named

    def _name(self, item: Any, number: int, field: str) -> None:
        key = id(item)
        self._named[key] = (number, field)
        weakref.finalize(item, self._named.pop, key, None)

    def forward(self, batch: Any) -> Any:
        with self._nodes.lock:
            number = next(self._step_numbers)
            self._nodes.send("forward", number, batch)
            step = self._runner.forward(batch)
            settle(self._runner)
            self._last_step = number
            for field in ("logits", "hidden"):
                self._name(getattr(step, field), number, field)
            self._name(step, number, "step")
        return step

    def sample(self, step: Any) -> Any:
        return self._call("sample", (self._ref(step),), step)

    def run(self, batch: Any) -> Any:
        """The step's forward and sampling, each mirrored (the runner's own `run` would call
        its own, which no follower would run)."""
        return self.sample(self.forward(batch))

    def readout(self, hidden: Any, rows: list[int], kind: str) -> Any:
        return self._call("readout", (self._ref(hidden), rows, kind), hidden, rows, kind)

    def prompt_logprobs(self, hidden: Any, rows: list[int], targets: list[int], whole: bool) -> Any:
        sent = (self._ref(hidden), rows, targets, whole)
        return self._call("prompt_logprobs", sent, hidden, rows, targets, whole)

    def full_logprobs(self, logits: Any) -> Any:
        return self._call("full_logprobs", (self._ref(logits),), logits)

    def compile_programs(self, shapes: list[Any]) -> None:
        self._mirror("compile_programs", shapes)

    def reset_penalties(self, slot: int, prompt_ids: list[int]) -> None:
        self._mirror("reset_penalties", slot, prompt_ids)

    def count_outputs(self, slot: int, tokens: list[int]) -> None:
        self._mirror("count_outputs", slot, tokens)

    def set_recording(self, on: bool) -> None:
        self._mirror("set_recording", on)

    def take_expert_histogram(self) -> Any:
        return self._mirror("take_expert_histogram")

    def stage_weights(self, model_path: str, load_format: str | None) -> str | None:
        """Every follower loads and places the checkpoint, keeping it aside; None when all did,
        else the first failure's message (then every follower drops what it staged)."""
        with self._nodes.lock:
            self._nodes.send("stage_weights", model_path, load_format)
            failures = [reply for reply in self._nodes.replies() if reply is not None]
        if failures:
            self._nodes.send("drop_weights")
            return failures[0]
        return None

    def drop_weights(self) -> None:
        self._nodes.send("drop_weights")

    def swap_params(self, placed: Any) -> None:
        with self._nodes.lock:
            self._nodes.send("swap_weights")
            self._runner.swap_params(placed)

    def close(self) -> None:
        self._nodes.send("close")
        self._nodes.close()
        self._runner.close()


def follow(runner: Any, nodes: NodeGroup, stage_weights: Callable[[str, str | None], Any]) -> None:
    """A follower's loop: run each of node 0's device calls on this node's devices, until node 0
    says stop; raises if node 0 vanishes or a call fails (the caller then `abandon`s). A
    `stage_weights(path, load_format)` loads and places a checkpoint as node 0's engine does, for
    `swap_params`."""
    conn = nodes.conns[0]
    steps: dict[int, Any] = {}
    staged: Any = None
    while True:
        try:
            name, *args = conn.recv()
        except EOFError as exc:  # node 0 died: nobody will leave JAX's processes with this node
            raise ConnectionError("node 0 closed the command connection without a stop") from exc
        if name == "close":
            break
        if name == "forward":
            number, batch = args
            steps[number] = runner.forward(batch)
            steps.pop(number - STEPS_KEPT, None)
            settle(runner)
        elif name == "sample":
            runner.sample(steps[args[0][0]])
            settle(runner)
        elif name in ("readout", "prompt_logprobs", "full_logprobs"):
            (number, field), *rest = args
            getattr(runner, name)(getattr(steps[number], field), *rest)
        elif name == "stage_weights":
            try:
                staged = stage_weights(*args)
                conn.send(None)
            except Exception as exc:  # the update fails on every node; this one keeps serving
                logger.exception("Staging the new weights failed")
                conn.send(f"node {nodes.rank}: {type(exc).__name__}: {exc}")
        elif name == "prepare":
            runner.step_programs.prepare(*args)
        elif name == "drop_weights":
            staged = None
        elif name == "swap_weights":
            runner.swap_params(staged)
            staged = None
        else:
            getattr(runner, name)(*args)
            settle(runner)
    nodes.close()
    runner.close()
