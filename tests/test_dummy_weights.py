"""`--load-format dummy` on a config-only folder from scripts/write_model_config.py (GPU benchmark)."""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from models import loader
from runtime.engine import Engine
from runtime.server_args import ServerArgs
from runtime.weights import WeightError
from scripts.write_model_config import parse_override, write_config

SMALL = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
}


def test_preset_is_qwen2_5_0_5b(tmp_path: Path) -> None:
    """The preset builds a model with Qwen2.5-0.5B's published parameter count."""
    write_config("qwen2.5-0.5b", tmp_path, {})
    config = loader.load_config(tmp_path)
    model = loader.abstract_model(
        loader.get_model_class(loader.architecture_of(config)), config, jnp.bfloat16
    )
    assert sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(loader.param_shapes(model))) == 494_032_768


def test_overrides_are_json() -> None:
    assert parse_override("num_hidden_layers=2") == ("num_hidden_layers", 2)
    assert parse_override("hidden_act=gelu") == ("hidden_act", "gelu")
    assert parse_override("tie_word_embeddings=false") == ("tie_word_embeddings", False)


def test_dummy_weights_serve_a_config_only_folder(tmp_path: Path) -> None:
    write_config("qwen2.5-0.5b", tmp_path, SMALL)
    # Without dummy weights the folder is refused with a clear message.
    with pytest.raises(WeightError, match="holds no"):
        loader.load_model(str(tmp_path))
    assert (
        ServerArgs(model_path=str(tmp_path), load_format="dummy").load_format == "dummy"
    )  # a server flag too
    engine = Engine(
        model_path=str(tmp_path),
        load_format="dummy",
        skip_tokenizer_init=True,
        dtype="float32",
        max_total_tokens=1024,
        max_running_requests=4,
        warmup=False,
    )
    try:
        params = {"max_new_tokens": 5, "temperature": 0.0, "ignore_eos": True}
        out = engine.generate(input_ids=[1, 2, 3, 4], sampling_params=params)
        assert len(out["output_ids"]) == 5
        assert all(0 <= token < SMALL["vocab_size"] for token in out["output_ids"])
        # Greedy on fixed random weights: the same prompt gives the same tokens.
        assert (
            engine.generate(input_ids=[1, 2, 3, 4], sampling_params=params)["output_ids"] == out["output_ids"]
        )
    finally:
        engine.shutdown()
