"""scripts/convert_checkpoint.py: an Orbax folder that serves exactly like its source."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from models import loader
from models.pooling import load_pooling
from runtime.weights import WeightError
from scripts import convert_checkpoint
from tests import fixture_spec as spec
from tests.conftest import fixture_path


def _assert_same_params(a: nnx.Module, b: nnx.Module) -> None:
    """Bit-identical parameter trees: same structure, dtypes and bytes."""
    tree_a = nnx.to_pure_dict(nnx.state(a, nnx.Param))
    tree_b = nnx.to_pure_dict(nnx.state(b, nnx.Param))
    assert jax.tree.structure(tree_a) == jax.tree.structure(tree_b)
    for x, y in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name", [spec.TINY_LLAMA, spec.TINY_QWEN2_MOE])
def test_orbax_checkpoint_loads_bit_identical(name: str, tmp_path: Path) -> None:
    source = fixture_path(name)
    out = tmp_path / "orbax"
    assert convert_checkpoint.main(["--model-path", str(source), "--output", str(out)]) == 0
    assert (
        (out / "params").is_dir() and (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    )
    converted = loader.load_model(str(out))
    original = loader.load_model(str(source))
    assert converted.architecture == original.architecture
    _assert_same_params(converted.model, original.model)
    # An Orbax folder also feeds a hot swap of the model it came from.
    swapped = loader.load_params_for(original.model, str(out))
    serving = nnx.to_pure_dict(nnx.state(original.model, nnx.Param))
    for x, y in zip(jax.tree.leaves(swapped), jax.tree.leaves(serving), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_convert_to_bfloat16(tmp_path: Path) -> None:
    source = fixture_path(spec.TINY_LLAMA)
    out = convert_checkpoint.convert(str(source), str(tmp_path / "bf16"), dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    _assert_same_params(
        loader.load_model(str(out), dtype="bfloat16").model,
        loader.load_model(str(source), dtype="bfloat16").model,
    )


def test_sentence_transformers_folder_keeps_pooling(tmp_path: Path) -> None:
    source = fixture_path(spec.MINILM)
    out = convert_checkpoint.convert(str(source), str(tmp_path / "minilm"))
    assert load_pooling(out) == load_pooling(source)
    _assert_same_params(loader.load_model(str(out)).model, loader.load_model(str(source)).model)


def test_refuses_to_overwrite_and_wrong_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = fixture_path(spec.TINY_LLAMA)
    out = tmp_path / "orbax"
    convert_checkpoint.convert(str(source), str(out))
    assert convert_checkpoint.main(["--model-path", str(source), "--output", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert convert_checkpoint.main(["--model-path", str(source), "--output", str(out), "--overwrite"]) == 0
    # an output that is the source or holds it is refused, whatever --overwrite says: emptying it
    # first would delete the source
    copy = tmp_path / "parent" / "model"
    shutil.copytree(source, copy)
    for output in (copy, copy.parent):
        assert (
            convert_checkpoint.main(["--model-path", str(copy), "--output", str(output), "--overwrite"]) == 1
        )
        assert "holds the source" in capsys.readouterr().err
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in source.iterdir())
    # or reached through a link inside the output
    (tmp_path / "holder").mkdir()
    (tmp_path / "holder" / "model").symlink_to(copy)
    linked = tmp_path / "holder" / "model"
    assert (
        convert_checkpoint.main(["--model-path", str(linked), "--output", str(linked.parent), "--overwrite"])
        == 1
    )
    assert (tmp_path / "holder" / "model").is_symlink()
    with pytest.raises(WeightError, match="orbax checkpoint, not safetensors"):
        loader.load_model(str(out), load_format="safetensors")
