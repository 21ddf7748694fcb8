"""Client helpers the SGLang notebooks use, working against this server.

`launch_server_cmd("python3 -m sglang.launch_server --model-path ...")` starts
`python -m server.launch_server` with the same flags, so a notebook written for
the reference runs unchanged. The server runs in its own process group, and
`terminate_process` ends that whole group.
"""

from __future__ import annotations

import html
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

# Launch prefixes that mean "start the server": the reference's and ours.
SERVER_MODULES = ("sglang.launch_server", "server.launch_server")
POLL_INTERVAL = 1.0
TERMINATE_GRACE = 10.0


def find_free_port(host: str = "0.0.0.0") -> int:
    """A port nobody listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def server_argv(command: str) -> list[str]:
    """The argv to run for a launch command; `python[3] -m sglang.launch_server` becomes ours."""
    parts = shlex.split(command.replace("\\\n", " "))
    for index in range(len(parts) - 2):
        executable = os.path.basename(parts[index])
        if (
            executable.startswith("python")
            and parts[index + 1] == "-m"
            and parts[index + 2] in SERVER_MODULES
        ):
            return [sys.executable, "-m", "server.launch_server", *parts[index + 3 :]]
    return parts


def launch_server_cmd(
    command: str, host: str = "0.0.0.0", port: int | None = None
) -> tuple[subprocess.Popen, int]:
    """Start a server from a shell-style command with `--port` appended; returns (process, port).

    The process gets its own process group, so `terminate_process` can end it and
    everything it started. Its output goes to this process's stdout.
    """
    if port is None:
        port = find_free_port(host)
    argv = server_argv(command) + ["--port", str(port)]
    process = subprocess.Popen(argv, stderr=subprocess.STDOUT, start_new_session=True)
    return process, port


def wait_for_server(
    base_url: str,
    timeout: float | None = None,
    api_key: str | None = None,
    process: subprocess.Popen | None = None,
) -> None:
    """Poll `{base_url}/v1/models` until it answers 200.

    TimeoutError after `timeout` seconds (None waits forever); RuntimeError at once
    if `process` is given and exits first.
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    start = time.monotonic()
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"The server process exited with code {process.returncode} before it was ready."
            )
        try:
            request = urllib.request.Request(f"{base_url}/v1/models", headers=headers)
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if timeout is not None and time.monotonic() - start > timeout:
            raise TimeoutError(f"The server at {base_url} did not become ready within {timeout} s.")
        time.sleep(POLL_INTERVAL)


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython  # type: ignore[import-not-found]
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def print_highlight(text: object) -> None:
    """Print in colour: HTML in a Jupyter notebook (as the reference's notebooks), ANSI in a terminal."""
    if _in_notebook():
        from IPython.display import HTML, display  # type: ignore[import-not-found]

        content = html.escape(str(text)).replace("\n", "<br>")
        display(HTML(f"<strong style='color: #00008B;'>{content}</strong>"))
    else:
        print(f"\033[1;34m{text}\033[0m", flush=True)


def terminate_process(process: subprocess.Popen, timeout: float = TERMINATE_GRACE) -> None:
    """End the process and its whole process group: SIGTERM (the server drains), SIGKILL after `timeout`."""
    if process.poll() is not None:
        return
    try:
        group = os.getpgid(process.pid)
    except ProcessLookupError:
        return
    own_group = group == os.getpgid(0)

    def send(sig: signal.Signals) -> None:
        try:
            if own_group:
                process.send_signal(sig)  # never signal our own group
            else:
                os.killpg(group, sig)
        except ProcessLookupError:
            pass

    send(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        process.wait()
    if not own_group:
        # Children that outlived the leader (they share its group) go too.
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
