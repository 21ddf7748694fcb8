"""The decoder the Llama family shares, and the pieces every port is built from.

Llama, Qwen2 and Qwen2-MoE differ only in configuration (attention bias, tied
embeddings, rope scaling, the MLP block, grouped-query heads), so one
`Decoder` serves them all; each family's file turns an HF config into a
`DecoderConfig` and names its HF tensors. Layer weights are stacked on a
leading `[L]` axis (built with `nnx.vmap`) and run with `jax.lax.scan` over
(layer params, layer index); the KV pools ride in the scan carry whole, and
attention reads them through the layer index. Norms, softmax and rotary run in
float32; matmuls run in the parameter dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from kernels_pallas.ragged_paged_attention import (
    AttentionMetadata,
    ragged_paged_attention,
    write_kv,
)
from runtime.weights import WeightError

Dtype = Any  # a jnp dtype (jnp.float32, jnp.bfloat16, jnp.float16)
TP_AXIS = "tp"  # the device mesh axis that tensor parallelism splits layers over
Params = dict[str, Any]  # a pure parameter tree, as nnx.to_pure_dict gives


def config_value(config: Any, name: str, default: Any = None) -> Any:
    """One field of an HF config given as a `PretrainedConfig` or a plain dict."""
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


# ----------------------------------------------------------------------------- activations


def sigmoid(x: jax.Array) -> jax.Array:
    """`1 / (1 + exp(-x))` in float32, cast back.

    XLA's CPU `logistic` (behind `jax.nn.sigmoid`/`silu`) is a few ulp off; over SmolLM2's 30
    layers that doubles the float32 logit error against a float64 run, so spell it out.
    """
    x32 = x.astype(jnp.float32)
    return (1.0 / (1.0 + jnp.exp(-x32))).astype(x.dtype)


def silu(x: jax.Array) -> jax.Array:
    """`x * sigmoid(x)`, computed in float32 (see `sigmoid`)."""
    x32 = x.astype(jnp.float32)
    return (x32 / (1.0 + jnp.exp(-x32))).astype(x.dtype)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": silu,
    "swish": silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """HF `hidden_act` name -> function; an unknown name fails at model build, not mid-trace."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported (supported: {sorted(ACTIVATIONS)})")
    return ACTIVATIONS[name]


