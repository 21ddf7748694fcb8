"""What the kernel tests take for granted about the GPU interpreter, checked so an upgrade cannot void it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.kernels.support import skip_without_mosaic_gpu

skip_without_mosaic_gpu()

from kernels_pallas._backend import plgpu  # noqa: E402

pytestmark = pytest.mark.kernels


def test_unwritten_output_is_poisoned(interpret, interpreter_only):
    """Outputs a kernel never writes read as NaN (floats) and INT_MAX (ints): missed rows cannot pass."""

    def writes_nothing(x_ref, float_ref, int_ref):
        del x_ref, float_ref, int_ref

    kernel = plgpu.kernel(
        writes_nothing,
        out_type=(jax.ShapeDtypeStruct((8, 64), jnp.bfloat16), jax.ShapeDtypeStruct((8,), jnp.int32)),
        grid=(2,),
        grid_names=("cta",),
        interpret=interpret,
    )
    floats, ints = kernel(jnp.zeros((4,), jnp.float32))
    assert np.isnan(np.asarray(floats, np.float32)).all()
    assert np.all(np.asarray(ints) == np.iinfo(np.int32).max)
