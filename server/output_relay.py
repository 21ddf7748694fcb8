"""Outputs from the engine's thread onto the event loop, one wake-up of the loop per batch.

`loop.call_soon_threadsafe` wakes the loop through its self-pipe: a system call on
the calling thread (the engine client's reader, or an in-process engine's
scheduler) for every output, and a decode step delivers one output per running
request (64 a step at batch 64). The relay keeps what arrives while the loop has
not taken it yet and wakes the loop once for all of it; each queue still gets its
items in order.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any


class OutputRelay:
    """Items for asyncio queues of one event loop, put from any thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, Any]] = []

    def put(self, queue: asyncio.Queue, item: Any) -> None:
        """Queue `item` for `queue`; wake the loop only if nothing is waiting for it already."""
        with self._lock:
            self._pending.append((queue, item))
            first = len(self._pending) == 1
        if first:
            try:
                self.loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the event loop is closed: the server is gone
                pass

    def _drain(self) -> None:
        """On the loop: hand everything queued so far to its queues."""
        with self._lock:
            items, self._pending = self._pending, []
        for queue, item in items:
            queue.put_nowait(item)