# ----------------------------------------------------------------------------- rotary embeddings


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary settings as transformers' `rope_parameters` spells them (old `rope_scaling` too)."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    SUPPORTED: ClassVar[tuple[str, ...]] = ("default", "linear", "llama3")

    @classmethod
    def from_hf(cls, config: Any) -> RopeConfig:
        """Read `rope_parameters` (transformers >= 5) or `rope_theta` + `rope_scaling` (older configs)."""
        params = dict(config_value(config, "rope_parameters") or config_value(config, "rope_scaling") or {})
        if any(isinstance(v, Mapping) for v in params.values()):
            raise ValueError(f"per-layer-type rope parameters are not supported: {params}")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in cls.SUPPORTED:
            raise ValueError(f"rope type {rope_type!r} is not supported (supported: {list(cls.SUPPORTED)})")
        partial = params.get("partial_rotary_factor", config_value(config, "partial_rotary_factor", 1.0))
        if partial not in (None, 1.0):
            raise ValueError(f"partial rotary embeddings (partial_rotary_factor={partial}) are not supported")
        theta = params.get("rope_theta", config_value(config, "rope_theta", None))
        rope = cls(theta=float(theta if theta is not None else 10000.0), rope_type=rope_type)
        if rope_type == "linear":
            rope = dataclasses.replace(rope, factor=float(params["factor"]))
        elif rope_type == "llama3":
            rope = dataclasses.replace(
                rope,
                factor=float(params["factor"]),
                low_freq_factor=float(params["low_freq_factor"]),
                high_freq_factor=float(params["high_freq_factor"]),
                original_max_position_embeddings=int(
                    params.get(
                        "original_max_position_embeddings", config_value(config, "max_position_embeddings")
                    )
                ),
            )
        return rope

    @classmethod
    def from_freq_factors(cls, theta: float, head_dim: int, factors: np.ndarray) -> RopeConfig:
        """The llama3 settings whose frequencies are exactly `default / factors`.

        llama.cpp keeps llama3 rope scaling as such a per-frequency divisor table
        (`rope_freqs.weight`) and names no scaling type. Tried: Llama 3.x's own settings
        (low/high frequency factors 1 and 4 over 8192 positions), then the settings fitted
        to the table's smoothed band (its smoothing is affine in 1 / wavelength; the
        position count only scales the other two, so 8192 serves). ValueError otherwise.
        """
        factors = np.asarray(factors, np.float64).reshape(-1)
        plain = cls(theta=theta)
        base = plain.inv_freq(head_dim).astype(np.float64)
        if factors.shape != base.shape:
            raise ValueError(f"{factors.size} rope frequency factors for {base.size} frequencies")
        if np.allclose(factors, 1.0, rtol=1e-6):
            return plain
        factor = float(factors.max())
        old_len = 8192
        candidates = [(1.0, 4.0)]
        band = (factors > 1.0 + 1e-6) & (factors < factor * (1.0 - 1e-6))
        if band.sum() >= 2:
            smooth = (1.0 / factors[band] - 1.0 / factor) / (1.0 - 1.0 / factor)
            slope, intercept = np.polyfit(base[band] / (2 * math.pi), smooth, 1)  # s = slope / wavelen + b
            low = -intercept * old_len / slope
            candidates.append((low, low + old_len / slope))
        for low, high in candidates:
            rope = cls(
                theta=theta,
                rope_type="llama3",
                factor=factor,
                low_freq_factor=float(low),
                high_freq_factor=float(high),
                original_max_position_embeddings=old_len,
            )
            if np.allclose(base / rope.inv_freq(head_dim), factors, rtol=1e-4):
                return rope
        raise ValueError("the rope frequency factors are not llama3 scaling")

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """float32[head_dim / 2] inverse frequencies, computed as transformers does (in float32)."""
        exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
        inv_freq = (np.float32(1.0) / (np.float32(self.theta) ** exponents)).astype(np.float32)
        if self.rope_type == "linear":
            return (inv_freq / np.float32(self.factor)).astype(np.float32)
        if self.rope_type == "llama3":
            old_len = self.original_max_position_embeddings
            low_freq_wavelen = old_len / self.low_freq_factor
            high_freq_wavelen = old_len / self.high_freq_factor
            wavelen = 2 * math.pi / inv_freq
            scaled = np.where(wavelen > low_freq_wavelen, inv_freq / self.factor, inv_freq)
            smooth = (old_len / wavelen - self.low_freq_factor) / (
                self.high_freq_factor - self.low_freq_factor
            )
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
            return np.where(medium, smoothed, scaled).astype(np.float32)
        return inv_freq


def rotary_cos_sin(positions: jax.Array, rope: RopeConfig, head_dim: int) -> tuple[jax.Array, jax.Array]:
    """float32 `cos, sin` of shape `[T, head_dim]` (both halves repeated, HF's rotate-half layout)."""
    freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(rope.inv_freq(head_dim))[None, :]
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate `x[T, heads, head_dim]` by position, rotate-half convention, computed in float32."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[:, None, :] + rotated * sin[:, None, :]).astype(x.dtype)


# ----------------------------------------------------------------------------- basic layers


