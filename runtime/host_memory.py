"""Keep glibc from returning XLA's large scratch buffers to the kernel after every call.

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


def keep_freed_memory() -> bool:
    """Raise glibc's mmap/trim thresholds for this process; False where there is no glibc."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):
        return False
    if not ok:
        logger.debug("mallopt refused the thresholds")
    return ok
