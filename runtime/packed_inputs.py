"""A step's small host arrays sent to the device as one buffer.

A step has about twenty small inputs (token ids, positions, page table, the
sampling knobs). `jax.device_put` moves each as its own host-to-device copy,
and on a GPU the host's cost of those copies (Python, then one transfer each)
is a large share of a decode step's host work: the serving loop is host-bound
there. So the arrays travel bit-cast into one int32 buffer, and the program
slices them back out; the slices are free (XLA fuses them into their users).
The buffer goes to the program as a numpy array: the jit call copies it to the
device for less host time than a `jax.device_put` of it first.

The layout (names, shapes, dtypes) and any static values the program needs
(`static`, e.g. how many rows decode) are the pytree's static part: a program
is compiled for one layout, as it is for one set of shapes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# dtypes that travel: 4-byte ones bit-cast, bool widened to 0 / 1
_FOUR_BYTE = ("int32", "uint32", "float32")
# their names by dtype: `dtype.name` takes ~1.5 us, and a step packs ~22 arrays
_PACKED_NAMES = {np.dtype(name): name for name in (*_FOUR_BYTE, "bool")}

Layout = tuple[tuple[str, tuple[int, ...], str], ...]
Static = tuple[tuple[str, Any], ...]


@jax.tree_util.register_pytree_node_class
class PackedArrays:
    """Named arrays in one int32 buffer (numpy on the host, a device array in a program)."""

    def __init__(self, buffer: Any, layout: Layout, static: Static = ()) -> None:
        self.buffer = buffer
        self.layout = layout
        self.static = dict(static)

    @classmethod
    def pack(cls, arrays: Mapping[str, np.ndarray], static: Mapping[str, Any] | None = None) -> PackedArrays:
        """Flatten, bit-cast to int32 and concatenate, in the mapping's order; `static` values
        (hashable) ride in the pytree's static part."""
        parts, layout = [], []
        for name, array in arrays.items():
            array = np.asarray(array)
            dtype = _PACKED_NAMES.get(array.dtype) or array.dtype.name
            if dtype == "bool":
                flat = array.astype(np.int32).ravel()
            elif dtype in _FOUR_BYTE:
                flat = np.ascontiguousarray(array).view(np.int32).ravel()
            else:
                raise TypeError(f"{name}: {dtype} arrays are not packed (4-byte dtypes and bool only)")
            parts.append(flat)
            layout.append((name, array.shape, dtype))
        buffer = np.concatenate(parts) if parts else np.zeros(0, np.int32)
        return cls(buffer, tuple(layout), tuple((static or {}).items()))

    def unpack(self) -> dict[str, jax.Array]:
        """The named arrays, sliced out of the buffer (inside a program)."""
        arrays, offset = {}, 0
        for name, shape, dtype in self.layout:
            size = int(np.prod(shape, dtype=np.int64))
            flat = self.buffer[offset : offset + size]
            offset += size
            if dtype == "bool":
                value = flat != 0
            elif dtype == "int32":
                value = flat
            else:
                value = jax.lax.bitcast_convert_type(flat, jnp.dtype(dtype))
            arrays[name] = value.reshape(shape)
        return arrays

    def tree_flatten(self) -> tuple[tuple[Any], tuple[Layout, Static]]:
        return (self.buffer,), (self.layout, tuple(self.static.items()))

    @classmethod
    def tree_unflatten(cls, aux: tuple[Layout, Static], children: tuple[Any]) -> PackedArrays:
        return cls(children[0], *aux)
