"""Qwen2: Llama with a bias on the q/k/v projections (none on o_proj).

Sliding-window attention (`use_sliding_window`) is not implemented: a config
that turns it on for any layer is refused rather than served wrongly.
"""

from __future__ import annotations

from typing import Any

from models.layers import CausalLM, DecoderConfig, SequenceClassifier, config_value


def check_full_attention(config: Any) -> None:
    """Refuse configs whose layers use sliding-window attention (the ports attend over everything)."""
    layer_types = config_value(config, "layer_types")
    sliding = (
        any(t == "sliding_attention" for t in layer_types)
        if layer_types
        else bool(config_value(config, "use_sliding_window", False))
        and config_value(config, "max_window_layers", 0) < config_value(config, "num_hidden_layers")
    )
    if sliding:
        raise ValueError(
            f"sliding-window attention (use_sliding_window={config_value(config, 'use_sliding_window')}, "
            f"sliding_window={config_value(config, 'sliding_window')}) is not supported"
        )


def qwen2_config(config: Any) -> DecoderConfig:
    """A Qwen2 HF config as the shared decoder's settings."""
    check_full_attention(config)
    return DecoderConfig.from_hf(config, qkv_bias=True, o_bias=False)


class Qwen2ForCausalLM(CausalLM):
    """HF `Qwen2ForCausalLM`; also gte-Qwen2 style embedding models (last-token pooling)."""

    architecture = "Qwen2ForCausalLM"
    config_from_hf = staticmethod(qwen2_config)


class Qwen2ForSequenceClassification(SequenceClassifier):
    """HF `Qwen2ForSequenceClassification`: `score` head on the Qwen2 trunk."""

    architecture = "Qwen2ForSequenceClassification"
    config_from_hf = staticmethod(qwen2_config)
