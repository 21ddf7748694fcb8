"""Fixtures for the kernel tests: fresh random seeds and GPU-interpreter hygiene.

These tests run in the Python 3.12 + JAX 0.11 venv (`make test-kernels`);
the Mosaic GPU modules skip themselves, with the reason, on older JAX.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import pytest

from kernels_pallas import _backend

SEED_ENV = "SGLAX_KERNEL_SEED"  # set it to replay a failing run's seed


@pytest.fixture(autouse=True)
def exact_float32_matmuls() -> Iterator[None]:
    """References in true float32: XLA's GPU default multiplies float32 in TF32 (10-bit mantissas).

    The kernels' float32 path is held to 1e-5 of the output's scale; against a
    TF32 reference a native H200 run measured errors of 1e-4 to 4e-3.
    """
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture
def rng() -> np.random.Generator:
    """A fresh generator per test; the seed is printed (shown on failure) and can be replayed via the env."""
    seed = int(os.environ.get(SEED_ENV) or secrets.randbits(32))
    print(f"{SEED_ENV}={seed}")
    return np.random.default_rng(seed)


@pytest.fixture
def interpret() -> Iterator[Any]:
    """The kernels' `interpret=` argument: the GPU interpreter on CPU, None (run natively) on a GPU.

    The interpreter's global state is reset after each test: without it, one
    failing kernel leaves barriers allocated and every later test fails with
    "Barrier remains allocated". SGLAX_KERNEL_INTERPRET=1 forces the
    interpreter on a GPU machine too.
    """
    if _backend.on_gpu() and os.environ.get("SGLAX_KERNEL_INTERPRET") != "1":
        yield None
        return
    yield _backend.interpret_params()
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

    interpret_pallas_call.reset_gpu_interpret_mode_state()


@pytest.fixture
def interpreter_only(interpret: Any) -> None:
    """For tests of interpreter features (race detection, poisoned memory): skipped when running natively."""
    if interpret is None:
        pytest.skip("checks a GPU-interpreter feature; this run executes the kernels natively")
