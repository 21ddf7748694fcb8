"""Sentence-embedding pooling, as a sentence-transformers folder configures it.

`modules.json` lists the pipeline (Transformer -> Pooling -> Normalize); the
Pooling module's `config.json` picks the mode. Folders without
`modules.json` get the caller's default (mean for BERT encoders, last token
plus normalisation for gte-Qwen2 style causal embedding models).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp

POOLING_MODES = ("mean", "cls", "lasttoken", "max")
# sentence-transformers Pooling config flag -> our mode name.
_MODE_FLAGS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_lasttoken": "lasttoken",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": "weightedmean",
}
_ST = "sentence_transformers.models."
_TRANSFORMER, _POOLING, _NORMALIZE = f"{_ST}Transformer", f"{_ST}Pooling", f"{_ST}Normalize"


@dataclasses.dataclass(frozen=True)
class Pooling:
    """How token states become one vector per sequence: a mode, then optional L2 normalisation."""

    mode: str = "mean"
    normalize: bool = False

    def __post_init__(self) -> None:
        if self.mode not in POOLING_MODES:
            raise ValueError(
                f"pooling mode {self.mode!r} is not supported (supported: {list(POOLING_MODES)})"
            )

    def pool(self, hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """float32[B, H] from `hidden[B, L, H]` and `attention_mask[B, L]` (1 on real tokens)."""
        hidden = hidden.astype(jnp.float32)
        mask = attention_mask.astype(jnp.float32)[..., None]
        if self.mode == "mean":
            pooled = jnp.sum(hidden * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1e-9)
        elif self.mode == "cls":
            pooled = hidden[:, 0]
        elif self.mode == "max":
            pooled = jnp.max(jnp.where(mask > 0, hidden, -1e9), axis=1)
        else:  # lasttoken: the last real position, wherever the padding sits
            positions = jnp.arange(hidden.shape[1])[None, :]
            last = jnp.max(jnp.where(attention_mask > 0, positions, 0), axis=1)
            pooled = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
        if self.normalize:
            pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        return pooled


def load_pooling(model_path: str | os.PathLike, default: Pooling | None = None) -> Pooling:
    """The pooling a model folder's sentence-transformers config asks for, else `default` (mean).

    Raises ValueError for pipelines we cannot reproduce (a Dense layer, several pooling modes).
    """
    folder = Path(model_path)
    folder = folder.parent if folder.is_file() else folder
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return default or Pooling()
    modules = sorted(json.loads(modules_file.read_text()), key=lambda m: m.get("idx", 0))
    mode, normalize = None, False
    for module in modules:
        kind = module.get("type", "")
        if kind == _TRANSFORMER:
            continue
        if kind == _POOLING:
            mode = _pooling_mode(folder / module.get("path", ""))
        elif kind == _NORMALIZE:
            normalize = True
        else:
            raise ValueError(f"{modules_file}: sentence-transformers module {kind!r} is not supported")
    if mode is None:
        raise ValueError(f"{modules_file} has no Pooling module")
    return Pooling(mode=mode, normalize=normalize)


def _pooling_mode(folder: Path) -> str:
    """The one mode a Pooling module's config turns on."""
    config = json.loads((folder / "config.json").read_text())
    modes = [name for flag, name in _MODE_FLAGS.items() if config.get(flag)]
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise ValueError(
            f"{folder / 'config.json'}: pooling {modes} is not supported (exactly one of {POOLING_MODES})"
        )
    return modes[0]