class RMSNorm(nnx.Module):
    """HF's RMSNorm: normalise in float32, cast back, then scale by the weight."""

    def __init__(self, size: int, eps: float, dtype: Dtype):
        self.weight = nnx.Param(jnp.ones((size,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * x32.astype(x.dtype)


class LayerNorm(nnx.Module):
    """HF's LayerNorm (weight and bias), statistics in float32."""

    def __init__(self, size: int, eps: float, dtype: Dtype):
        self.weight = nnx.Param(jnp.ones((size,), dtype))
        self.bias = nnx.Param(jnp.zeros((size,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        normed = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (normed * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(
            x.dtype
        )


def linear(
    in_features: int, out_features: int, dtype: Dtype, rngs: nnx.Rngs, bias: bool = False
) -> nnx.Linear:
    """A dense layer whose kernel is `[in, out]` (HF's `[out, in]` transposed) in `dtype`."""
    return nnx.Linear(in_features, out_features, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs)


def embedding(num: int, features: int, dtype: Dtype, rngs: nnx.Rngs) -> nnx.Embed:
    """A token embedding table `[num, features]`, the same layout as HF's."""
    return nnx.Embed(num, features, dtype=dtype, param_dtype=dtype, rngs=rngs)


class GatedMLP(nnx.Module):
    """`down(act(gate(x)) * up(x))`: Llama's MLP, and Qwen2-MoE's shared expert.

    HF's gate and up projections are one `[hidden, 2 * intermediate]` kernel here
    (gate columns first): one matmul, one weight read per layer instead of two.
    """

    def __init__(
        self, hidden: int, intermediate: int, act: str, dtype: Dtype, rngs: nnx.Rngs, bias: bool = False
    ):
        self.gate_up_proj = linear(hidden, 2 * intermediate, dtype, rngs, bias)
        self.down_proj = linear(intermediate, hidden, dtype, rngs, bias)
        self.act = act

    def __call__(self, x: jax.Array, shards: int = 1) -> jax.Array:
        """`shards`: the tensor-parallel degree the kernel's columns are grouped for
        (`models/tensor_parallel.py`: each shard's gate columns, then its up columns)."""
        gate_up = self.gate_up_proj(x)
        grouped = gate_up.reshape(*gate_up.shape[:-1], shards, 2, -1)
        gate, up = (grouped[..., i, :].reshape(*gate_up.shape[:-1], -1) for i in (0, 1))
        return self.down_proj(activation(self.act)(gate) * up)


# ----------------------------------------------------------------------------- attention


@dataclasses.dataclass(frozen=True)
class KernelBackends:
    """How the kernels run: which implementation each dispatcher uses ("auto": Pallas on a GPU
    where it is the faster, "pallas" or "reference"), the device mesh whose `tp` axis splits
    the heads and the MLP columns (tensor parallelism; None: one device), how MoE experts
    split over it (`models/tensor_parallel.py`), and whether the decoder's layer loop is
    unrolled (`--layer-loop unrolled`)."""

    attention: str = "auto"
    moe: str = "auto"
    mesh: jax.sharding.Mesh | None = None
    experts_by_expert: bool = False  # expert parallelism: each device holds whole MoE experts
    # Each layer then reads its weights at a fixed offset of the stacked buffers, a static
    # slice, where a scanned step copies each dynamic slice before its GEMM (0.5 ms of a
    # batch-64 decode step on an H200); with no loop left, XLA's CUDA graphs can take the
    # whole step (docs/benchmarks.md, seventh GPU session).
    unroll_layers: bool = False

    @property
    def shards(self) -> int:
        """The tensor-parallel degree: how many devices split each layer."""
        return 1 if self.mesh is None else self.mesh.shape[TP_AXIS]


def write_and_attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    k_pool: jax.Array,
    v_pool: jax.Array,
    layer: jax.Array,
    meta: AttentionMetadata,
    sm_scale: float,
    backends: KernelBackends,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Write a layer's new K/V into the pools, then attend through the kernels' dispatcher:
    `(out [T, heads, D], k_pool, v_pool)`.

    Under tensor parallelism each device runs this on its own heads and its own slice of the
    pools (`shard_map`): a query head only ever reads its own KV head, so the kernels run
    unchanged, on fewer heads, with no collective."""
    if backends.mesh is None:
        k_pool, v_pool = write_kv(k_pool, v_pool, layer, k, v, meta)
        out = ragged_paged_attention(q, k_pool, v_pool, layer, meta, sm_scale, backend=backends.attention)
        return out, k_pool, v_pool
    heads, pools, whole = (
        PartitionSpec(None, TP_AXIS, None),
        PartitionSpec(None, None, None, TP_AXIS),
        PartitionSpec(),
    )
    local = dataclasses.replace(backends, mesh=None)

    @functools.partial(
        jax.shard_map,
        mesh=backends.mesh,
        in_specs=(heads, heads, heads, pools, pools, whole, whole),
        out_specs=(heads, pools, pools),
    )
    def per_device(q, k, v, k_pool, v_pool, layer, meta):
        return write_and_attend(q, k, v, k_pool, v_pool, layer, meta, sm_scale, local)

    return per_device(q, k, v, k_pool, v_pool, layer, meta)


# ----------------------------------------------------------------------------- the decoder


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    """A Qwen2-MoE style sparse block: routed experts plus a sigmoid-gated shared expert."""

    num_experts: int
    top_k: int
    norm_topk_prob: bool
    intermediate_size: int
    shared_expert_intermediate_size: int


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Everything the shared decoder needs; hashable, so it can sit in a module's static graph."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    hidden_act: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    num_labels: int = 0
    moe: MoeConfig | None = None

    @classmethod
    def from_hf(cls, config: Any, **overrides: Any) -> DecoderConfig:
        """The fields every Llama-family config spells the same way; families pass the rest."""
        hidden = int(config_value(config, "hidden_size"))
        heads = int(config_value(config, "num_attention_heads"))
        head_dim = config_value(config, "head_dim") or hidden // heads
        num_labels = config_value(config, "num_labels", 0)
        fields: dict[str, Any] = dict(
            vocab_size=int(config_value(config, "vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(config_value(config, "intermediate_size")),
            num_layers=int(config_value(config, "num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(config_value(config, "num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(config_value(config, "rms_norm_eps", 1e-6)),
            rope=RopeConfig.from_hf(config),
            hidden_act=str(config_value(config, "hidden_act", "silu")),
            tie_word_embeddings=bool(config_value(config, "tie_word_embeddings", False)),
            num_labels=int(num_labels or 0),
        )
        fields.update(overrides)
        cfg = cls(**fields)
        if cfg.num_heads % cfg.num_kv_heads:
            raise ValueError(f"{cfg.num_heads} attention heads do not group over {cfg.num_kv_heads} KV heads")
        activation(cfg.hidden_act)
        return cfg


class Attention(nnx.Module):
    """Self-attention over the paged KV pool: project, rotate, write K/V, attend, project out.

    HF's q, k and v projections are one `[hidden, q + 2 * kv]` kernel here (one matmul).
    """

    def __init__(self, cfg: DecoderConfig, dtype: Dtype, rngs: nnx.Rngs):
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = linear(cfg.hidden_size, q_size + 2 * kv_size, dtype, rngs, cfg.qkv_bias)
        self.o_proj = linear(q_size, cfg.hidden_size, dtype, rngs, cfg.o_bias)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        k_pool: jax.Array,
        v_pool: jax.Array,
        layer: jax.Array,
        meta: AttentionMetadata,
        backends: KernelBackends,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        tokens, shards = x.shape[0], backends.shards
        q_size, kv_size = (
            self.num_heads * self.head_dim // shards,
            self.num_kv_heads * self.head_dim // shards,
        )
        # Columns grouped by shard, each shard's q then k then v (`models/tensor_parallel.py`):
        # the shard-major head order is the heads' own order.
        qkv = self.qkv_proj(x).reshape(tokens, shards, -1)
        q, k, v = jnp.split(qkv, [q_size, q_size + kv_size], axis=-1)
        q = q.reshape(tokens, self.num_heads, self.head_dim)
        k = k.reshape(tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(tokens, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out, k_pool, v_pool = write_and_attend(
            q, k, v, k_pool, v_pool, layer, meta, self.head_dim**-0.5, backends
        )
        return self.o_proj(out.reshape(tokens, -1)), k_pool, v_pool


def real_tokens(meta: AttentionMetadata, page_size: int) -> jax.Array:
    """bool[T]: padding tokens write into page 0 wherever the layout puts them; real tokens never do."""
    return meta.write_slots >= page_size


MlpFactory = Callable[[DecoderConfig, Dtype, nnx.Rngs], nnx.Module]


def dense_mlp(cfg: DecoderConfig, dtype: Dtype, rngs: nnx.Rngs) -> GatedMLP:
    """The dense MLP block of a decoder layer."""
    return GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, dtype, rngs, cfg.mlp_bias)


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then h + mlp(norm(h)).

    A sparse MLP block returns `(out, expert_counts)`; a dense one just `out`.
    """

    def __init__(self, cfg: DecoderConfig, dtype: Dtype, rngs: nnx.Rngs, mlp_factory: MlpFactory):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, dtype, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = mlp_factory(cfg, dtype, rngs)
        self.sparse = cfg.moe is not None

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        k_pool: jax.Array,
        v_pool: jax.Array,
        layer: jax.Array,
        meta: AttentionMetadata,
        backends: KernelBackends,
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
        attn_out, k_pool, v_pool = self.self_attn(
            self.input_layernorm(x), cos, sin, k_pool, v_pool, layer, meta, backends
        )
        x = x + attn_out
        normed = self.post_attention_layernorm(x)
        if self.sparse:
            valid = real_tokens(meta, k_pool.shape[2])
            mlp_out, counts = self.mlp(normed, valid, backends)
        else:
            mlp_out, counts = self.mlp(normed, backends.shards), None
        return x + mlp_out, k_pool, v_pool, counts


def stacked(num: int, rngs: nnx.Rngs, make: Callable[[nnx.Rngs], nnx.Module]) -> nnx.Module:
    """`num` copies of a module with every parameter stacked on a leading axis (one rng split each)."""

    @nnx.split_rngs(splits=num)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def build(layer_rngs: nnx.Rngs) -> nnx.Module:
        return make(layer_rngs)

    return build(rngs)


class Decoder(nnx.Module):
    """Embedding, the scanned decoder layers, the final norm: HF's `LlamaModel` (`model.` in checkpoints)."""

    def __init__(self, cfg: DecoderConfig, dtype: Dtype, rngs: nnx.Rngs, mlp_factory: MlpFactory = dense_mlp):
        self.cfg = cfg
        self.embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size, dtype, rngs)
        self.layers = stacked(cfg.num_layers, rngs, lambda r: DecoderLayer(cfg, dtype, r, mlp_factory))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array,
        k_pool: jax.Array,
        v_pool: jax.Array,
        meta: AttentionMetadata,
        backends: KernelBackends,
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
        """`(hidden[T, H] after the final norm, k_pool, v_pool, expert_counts int32[L, E] or None)`."""
        cfg = self.cfg
        x = self.embed_tokens(input_ids)
        cos, sin = rotary_cos_sin(positions, cfg.rope, cfg.head_dim)
        graphdef, layer_state = nnx.split(self.layers)

        def run_layer(
            carry: tuple[jax.Array, ...], xs: tuple[Any, jax.Array]
        ) -> tuple[Any, jax.Array | None]:
            x, k_pool, v_pool = carry
            state, layer = xs
            block = nnx.merge(graphdef, state)
            x, k_pool, v_pool, counts = block(x, cos, sin, k_pool, v_pool, layer, meta, backends)
            return (x, k_pool, v_pool), counts

        layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        (x, k_pool, v_pool), counts = jax.lax.scan(
            run_layer, (x, k_pool, v_pool), (layer_state, layer_ids), unroll=backends.unroll_layers
        )
        return self.norm(x), k_pool, v_pool, counts


# ----------------------------------------------------------------------------- model heads


# Rows up to which a CPU takes the tied LM head with the table as the left operand (below).
LEFT_TABLE_MAX_ROWS = 64


def tied_head_logits(hidden: jax.Array, table: jax.Array) -> jax.Array:
    """float32[N, V] logits from the embedding table `[V, H]` doubling as the LM head.

    On a CPU, for up to LEFT_TABLE_MAX_ROWS rows (a step's sampled rows), the table is
    the dot's left operand, `[V, H] x [H, N]`, and the small `[V, N]` result is
    transposed after: XLA's CPU dot streams the table faster that way (2-core box,
    SmolLM2's [32 x 576] x [576 x 49152] alone: 7.9 -> 6.2 ms with the transpose; whole
    batch-32 decode steps 66.9 -> 64.9 ms, batch 8 30.3 -> 29.5 ms). The barrier keeps
    XLA from folding the transpose back into the dot. From 128 rows on (a prompt's
    logprobs) that order is the slower one (256 rows: 72.7 against 44.7 ms). Elsewhere
    the plain product (not measured on a GPU).
    """
    if jax.default_backend() != "cpu" or hidden.shape[0] > LEFT_TABLE_MAX_ROWS:
        return jnp.einsum("nh,vh->nv", hidden, table, preferred_element_type=jnp.float32)
    by_vocab = jnp.einsum("vh,nh->vn", table, hidden, preferred_element_type=jnp.float32)
    return jax.lax.optimization_barrier(by_vocab).T


class CausalLM(nnx.Module):
    """A decoder plus an LM head (or the tied embedding); families set `config_from_hf`.

    The parameter tree mirrors HF's names: `model.*` is the decoder, `lm_head` the head.
    """

    architecture: ClassVar[str] = ""
    kind: ClassVar[str] = "causal_lm"
    mlp_factory: ClassVar[MlpFactory] = staticmethod(dense_mlp)

    @staticmethod
    def config_from_hf(config: Any) -> DecoderConfig:
        """The family's HF config -> decoder settings; every subclass sets its own."""
        raise NotImplementedError("a CausalLM subclass must set config_from_hf")

    def __init__(self, config: Any, dtype: Dtype, rngs: nnx.Rngs):
        self.cfg = type(self).config_from_hf(config)
        self.model = Decoder(self.cfg, dtype, rngs, type(self).mlp_factory)
        self.add_head(dtype, rngs)
        self.kernel_backends = KernelBackends()

    def add_head(self, dtype: Dtype, rngs: nnx.Rngs) -> None:
        """The LM head, unless the embedding table doubles as it."""
        if not self.cfg.tie_word_embeddings:
            self.lm_head = linear(self.cfg.hidden_size, self.cfg.vocab_size, dtype, rngs)

    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array,
        k_pool: jax.Array,
        v_pool: jax.Array,
        meta: AttentionMetadata,
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
        """`(hidden[T, H], k_pool, v_pool, expert_counts)`, see docs/architecture.md."""
        return self.model(input_ids, positions, k_pool, v_pool, meta, self.kernel_backends)

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """float32[N, V] logits of hidden states `[N, H]`."""
        if self.cfg.tie_word_embeddings:
            return tied_head_logits(hidden, self.model.embed_tokens.embedding[...])
        kernel = self.lm_head.kernel[...]
        return jnp.einsum("nh,hv->nv", hidden, kernel, preferred_element_type=jnp.float32)

    @classmethod
    def params_from_hf(cls, config: Any, tensors: Mapping[str, np.ndarray]) -> Params:
        """HF tensors -> a pure dict equal in structure to `nnx.to_pure_dict(nnx.state(model, nnx.Param))`.

        Arrays keep the checkpoint's dtype (the loader casts). Raises `WeightError` naming every
        missing, unexpected or mis-shaped tensor.
        """
        cfg = cls.config_from_hf(config)
        reader = HFTensorReader(tensors, cls.architecture, harmless=cls.harmless_tensors(cfg))
        prefix = "model." if any(name.startswith("model.") for name in tensors) else ""
        params: Params = {"model": decoder_params_from_hf(cfg, reader, prefix, cls.mlp_params_from_hf)}
        params.update(cls.head_params_from_hf(cfg, reader))
        reader.finish()
        return params

    @classmethod
    def harmless_tensors(cls, cfg: DecoderConfig) -> list[str]:
        """Regexes of HF tensors that may be present and are not ours to load."""
        harmless = [r"(^|\.)rotary_emb\.inv_freq$"]
        if cfg.tie_word_embeddings:
            harmless.append(r"^lm_head\.weight$")  # some tied checkpoints store the copy anyway
        return harmless

    @classmethod
    def head_params_from_hf(cls, cfg: DecoderConfig, reader: HFTensorReader) -> Params:
        """The head's subtree (`lm_head`; nothing when tied)."""
        if cfg.tie_word_embeddings:
            return {}
        return {"lm_head": reader.linear("lm_head", cfg.hidden_size, cfg.vocab_size)}

    @staticmethod
    def mlp_params_from_hf(cfg: DecoderConfig, reader: HFTensorReader, prefix: str) -> Params:
        """One layer's MLP subtree from the HF names under `prefix` (`model.layers.N.mlp.`)."""
        return reader.gated_mlp(prefix, cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)


class SequenceClassifier(CausalLM):
    """The same trunk with HF's `score` head (`*ForSequenceClassification`, reward models).

    HF pools the last non-pad token; the engine passes that token's hidden state to `score`.
    """

    kind: ClassVar[str] = "sequence_classification"

    def add_head(self, dtype: Dtype, rngs: nnx.Rngs) -> None:
        """`score_head` (HF's `score`; renamed because `score` is the method)."""
        if self.cfg.num_labels < 1:
            raise ValueError("a sequence classifier needs num_labels >= 1 in its config")
        self.score_head = linear(self.cfg.hidden_size, self.cfg.num_labels, dtype, rngs)

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        raise TypeError(f"{self.architecture} has no LM head: use score()")

    def score(self, hidden: jax.Array) -> jax.Array:
        """float32[N, num_labels] class logits of hidden states `[N, H]`."""
        kernel = self.score_head.kernel[...]
        return jnp.einsum("nh,hl->nl", hidden, kernel, preferred_element_type=jnp.float32)

    @classmethod
    def harmless_tensors(cls, cfg: DecoderConfig) -> list[str]:
        """Only rotary buffers: a classifier checkpoint carrying an LM head is the wrong checkpoint."""
        return [r"(^|\.)rotary_emb\.inv_freq$"]

    @classmethod
    def head_params_from_hf(cls, cfg: DecoderConfig, reader: HFTensorReader) -> Params:
        """HF's `score.weight [num_labels, H]` as `score_head`."""
        return {"score_head": reader.linear("score", cfg.hidden_size, cfg.num_labels)}


# ----------------------------------------------------------------------------- HF tensors -> params


class HFTensorReader:
    """Takes HF tensors by name for one `params_from_hf`, collecting every problem before raising once.

    A missing or mis-shaped tensor is recorded and replaced by zeros so the walk goes on;
    `finish()` raises `WeightError` listing them, plus every tensor left unused that no
    `harmless` regex matches.
    """

    def __init__(self, tensors: Mapping[str, np.ndarray], owner: str, harmless: Sequence[str] = ()):
        self.tensors = tensors
        self.owner = owner
        self.harmless = [re.compile(p) for p in harmless]
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.misshaped: list[str] = []

    def has(self, name: str) -> bool:
        """Whether the checkpoint holds `name` (for layouts that differ between checkpoint versions)."""
        return name in self.tensors

    def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """The tensor `name`, which must have exactly `shape`."""
        if name not in self.tensors:
            self.missing.append(name)
            return np.zeros(shape, np.float32)
        self.used.add(name)
        value = np.asarray(self.tensors[name])
        if tuple(value.shape) != tuple(shape):
            self.misshaped.append(f"{name} has shape {tuple(value.shape)}, expected {tuple(shape)}")
            return np.zeros(shape, value.dtype)
        return value

    def linear(self, prefix: str, in_features: int, out_features: int, bias: bool = False) -> Params:
        """`{kernel [in, out], bias?}` from HF's `<prefix>.weight [out, in]` and `<prefix>.bias`."""
        out = {"kernel": self.take(f"{prefix}.weight", (out_features, in_features)).T}
        if bias:
            out["bias"] = self.take(f"{prefix}.bias", (out_features,))
        return out

    def norm(self, prefix: str, size: int, bias: bool = False) -> Params:
        out = {"weight": self.take(f"{prefix}.weight", (size,))}
        if bias:
            out["bias"] = self.take(f"{prefix}.bias", (size,))
        return out

    def embedding(self, name: str, num: int, features: int) -> Params:
        return {"embedding": self.take(name, (num, features))}

    def fused_linear(
        self, prefixes: Sequence[str], in_features: int, out_features: Sequence[int], bias: bool = False
    ) -> Params:
        """HF linears that share their input (q/k/v, gate/up) as one layer, outputs side by side."""
        parts = [
            self.linear(prefix, in_features, out, bias)
            for prefix, out in zip(prefixes, out_features, strict=True)
        ]
        return jax.tree.map(lambda *leaves: np.concatenate(leaves, axis=-1), *parts)

    def gated_mlp(self, prefix: str, hidden: int, intermediate: int, bias: bool = False) -> Params:
        gate_up = [f"{prefix}gate_proj", f"{prefix}up_proj"]
        return {
            "gate_up_proj": self.fused_linear(gate_up, hidden, [intermediate, intermediate], bias),
            "down_proj": self.linear(f"{prefix}down_proj", intermediate, hidden, bias),
        }

    def finish(self) -> None:
        """Raise `WeightError` naming every problem met, or return quietly."""
        unexpected = sorted(
            name
            for name in self.tensors
            if name not in self.used and not any(p.search(name) for p in self.harmless)
        )
        problems = []
        for label, names in (
            ("missing", self.missing),
            ("mis-shaped", self.misshaped),
            ("unexpected", unexpected),
        ):
            if names:
                shown = "; ".join(names[:8]) + (f"; ... ({len(names) - 8} more)" if len(names) > 8 else "")
                problems.append(f"{len(names)} {label} tensor(s): {shown}")
        if problems:
            raise WeightError(f"checkpoint does not fit {self.owner}: " + " | ".join(problems))


def stack_layers(per_layer: Sequence[Params]) -> Params:
    """Per-layer trees -> one tree with every leaf stacked on a new leading axis."""
    return jax.tree.map(lambda *leaves: np.stack(leaves), *per_layer)


LayerParamsFn = Callable[[DecoderConfig, HFTensorReader, str], Params]


def decoder_params_from_hf(
    cfg: DecoderConfig, reader: HFTensorReader, prefix: str, mlp_params: LayerParamsFn
) -> Params:
    """The `Decoder` subtree from HF names under `prefix` (`model.` in causal LM checkpoints)."""
    hidden, q_size, kv_size = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim

    def layer(i: int) -> Params:
        p = f"{prefix}layers.{i}."
        return {
            "input_layernorm": reader.norm(f"{p}input_layernorm", hidden),
            "self_attn": {
                "qkv_proj": reader.fused_linear(
                    [f"{p}self_attn.{name}_proj" for name in "qkv"],
                    hidden,
                    [q_size, kv_size, kv_size],
                    cfg.qkv_bias,
                ),
                "o_proj": reader.linear(f"{p}self_attn.o_proj", q_size, hidden, cfg.o_bias),
            },
            "post_attention_layernorm": reader.norm(f"{p}post_attention_layernorm", hidden),
            "mlp": mlp_params(cfg, reader, f"{p}mlp."),
        }

    return {
        "embed_tokens": reader.embedding(f"{prefix}embed_tokens.weight", cfg.vocab_size, hidden),
        "layers": stack_layers([layer(i) for i in range(cfg.num_layers)]),
        "norm": reader.norm(f"{prefix}norm", hidden),
    }
