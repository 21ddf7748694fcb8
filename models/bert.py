"""BERT encoders (sentence-transformers models such as all-MiniLM-L6-v2).

Bidirectional, so no paged KV cache: the engine hands a plain padded batch
`[B, L]` with its attention mask and gets hidden states `[B, L, H]` back, to
pool as the folder's sentence-transformers config says (`models/pooling.py`).
Post-LN blocks, exact-erf GELU as HF's "gelu"; layers stacked and scanned like
the decoders.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.layers import (
    Dtype,
    HFTensorReader,
    LayerNorm,
    Params,
    activation,
    config_value,
    embedding,
    linear,
    stack_layers,
    stacked,
)

_MASKED = -0.7 * float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The fields of an HF BERT config the encoder uses."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, config: Any) -> BertConfig:
        position_type = config_value(config, "position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(
                f"BERT position_embedding_type {position_type!r} is not supported (only 'absolute')"
            )
        cfg = cls(
            vocab_size=int(config_value(config, "vocab_size")),
            hidden_size=int(config_value(config, "hidden_size")),
            intermediate_size=int(config_value(config, "intermediate_size")),
            num_layers=int(config_value(config, "num_hidden_layers")),
            num_heads=int(config_value(config, "num_attention_heads")),
            max_position_embeddings=int(config_value(config, "max_position_embeddings")),
            type_vocab_size=int(config_value(config, "type_vocab_size", 2)),
            layer_norm_eps=float(config_value(config, "layer_norm_eps", 1e-12)),
            hidden_act=str(config_value(config, "hidden_act", "gelu")),
        )
        if cfg.hidden_size % cfg.num_heads:
            raise ValueError(f"hidden size {cfg.hidden_size} does not split over {cfg.num_heads} heads")
        activation(cfg.hidden_act)
        return cfg


class BertEmbeddings(nnx.Module):
    """Word + absolute position + token type embeddings, then LayerNorm."""

    def __init__(self, cfg: BertConfig, dtype: Dtype, rngs: nnx.Rngs):
        self.word_embeddings = embedding(cfg.vocab_size, cfg.hidden_size, dtype, rngs)
        self.position_embeddings = embedding(cfg.max_position_embeddings, cfg.hidden_size, dtype, rngs)
        self.token_type_embeddings = embedding(cfg.type_vocab_size, cfg.hidden_size, dtype, rngs)
        self.norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype)

    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        # Batches pad to bucket widths that may pass the position table (e.g. 64 over 40
        # positions); padding positions take its last row instead of an out-of-range NaN.
        last = self.position_embeddings.num_embeddings - 1
        positions = jnp.minimum(jnp.arange(input_ids.shape[1]), last)[None, :]
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        return self.norm(x + self.position_embeddings(positions))


class BertLayer(nnx.Module):
    """Self-attention and feed-forward, each followed by residual + LayerNorm (post-LN)."""

    def __init__(self, cfg: BertConfig, dtype: Dtype, rngs: nnx.Rngs):
        hidden = cfg.hidden_size
        self.query = linear(hidden, hidden, dtype, rngs, bias=True)
        self.key = linear(hidden, hidden, dtype, rngs, bias=True)
        self.value = linear(hidden, hidden, dtype, rngs, bias=True)
        self.attention_output = linear(hidden, hidden, dtype, rngs, bias=True)
        self.attention_norm = LayerNorm(hidden, cfg.layer_norm_eps, dtype)
        self.intermediate = linear(hidden, cfg.intermediate_size, dtype, rngs, bias=True)
        self.output = linear(cfg.intermediate_size, hidden, dtype, rngs, bias=True)
        self.output_norm = LayerNorm(hidden, cfg.layer_norm_eps, dtype)
        self.num_heads, self.head_dim, self.act = cfg.num_heads, cfg.head_dim, cfg.hidden_act

    def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
        batch, length, hidden = x.shape
        split = (batch, length, self.num_heads, self.head_dim)
        q, k, v = (proj(x).reshape(split) for proj in (self.query, self.key, self.value))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * self.head_dim**-0.5
        scores = jnp.where(key_mask[:, None, None, :], scores, _MASKED)
        probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
        context = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, length, hidden)
        x = self.attention_norm(self.attention_output(context) + x)
        return self.output_norm(self.output(activation(self.act)(self.intermediate(x))) + x)


class BertModel(nnx.Module):
    """HF `BertModel` without the pooler (sentence-transformers pools the hidden states itself)."""

    architecture: ClassVar[str] = "BertModel"
    kind: ClassVar[str] = "encoder"
    config_from_hf = staticmethod(BertConfig.from_hf)

    def __init__(self, config: Any, dtype: Dtype, rngs: nnx.Rngs):
        self.cfg = BertConfig.from_hf(config)
        self.embeddings = BertEmbeddings(self.cfg, dtype, rngs)
        self.layers = stacked(self.cfg.num_layers, rngs, lambda r: BertLayer(self.cfg, dtype, r))

    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array, token_type_ids: jax.Array | None = None
    ) -> jax.Array:
        """`hidden[B, L, H]` of a padded batch; `attention_mask[B, L]` is 1 on real tokens."""
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)
        key_mask = attention_mask.astype(bool)
        graphdef, layer_state = nnx.split(self.layers)

        def body(x: jax.Array, state: Any) -> tuple[jax.Array, None]:
            return nnx.merge(graphdef, state)(x, key_mask), None

        x, _ = jax.lax.scan(body, x, layer_state)
        return x

    @classmethod
    def params_from_hf(cls, config: Any, tensors: Mapping[str, np.ndarray]) -> Params:
        """HF tensors (bare names, or under `bert.`) -> a pure dict matching `nnx.state(model, nnx.Param)`.

        Raises `WeightError` naming every missing, unexpected or mis-shaped tensor; the
        unused pooler and the `position_ids` buffer are ignored.
        """
        cfg = BertConfig.from_hf(config)
        harmless = [r"(^|\.)embeddings\.position_ids$", r"^(bert\.)?pooler\."]
        reader = HFTensorReader(tensors, cls.architecture, harmless=harmless)
        prefix = "bert." if any(name.startswith("bert.embeddings.") for name in tensors) else ""
        hidden, inter = cfg.hidden_size, cfg.intermediate_size

        def norm(name: str) -> Params:
            if reader.has(f"{name}.gamma"):  # checkpoints from the TF era
                return {
                    "weight": reader.take(f"{name}.gamma", (hidden,)),
                    "bias": reader.take(f"{name}.beta", (hidden,)),
                }
            return reader.norm(name, hidden, bias=True)

        def layer(i: int) -> Params:
            p = f"{prefix}encoder.layer.{i}."
            return {
                "query": reader.linear(f"{p}attention.self.query", hidden, hidden, bias=True),
                "key": reader.linear(f"{p}attention.self.key", hidden, hidden, bias=True),
                "value": reader.linear(f"{p}attention.self.value", hidden, hidden, bias=True),
                "attention_output": reader.linear(f"{p}attention.output.dense", hidden, hidden, bias=True),
                "attention_norm": norm(f"{p}attention.output.LayerNorm"),
                "intermediate": reader.linear(f"{p}intermediate.dense", hidden, inter, bias=True),
                "output": reader.linear(f"{p}output.dense", inter, hidden, bias=True),
                "output_norm": norm(f"{p}output.LayerNorm"),
            }

        e = f"{prefix}embeddings."
        params: Params = {
            "embeddings": {
                "word_embeddings": reader.embedding(f"{e}word_embeddings.weight", cfg.vocab_size, hidden),
                "position_embeddings": reader.embedding(
                    f"{e}position_embeddings.weight", cfg.max_position_embeddings, hidden
                ),
                "token_type_embeddings": reader.embedding(
                    f"{e}token_type_embeddings.weight", cfg.type_vocab_size, hidden
                ),
                "norm": norm(f"{e}LayerNorm"),
            },
            "layers": stack_layers([layer(i) for i in range(cfg.num_layers)]),
        }
        reader.finish()
        return params
