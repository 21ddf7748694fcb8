"""Checkpoint folder -> a ready NNX model, and weights for a hot swap.

The module is built abstractly (`nnx.eval_shape`: no random init of big
weights), then its parameters are filled from HF tensors (safetensors, sharded
safetensors, GGUF through `runtime.weights`) or from an Orbax tree written by
`scripts/convert_checkpoint.py`, cast to the serving dtype. Every tree is
checked leaf by leaf against the module before it is used, so a wrong
checkpoint fails here with the tensor's name, never inside a jitted step.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.layers import Params, config_value
from models.registry import architecture_of, get_model_class
from runtime.weights import (
    LOAD_FORMATS,
    WeightError,
    check_params_match,
    detect_load_format,
    load_config,
    load_hf_tensors,
    load_orbax,
)

DTYPES: dict[str, Any] = {
    "float32": jnp.float32,
    "float": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
    "half": jnp.float16,
}


@dataclasses.dataclass
class LoadedModel:
    """A model ready to serve, with the HF config it came from."""

    config: Any  # transformers PretrainedConfig
    model: nnx.Module
    architecture: str
    dtype: Any

    @property
    def kind(self) -> str:
        """One of "causal_lm", "sequence_classification", "encoder"."""
        return type(self.model).kind


def resolve_dtype(dtype_arg: str, config: Any, platform: str) -> Any:
    """The serving dtype: as asked, or for "auto" the checkpoint's own dtype (float32 on CPU).

    CPUs run bfloat16/float16 matmuls slowly and less exactly, so "auto" keeps float32 there.
    """
    if dtype_arg != "auto":
        if dtype_arg not in DTYPES:
            raise ValueError(f"dtype {dtype_arg!r} is not supported (choose auto or one of {sorted(DTYPES)})")
        return DTYPES[dtype_arg]
    return jnp.float32 if platform == "cpu" else checkpoint_dtype(config)


def checkpoint_dtype(config: Any) -> Any:
    """The dtype the checkpoint's config says it was saved in (`dtype`, or older `torch_dtype`)."""
    stored = config_value(config, "dtype") or config_value(config, "torch_dtype")
    name = str(stored).removeprefix("torch.") if stored is not None else "float32"
    return DTYPES.get(name, jnp.float32)


def abstract_model(cls: type[nnx.Module], config: Any, dtype: Any) -> nnx.Module:
    """The module with shape/dtype placeholders instead of arrays (nothing allocated)."""
    return nnx.eval_shape(lambda: cls(config, dtype, rngs=nnx.Rngs(0)))


def param_shapes(model: nnx.Module) -> Params:
    """The pure parameter tree of `model` as `jax.ShapeDtypeStruct` leaves."""
    tree = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def _resolve_format(model_path: str | os.PathLike, load_format: str) -> str:
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load format {load_format!r} is not supported (choose one of {list(LOAD_FORMATS)})")
    if load_format == "dummy":  # no checkpoint to read: only a fresh model takes random weights
        raise WeightError("load format 'dummy' (random weights) loads no checkpoint; a swap needs one")
    found = detect_load_format(model_path)
    if load_format not in ("auto", found):
        raise WeightError(f"{model_path} holds a {found} checkpoint, not {load_format}")
    return found


def _cast_like(tree: Any, like: Any, on_host: bool = False) -> Any:
    """Each leaf of `tree` in the dtype of the matching leaf of `like`: a device array (on the
    default device), or with `on_host` a numpy one, for a caller that places it itself (split
    over several devices, a model too large for one never lands whole on the first)."""
    if isinstance(tree, Mapping):
        return {
            k: _cast_like(v, like.get(k) if isinstance(like, Mapping) else None, on_host)
            for k, v in tree.items()
        }
    if like is None or not hasattr(like, "dtype"):
        return tree
    if on_host:
        return np.asarray(tree).astype(like.dtype, copy=False)
    return jnp.asarray(np.asarray(tree), dtype=like.dtype)


def read_params(
    cls: type[nnx.Module],
    config: Any,
    expected: Params,
    model_path: str | os.PathLike,
    load_format: str,
    on_host: bool = False,
) -> Params:
    """Parameters of `cls` from a checkpoint, cast to and checked against `expected` (shape/dtype
    tree); numpy arrays with `on_host` (`_cast_like`)."""
    fmt = _resolve_format(model_path, load_format)
    raw = (
        load_orbax(model_path) if fmt == "orbax" else cls.params_from_hf(config, load_hf_tensors(model_path))
    )
    params = _cast_like(raw, expected, on_host)
    check_params_match(expected, params)
    return params


def load_model(
    model_path: str, dtype: str = "auto", load_format: str = "auto", on_host: bool = False
) -> LoadedModel:
    """Build the model named by the folder's config and fill it from the checkpoint.

    `load_format`: "auto" (detected), "safetensors", "gguf", "orbax", or "dummy" (random
    weights of the right shapes, for benchmarks). `on_host`: the weights stay on the host (a
    checkpoint's as numpy arrays, random ones on the CPU backend), for the caller to place
    (tensor parallelism).
    """
    config = load_config(model_path)
    architecture = architecture_of(config)
    cls = get_model_class(architecture)
    jdtype = resolve_dtype(dtype, config, jax.default_backend())
    if load_format == "dummy":
        # With `on_host`, made by the CPU backend: no accelerator holds the whole model first.
        with jax.default_device(_host_device() if on_host else None):
            return LoadedModel(config, cls(config, jdtype, rngs=nnx.Rngs(0)), architecture, jdtype)
    abstract = abstract_model(cls, config, jdtype)
    params = read_params(cls, config, param_shapes(abstract), model_path, load_format, on_host)
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, params)
    return LoadedModel(config, nnx.merge(graphdef, state), architecture, jdtype)


def _host_device() -> jax.Device | None:
    """The CPU backend's device; None (the default device) where JAX_PLATFORMS leaves it out."""
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:
        return None


def load_params_for(
    model: nnx.Module,
    model_path: str,
    load_format: str = "auto",
    on_host: bool = False,
) -> Params:
    """New weights for a serving `model` (hot swap): same architecture and settings, every leaf
    of the same shape, cast to the serving dtypes. WeightError otherwise; the model is untouched.
    """
    cls = type(model)
    config = load_config(model_path)
    architecture = architecture_of(config)
    if architecture != cls.architecture:
        raise WeightError(f"{model_path} is a {architecture} checkpoint; the server runs {cls.architecture}")
    try:
        settings = cls.config_from_hf(config)
    except ValueError as e:
        raise WeightError(f"{model_path}: {e}") from e
    if settings != model.cfg:
        changed = [
            f"{f.name}: {getattr(model.cfg, f.name)!r} -> {getattr(settings, f.name)!r}"
            for f in dataclasses.fields(settings)
            if getattr(settings, f.name) != getattr(model.cfg, f.name)
        ]
        raise WeightError(f"{model_path} changes the model's settings ({'; '.join(changed)})")
    return read_params(cls, config, param_shapes(model), model_path, load_format, on_host)
