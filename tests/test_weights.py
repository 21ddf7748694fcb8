"""Weight loading: GGUF conversion against transformers, sharded/corrupt safetensors, Orbax, tree checks.

The GGUF conversion is the torch-free route `make serve` relies on; transformers' own GGUF loader
(which needs torch, available in the dev venv) is the reference, bit for bit.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from runtime import paths
from runtime.weights import (
    SAFETENSORS_INDEX,
    WeightError,
    check_params_match,
    copy_model_metadata,
    detect_load_format,
    gguf_config_dict,
    load_config,
    load_hf_tensors,
    load_orbax,
    read_safetensors,
    save_orbax,
    unpermute_qk_rows,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Run in a child: hide torch completely (find_spec says absent, import fails), convert, and
# report whether anything imported torch anyway.
_NO_TORCH_CONVERT = textwrap.dedent(
    """
    import importlib.abc, importlib.util, sys
    _find_spec = importlib.util.find_spec
    def find_spec(name, package=None):
        if name == "torch" or name.startswith("torch."):
            return None
        return _find_spec(name, package)
    importlib.util.find_spec = find_spec
    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is hidden in this test")
            return None
    sys.meta_path.insert(0, NoTorch())
    from runtime.weights import gguf_to_hf_folder
    gguf_to_hf_folder(sys.argv[1], sys.argv[2])
    print("TORCH_IMPORTED", "torch" in sys.modules)
    """
)


def _bits(a: np.ndarray) -> np.ndarray:
    """The raw bytes of an array, so -0.0 vs 0.0 and NaN payloads count as differences."""
    return np.ascontiguousarray(a).view(np.uint8)


def _assert_same_tensors(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        g, w = got[name], want[name]
        assert g.dtype == w.dtype, name
        assert g.shape == w.shape, name
        assert np.array_equal(_bits(g), _bits(w)), name


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    path = paths.models_dir() / "gguf" / GGUF_NAME
    if not path.is_file():
        pytest.skip(f"{path} missing: run scripts/fetch_models.py (make models)")
    return path


@pytest.fixture(scope="module")
def gguf_tensors(gguf_file: Path) -> dict[str, np.ndarray]:
    """The 135M model dequantized in-process, once per module."""
    return load_hf_tensors(gguf_file)


@pytest.fixture(scope="module")
def converted(gguf_file: Path, tmp_path_factory) -> tuple[Path, str]:
    """The HF folder `gguf_to_hf_folder` writes in a process where torch cannot be imported."""
    out = tmp_path_factory.mktemp("converted") / "SmolLM2-135M-Instruct"
    proc = subprocess.run(
        [sys.executable, "-c", _NO_TORCH_CONVERT, str(gguf_file), str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_gguf_dequantization_matches_transformers(gguf_file: Path, gguf_tensors: dict[str, np.ndarray]):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32
    )
    ref = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    del model
    assert gguf_config_dict(gguf_file)["tie_word_embeddings"]
    # Tied: transformers materialises lm_head from the embedding; the GGUF stores it once.
    assert "lm_head.weight" not in gguf_tensors
    assert np.array_equal(_bits(ref.pop("lm_head.weight")), _bits(ref["model.embed_tokens.weight"]))
    _assert_same_tensors(gguf_tensors, ref)
    assert all(t.dtype == np.float32 for t in gguf_tensors.values())


def test_conversion_runs_without_torch(converted):
    _, stdout = converted
    assert "TORCH_IMPORTED False" in stdout


def test_converted_folder_is_bit_exact_hf_folder(converted, gguf_tensors):
    folder, _ = converted
    assert detect_load_format(folder) == "safetensors"
    tensors = load_hf_tensors(folder)
    assert "lm_head.weight" not in tensors  # tied embedding stored once
    _assert_same_tensors(tensors, gguf_tensors)


def test_converted_config_matches_transformers(converted, gguf_file: Path):
    pytest.importorskip("torch")  # transformers' GGUF config route imports torch
    from transformers import AutoConfig

    ours = load_config(converted[0])
    ref = AutoConfig.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    fields = [
        "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
        "rms_norm_eps", "hidden_act", "tie_word_embeddings", "bos_token_id", "eos_token_id",
        "pad_token_id", "attention_bias", "mlp_bias",
    ]  # fmt: skip
    for field in fields:
        assert getattr(ours, field) == getattr(ref, field), field
    assert ours.rope_parameters["rope_theta"] == ref.rope_parameters["rope_theta"] == 100000.0
    assert ours.architectures == ["LlamaForCausalLM"]
    assert getattr(ours, "quantization_config", None) is None
    raw = json.loads((converted[0] / "config.json").read_text())
    assert "quantization_config" not in raw and raw["dtype"] == "float32"
    # The same config straight from the GGUF file, for serving a .gguf path directly.
    assert load_config(gguf_file).to_dict()["num_key_value_heads"] == 3


def test_converted_tokenizer_matches_transformers(converted, gguf_file: Path):
    pytest.importorskip("torch")  # transformers' GGUF tokenizer route imports torch
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(str(converted[0]))
    ref = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    assert ours.get_vocab() == ref.get_vocab()
    assert ours.chat_template == ref.chat_template and "<|im_start|>" in ours.chat_template
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token", "all_special_tokens"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    texts = [
        "What is the capital of France?",
        "  Leading spaces, tabs\tand\nnew lines\n\n",
        "Ünïcödé — ß, 東京, emoji 🙂!",
        "<|im_start|>user\nhi<|im_end|>\n",
        "don't we'll they've",
    ]
    for text in texts:
        assert ours.encode(text) == ref.encode(text), text
        assert ours.decode(ours.encode(text)) == text
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = ours.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert prompt == ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert ours.encode(prompt) == ref.encode(prompt)
    # Digits: llama.cpp's "smollm" pre-tokenizer (and SmolLM's own tokenizer) split them one by
    # one; transformers' GGUF route does not, so here ours is checked on its own.
    ids = ours.encode("year 2024")
    assert [ours.decode([i]) for i in ids][-4:] == ["2", "0", "2", "4"]


def test_unpermute_qk_rows_inverts_llama_cpp_permutation():
    rng = np.random.default_rng(0)
    n_heads, head_dim, cols = 3, 8, 5
    hf = rng.standard_normal((n_heads * head_dim, cols)).astype(np.float32)
    # llama.cpp's convert_hf_to_gguf permute(): rows (h, 2, d/2) -> (h, d/2, 2).
    gguf = hf.reshape(n_heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(hf.shape)
    assert not np.array_equal(gguf, hf)
    np.testing.assert_array_equal(unpermute_qk_rows(gguf, n_heads), hf)
    with pytest.raises(WeightError):
        unpermute_qk_rows(np.zeros((10, 2), np.float32), 3)


def test_sharded_folder_loads_bit_exact(tmp_path: Path, gguf_tensors: dict[str, np.ndarray]):
    names = sorted(gguf_tensors)
    shards = {f"model-0000{i + 1}-of-00003.safetensors": names[i::3] for i in range(3)}
    weight_map = {}
    for shard, members in shards.items():
        save_file({n: gguf_tensors[n] for n in members}, str(tmp_path / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(members, shard))
    (tmp_path / SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert detect_load_format(tmp_path) == "safetensors"
    _assert_same_tensors(load_hf_tensors(tmp_path), gguf_tensors)


def _small_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "a.weight": rng.standard_normal((4, 6)).astype(np.float32),
        "b.bias": rng.standard_normal(7).astype(np.float16),
        "c.ids": np.arange(5, dtype=np.int64),
        "d.empty": np.zeros((0, 3), np.float32),
    }


def test_stored_dtypes_are_kept(tmp_path: Path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as save_torch

    bf16 = torch.randn(3, 5, dtype=torch.bfloat16)
    save_torch({"w": bf16, "i": torch.arange(4, dtype=torch.int32)}, str(tmp_path / "model.safetensors"))
    got = load_hf_tensors(tmp_path)
    assert got["w"].dtype == np.dtype(ml_dtypes.bfloat16)
    assert np.array_equal(got["w"].view(np.int16), bf16.view(torch.int16).numpy())
    assert got["i"].dtype == np.int32 and got["i"].tolist() == [0, 1, 2, 3]

    small = _small_tensors()
    save_file(small, str(tmp_path / "small.safetensors"))
    _assert_same_tensors(read_safetensors(tmp_path / "small.safetensors"), small)


@pytest.mark.parametrize("keep", ["half", "header_only", "eight_bytes", "three_bytes"])
def test_truncated_safetensors_names_the_file(tmp_path: Path, keep: str):
    folder = tmp_path / "m"
    folder.mkdir()
    path = folder / "model.safetensors"
    save_file(_small_tensors(), str(path))
    data = path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    cut = {"half": (header_end + len(data)) // 2, "header_only": header_end, "eight_bytes": 8}
    cut["three_bytes"] = 3
    path.write_bytes(data[: cut[keep]])
    with pytest.raises(WeightError, match="model.safetensors"):
        load_hf_tensors(folder)


def test_corrupt_header_names_the_file(tmp_path: Path):
    path = tmp_path / "model.safetensors"
    save_file(_small_tensors(), str(path))
    data = bytearray(path.read_bytes())
    data[10:14] = b"\xff\xfe{]"
    path.write_bytes(bytes(data))
    with pytest.raises(WeightError, match="model.safetensors"):
        load_hf_tensors(tmp_path)


def test_missing_shard_names_the_file(tmp_path: Path):
    small = _small_tensors()
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    save_file({"a.weight": small["a.weight"]}, str(tmp_path / first))
    index = {"weight_map": {"a.weight": first, "b.bias": second}}
    (tmp_path / SAFETENSORS_INDEX).write_text(json.dumps(index))
    with pytest.raises(WeightError, match="model-00002-of-00002.safetensors"):
        load_hf_tensors(tmp_path)


def test_shard_missing_an_indexed_tensor(tmp_path: Path):
    small = _small_tensors()
    save_file({"a.weight": small["a.weight"]}, str(tmp_path / "model-00001-of-00001.safetensors"))
    shard = "model-00001-of-00001.safetensors"
    index = {"weight_map": {"a.weight": shard, "z": shard}}
    (tmp_path / SAFETENSORS_INDEX).write_text(json.dumps(index))
    with pytest.raises(WeightError, match="'z'"):
        load_hf_tensors(tmp_path)


def _small_tree() -> dict:
    rng = np.random.default_rng(2)
    return {
        "embed": {"embedding": rng.standard_normal((16, 8)).astype(np.float32)},
        "layers": {
            "attn": {"kernel": rng.standard_normal((3, 8, 8)).astype(ml_dtypes.bfloat16)},
            "norm": {"scale": jax.numpy.ones((3, 8), jax.numpy.float16)},
        },
        "step": np.array(7, np.int32),
    }


def test_orbax_roundtrip_bit_exact(tmp_path: Path):
    tree = _small_tree()
    ckpt = tmp_path / "ckpt"
    save_orbax(tree, ckpt / "params")
    cfg = {"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2, "num_key_value_heads": 1}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert detect_load_format(ckpt) == "orbax"
    got = load_orbax(ckpt)
    flat_want, tree_want = jax.tree.flatten(tree)
    flat_got, tree_got = jax.tree.flatten(got)
    assert tree_got == tree_want
    for g, w in zip(flat_got, flat_want, strict=True):
        w = np.asarray(w)
        assert isinstance(g, np.ndarray) and g.dtype == w.dtype and g.shape == w.shape
        assert np.array_equal(_bits(g), _bits(w))
    assert load_config(ckpt).hidden_size == 8
    assert load_config(ckpt / "params").hidden_size == 8
    with pytest.raises(WeightError, match="already exists"):
        save_orbax(tree, ckpt / "params")


def test_orbax_like_restores_int_keys_and_checks(tmp_path: Path):
    tree = {"layers": {0: {"w": np.ones(2, np.float32)}, 1: {"w": np.zeros(2, np.float32)}}}
    save_orbax(tree, tmp_path / "params")
    got = load_orbax(tmp_path, like=tree)
    assert set(got["layers"]) == {0, 1}
    assert np.array_equal(got["layers"][0]["w"], tree["layers"][0]["w"])
    wrong = {"layers": {0: {"w": jax.ShapeDtypeStruct((3,), np.float32)}, 1: tree["layers"][1]}}
    with pytest.raises(WeightError, match=r"layers\.0\.w"):
        load_orbax(tmp_path, like=wrong)


def test_detect_load_format_and_errors(tmp_path: Path, gguf_file: Path):
    assert detect_load_format(gguf_file) == "gguf"
    assert detect_load_format(gguf_file.parent) == "gguf"
    with pytest.raises(WeightError, match="does not exist"):
        detect_load_format(tmp_path / "nope")
    with pytest.raises(WeightError, match="holds no"):
        detect_load_format(tmp_path)
    with pytest.raises(WeightError, match="Orbax"):
        load_hf_tensors(_orbax_dir(tmp_path))


def _orbax_dir(tmp_path: Path) -> Path:
    save_orbax({"x": np.zeros(2, np.float32)}, tmp_path / "o" / "params")
    return tmp_path / "o"


def test_copy_model_metadata(tmp_path: Path):
    src = paths.default_model_path()
    if not (src / "config.json").is_file():
        pytest.skip("default model not fetched")
    copied = copy_model_metadata(src, tmp_path / "dst")
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= set(copied)
    assert (tmp_path / "dst" / "config.json").read_bytes() == (src / "config.json").read_bytes()


def test_check_params_match_names_the_leaf():
    expected = {
        "embed": {"embedding": jax.ShapeDtypeStruct((16, 8), np.float32)},
        "layers": {"attn": {"kernel": jax.ShapeDtypeStruct((3, 8, 8), ml_dtypes.bfloat16)}},
    }
    good = {
        "embed": {"embedding": np.zeros((16, 8), np.float32)},
        "layers": {"attn": {"kernel": np.zeros((3, 8, 8), ml_dtypes.bfloat16)}},
    }
    check_params_match(expected, good)

    missing = {"embed": good["embed"], "layers": {"attn": {}}}
    with pytest.raises(WeightError, match=r"missing parameter 'layers\.attn\.kernel'"):
        check_params_match(expected, missing)

    extra = {**good, "lm_head": {"kernel": np.zeros((8, 16), np.float32)}}
    with pytest.raises(WeightError, match=r"unexpected parameter 'lm_head\.kernel'"):
        check_params_match(expected, extra)

    misshaped = {**good, "embed": {"embedding": np.zeros((16, 9), np.float32)}}
    with pytest.raises(WeightError, match=r"'embed\.embedding' has shape \(16, 9\), expected \(16, 8\)"):
        check_params_match(expected, misshaped)

    wrong_dtype = {**good, "embed": {"embedding": np.zeros((16, 8), np.float16)}}
    with pytest.raises(WeightError, match=r"'embed\.embedding' has dtype float16"):
        check_params_match(expected, wrong_dtype)
