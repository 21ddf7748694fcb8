"""What the Mosaic GPU kernels need from the installed JAX, and the dispatchers' backend choice.

`plgpu` is imported once here, behind a guard: on JAX 0.10.x the import needs
absl-py (not a dependency of ours) and the kernels need 0.11 APIs, so there the
kernel modules still import and every dispatcher runs the XLA reference.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Literal

import jax

MIN_JAX_VERSION = (0, 11)
BACKENDS = ("auto", "pallas", "reference")

_logger = logging.getLogger("kernels_pallas")
_warned: set[str] = set()


def jax_version() -> tuple[int, ...]:
    """The installed JAX's (major, minor, patch), ignoring dev/rc suffixes."""
    return tuple(int(part) for part in re.findall(r"\d+", jax.__version__)[:3])


pl: Any
plgpu: Any
try:
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError as error:  # JAX 0.10 without absl-py, or a JAX without Pallas
    pl = plgpu = None
    UNAVAILABLE_REASON = f"Mosaic GPU Pallas does not import ({error})"
else:
    UNAVAILABLE_REASON = ""
if not UNAVAILABLE_REASON and jax_version()[:2] < MIN_JAX_VERSION:
    UNAVAILABLE_REASON = f"the Mosaic GPU kernels need JAX >= 0.11, found {jax.__version__}"

MOSAIC_GPU_AVAILABLE = not UNAVAILABLE_REASON


def warn_once(message: str) -> None:
    """One log line per distinct message, so a fallback inside a traced layer scan is not repeated."""
    if message not in _warned:
        _warned.add(message)
        _logger.warning(message)


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def resolve_backend(backend: str, kernel: str, unsupported: str = "") -> Literal["pallas", "reference"]:
    """Map a dispatcher's `backend` argument to the implementation that runs.

    "auto" takes the kernel on a GPU with JAX >= 0.11 when the inputs suit it
    (`unsupported` is empty), the reference otherwise. "pallas" forces the
    kernel, and falls back to the reference with a one-line warning where the
    kernel cannot run (old JAX, no GPU, unsupported inputs).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    reason = UNAVAILABLE_REASON or ("" if on_gpu() else "no GPU") or unsupported
    if not reason:
        return "pallas"
    if backend == "pallas":
        warn_once(f"{kernel}: backend='pallas' falls back to the XLA reference: {reason}")
    return "reference"


def interpret_params() -> Any:
    """The GPU interpreter's parameters (CPU tests): simulated SMEM, TMA, barriers and wgmma."""
    if not MOSAIC_GPU_AVAILABLE:
        raise RuntimeError(UNAVAILABLE_REASON)
    return plgpu.InterpretGPUParams()


def sm_count() -> int:
    """Streaming multiprocessors of the default device: the persistent grids' CTA count (132 on H100 SXM)."""
    return int(getattr(jax.devices()[0], "core_count", 0) or 132)
