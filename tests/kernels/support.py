"""Helpers for the kernel tests: the module-level skip, the H100 lowering check, error metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import pytest

from kernels_pallas import _backend


def skip_without_mosaic_gpu() -> None:
    """Module-level skip, with the reason, where the Mosaic GPU kernels cannot run (JAX < 0.11)."""
    if not _backend.MOSAIC_GPU_AVAILABLE:
        why = _backend.UNAVAILABLE_REASON
        reason = f"kernel tests need the Python 3.12 + JAX 0.11 venv (make test-kernels): {why}"
        pytest.skip(reason, allow_module_level=True)


H100 = dict(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)


def lower_for_h100(fn: Callable[..., Any], *args: Any) -> str:
    """Lower `fn(*args)` for CUDA on an abstract H100 (no GPU needed) and return the HLO text.

    Mosaic GPU compiles the kernel body to its MLIR here, so wgmma shapes,
    layouts, swizzles and unsupported primitives fail at this step; ptxas and
    the hardware are not involved.
    """
    device = jax.sharding.AbstractDevice(**H100)
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=device)):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def relative_error(actual: Any, expected: Any) -> float:
    """max |actual - expected| / max |expected|, in float64."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


def race_params() -> Any:
    """Interpreter parameters with the race detector on (vector clocks over SMEM, TMA and barriers)."""
    return _backend.plgpu.InterpretGPUParams(detect_races=True)


def races_found() -> bool:
    """Whether the last interpreted kernel run with `race_params()` raced."""
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

    return bool(gpu_callbacks.get_races().races_found)
