"""A step's host arrays packed into one buffer come back bit for bit inside a program."""

import jax
import numpy as np
import pytest

from runtime.model_runner import sampling_inputs
from runtime.packed_inputs import PackedArrays
from runtime.sampling import SamplingRow, make_sampling_batch
from runtime.sampling_params import SamplingParams


def _mixed_arrays(rng: np.random.Generator) -> dict[str, np.ndarray]:
    floats = rng.standard_normal((3, 5)).astype(np.float32)
    floats[0, 0], floats[1, 1], floats[2, 2] = np.nan, -np.inf, -0.0
    return {
        "ids": rng.integers(-(2**31), 2**31 - 1, size=7, dtype=np.int64).astype(np.int32),
        "floats": floats,
        "seeds": rng.integers(0, 2**32, size=(4, 2), dtype=np.uint64).astype(np.uint32),
        "valid": rng.random(6) < 0.5,
        "count": np.int32(11),
        "empty": np.zeros((0, 3), np.int32),
    }


def test_round_trip_inside_a_program_is_bit_exact():
    arrays = _mixed_arrays(np.random.default_rng(0))
    packed = PackedArrays.pack(arrays, static={"rows": 4})
    assert packed.buffer.dtype == np.int32 and packed.buffer.ndim == 1

    @jax.jit
    def unpack(inputs: PackedArrays) -> dict[str, jax.Array]:
        assert inputs.static == {"rows": 4}  # static values reach the traced function
        return inputs.unpack()

    out = jax.device_get(unpack(jax.device_put(packed)))
    assert sorted(out) == sorted(arrays)
    for name, want in arrays.items():
        got = out[name]
        assert got.dtype == np.asarray(want).dtype and got.shape == np.shape(want), name
        assert np.asarray(got).tobytes() == np.asarray(want).tobytes(), name


def test_layout_and_static_values_key_the_compiled_program():
    arrays = _mixed_arrays(np.random.default_rng(1))
    base = jax.tree.structure(PackedArrays.pack(arrays, static={"rows": 4}))
    assert base == jax.tree.structure(PackedArrays.pack(_mixed_arrays(np.random.default_rng(2)), {"rows": 4}))
    assert base != jax.tree.structure(PackedArrays.pack(arrays, static={"rows": 8}))
    reshaped = {**arrays, "floats": arrays["floats"].reshape(5, 3)}
    assert base != jax.tree.structure(PackedArrays.pack(reshaped, static={"rows": 4}))


def test_sampling_inputs_carry_every_field():
    rows = [
        SamplingRow(
            SamplingParams(temperature=0.7, top_k=5, top_p=0.9), seed=3, output_index=2, penalty_slot=1
        ),
        SamplingRow(SamplingParams(temperature=0.0, min_new_tokens=4), 9, 0, 2, eos_ids=(2,)),
    ]
    batch = make_sampling_batch(rows, 4)
    valid = np.array([True, True, False, False])
    fields = jax.device_get(jax.jit(lambda p: p.unpack())(sampling_inputs(batch, valid)))
    np.testing.assert_array_equal(fields.pop("sample_valid"), valid)
    for name, got in fields.items():
        want = getattr(batch, name)
        assert got.dtype == want.dtype, name
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_other_dtypes_are_refused():
    with pytest.raises(TypeError, match="int64"):
        PackedArrays.pack({"wide": np.zeros(3, np.int64)})
