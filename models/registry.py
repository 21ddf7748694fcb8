"""HF `architectures[0]` -> our model class.

Every class registered here has `architecture`, `kind` ("causal_lm",
"sequence_classification" or "encoder"), `config_from_hf(config)` and
`params_from_hf(config, tensors)`; see docs/adding_a_model.md.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from models.bert import BertModel
from models.layers import config_value
from models.llama import LlamaForCausalLM, LlamaForSequenceClassification
from models.qwen2 import Qwen2ForCausalLM, Qwen2ForSequenceClassification
from models.qwen2_moe import Qwen2MoeForCausalLM

_MODELS: dict[str, type[nnx.Module]] = {
    cls.architecture: cls
    for cls in (
        LlamaForCausalLM,
        LlamaForSequenceClassification,
        Qwen2ForCausalLM,
        Qwen2ForSequenceClassification,
        Qwen2MoeForCausalLM,
        BertModel,
    )
}


def supported_architectures() -> tuple[str, ...]:
    return tuple(sorted(_MODELS))


def get_model_class(architecture: str) -> type[nnx.Module]:
    """The port of an HF architecture name; ValueError listing the supported ones otherwise."""
    if architecture not in _MODELS:
        supported = ", ".join(supported_architectures())
        raise ValueError(f"architecture {architecture!r} is not supported (supported: {supported})")
    return _MODELS[architecture]


def architecture_of(config: Any) -> str:
    """`architectures[0]` of an HF config (object or dict); ValueError when the config names none."""
    architectures = config_value(config, "architectures") or []
    if not architectures:
        raise ValueError("the model config lists no `architectures`; cannot pick a model class")
    return str(architectures[0])
