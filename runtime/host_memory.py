"""The host's memory: what is free, and keeping glibc from returning XLA's large scratch
buffers to the kernel after every call.

XLA's CPU runtime allocates its per-call scratch with malloc. Above glibc's mmap
threshold each such buffer is a fresh mmap that the kernel zero-fills again on
every step; measured here, that page-fault work was most of a decode step's
time (a [32, 49152] sampling call: 8-12 ms before, 1.2 ms after). Raising the
mmap and trim thresholds keeps the memory in the heap for reuse.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Raise glibc's mmap/trim thresholds for this process; False where there is no glibc."""
    libc = _libc()
    try:
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except AttributeError:  # no libc, or one without mallopt
        return False
    if not ok:
        logger.debug("mallopt refused the thresholds")
    return ok


def release_freed_memory() -> bool:
    """Give the heap's free memory back to the kernel now (`malloc_trim`): for after a rare large
    transient, such as writing a profiler trace, which the raised thresholds would otherwise keep."""
    try:
        return bool(_libc().malloc_trim(0))
    except AttributeError:  # no libc, or one without malloc_trim
        return False


def host_available_bytes() -> int:
    """MemAvailable from /proc/meminfo: what the host can give without swapping."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                parts = line.split()
                return int(parts[1]) * 1024  # the figure is in kB
    raise RuntimeError("/proc/meminfo has no MemAvailable line")
