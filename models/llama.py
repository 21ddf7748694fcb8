"""Llama (and every checkpoint that is Llama by another name, such as SmolLM2).

The family's decoder lives in `models/layers.py`; this file says how a Llama
config maps onto it: optional attention and MLP biases, grouped-query heads,
`head_dim` from the config when given, tied embeddings, and default / linear /
llama3 rope scaling.
"""

from __future__ import annotations

from typing import Any

from models.layers import CausalLM, DecoderConfig, SequenceClassifier, config_value


def llama_config(config: Any) -> DecoderConfig:
    """A Llama HF config as the shared decoder's settings (`attention_bias` covers q/k/v and o)."""
    attention_bias = bool(config_value(config, "attention_bias", False))
    return DecoderConfig.from_hf(
        config,
        qkv_bias=attention_bias,
        o_bias=attention_bias,
        mlp_bias=bool(config_value(config, "mlp_bias", False)),
    )


class LlamaForCausalLM(CausalLM):
    """HF `LlamaForCausalLM`: `model.*` decoder, `lm_head` unless embeddings are tied."""

    architecture = "LlamaForCausalLM"
    config_from_hf = staticmethod(llama_config)


class LlamaForSequenceClassification(SequenceClassifier):
    """HF `LlamaForSequenceClassification` (Skywork-Reward style reward models): `score` head."""

    architecture = "LlamaForSequenceClassification"
    config_from_hf = staticmethod(llama_config)
