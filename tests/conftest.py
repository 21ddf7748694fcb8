"""Shared test setup: JAX's compile cache, the fixture models and their HF references,
and the one rule every greedy test compares tokens by.

The fixtures come from `make fixtures` (scripts/build_test_fixtures.py); a test
whose fixture is missing or stale is skipped with a message saying so, rather
than failing far from the cause. Only numpy, pytest and jax are imported here:
the kernel-test venv loads this file too.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runtime import paths
from tests import fixture_spec as spec

# Absolute top-2 margin under which a differing greedy token counts as a tie
# broken the other way (TEST_MODELS.md: about 1e-4 of the logit scale; the
# fixtures' logits reach about 3-5 for the tiny models and 30-38 for SmolLM2).
GREEDY_TIE_TOL = 1e-3

_MISSING_HINT = "run `make fixtures` (scripts/build_test_fixtures.py) to build it"


def pytest_configure(config: pytest.Config) -> None:
    """Persistent XLA compile cache beside the models: repeated runs skip most compiles."""
    import jax

    if jax.config.jax_compilation_cache_dir is None:  # an explicit JAX_COMPILATION_CACHE_DIR wins
        cache = paths.compile_cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_enable_x64", False)


# ----------------------------------------------------------------------------- models and references


def fixture_path(name: str) -> Path:
    """The folder of fixture model `name`; skips the calling test when it is not built."""
    folder = spec.models_dir() / name
    if not (folder / "config.json").is_file():
        pytest.skip(f"test model {name!r} missing at {folder}: {_MISSING_HINT}")
    return folder


@functools.cache
def _read_reference(folder: Path) -> dict[str, Any] | str:
    """The merged npz arrays and json entries, or why they cannot be used (cached per session)."""
    npz, meta_file = folder / spec.REFERENCE_NPZ, folder / spec.REFERENCE_JSON
    if not npz.is_file() or not meta_file.is_file():
        return f"no HF reference outputs in {folder}"
    meta = json.loads(meta_file.read_text())
    if meta.get("fixture_digest") != spec.fixture_digest(folder.name):
        return f"references in {folder} were built from another fixture spec"
    with np.load(npz) as data:
        merged: dict[str, Any] = {key: data[key] for key in data.files}
    clash = merged.keys() & meta.keys()
    if clash:
        raise KeyError(f"{folder}: keys in both reference files: {sorted(clash)}")
    merged.update(meta)
    return merged


def load_reference(name: str) -> dict[str, Any]:
    """HF reference outputs of fixture model `name`: npz arrays and json entries in one dict.

    Keys are listed in the builder's docstring and in the report of each model's
    reference.json; skips the calling test when the references are missing or stale.
    """
    found = _read_reference(fixture_path(name))
    if isinstance(found, str):
        pytest.skip(f"{found}: {_MISSING_HINT}")
    return found


def prompts_of(ref: dict[str, Any]) -> list[list[int]]:
    """The prompt token ids a causal reference was computed on, in index order."""
    return [ref[f"prompt_{i}"].tolist() for i in range(ref["num_prompts"])]


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """<cache>/models, where fetch_models and the fixture builder write."""
    return spec.models_dir()


@pytest.fixture(scope="session")
def model_path() -> Callable[[str], Path]:
    """`model_path(name)`: a fixture model's folder (the test is skipped if it is missing)."""
    return fixture_path


@pytest.fixture(scope="session")
def reference() -> Callable[[str], dict[str, Any]]:
    """`reference(name)`: that model's HF reference outputs (the test is skipped if missing)."""
    return load_reference


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct, float32 HF folder converted from the GGUF."""
    return fixture_path(spec.SMOLLM2)


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """all-MiniLM-L6-v2, a sentence-transformers folder (BERT, mean pooling)."""
    return fixture_path(spec.MINILM)


@pytest.fixture(scope="session")
def tiny_llama_path() -> Path:
    """Random LlamaForCausalLM: 2 layers, hidden 64, GQA 2, untied."""
    return fixture_path(spec.TINY_LLAMA)


@pytest.fixture(scope="session")
def tiny_llama_tied_path() -> Path:
    """Random LlamaForCausalLM: 3 layers, 8 query heads on 1 KV head, tied embeddings."""
    return fixture_path(spec.TINY_LLAMA_TIED_GQA8)


@pytest.fixture(scope="session")
def tiny_qwen2_path() -> Path:
    """Random Qwen2ForCausalLM with QKV bias; also the last-token embedding model."""
    return fixture_path(spec.TINY_QWEN2)


@pytest.fixture(scope="session")
def tiny_qwen2_moe_path() -> Path:
    """Random Qwen2MoeForCausalLM: 8 experts, top-2, sigmoid-gated shared expert."""
    return fixture_path(spec.TINY_QWEN2_MOE)


@pytest.fixture(scope="session")
def tiny_llama_reward_path() -> Path:
    """Random LlamaForSequenceClassification with one label (a reward model)."""
    return fixture_path(spec.TINY_LLAMA_REWARD)


@pytest.fixture(scope="session")
def tiny_qwen2_cls_path() -> Path:
    """Random Qwen2ForSequenceClassification with two labels."""
    return fixture_path(spec.TINY_QWEN2_CLS)


@pytest.fixture(scope="session")
def tiny_llama_sharded_path() -> Path:
    """Random LlamaForCausalLM saved as several safetensors shards plus an index."""
    return fixture_path(spec.TINY_LLAMA_SHARDED)


# ----------------------------------------------------------------------------- comparison rules


@dataclass(frozen=True)
class GreedyComparison:
    """Outcome of `greedy_agrees`: truthy when acceptable; `str()` says why, for assert messages."""

    ok: bool
    compared: int  # tokens compared before agreeing, stopping at a tie, or failing
    detail: str

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        return self.detail


def greedy_agrees(
    ours: Sequence[int] | np.ndarray,
    ref_tokens: Sequence[int] | np.ndarray,
    ref_margins: Sequence[float] | np.ndarray,
    tol: float = GREEDY_TIE_TOL,
    allow_shorter: bool = False,
) -> GreedyComparison:
    """TEST_MODELS.md's rule for greedy tokens, so float noise cannot make a test flaky.

    Tokens must match the reference up to the first difference; that difference
    is accepted only when the reference's top-2 margin at that step is below
    `tol` (a genuine tie broken the other way), and the comparison stops there,
    since everything after it continues a different sequence. `allow_shorter`
    accepts `ours` ending early (e.g. stopped at EOS) on an agreeing prefix.

        result = greedy_agrees(out_ids, ref["greedy_0"], ref["greedy_margin_0"])
        assert result, result
    """
    mine = [int(t) for t in ours]
    ref = [int(t) for t in ref_tokens]
    margins = np.asarray(ref_margins, dtype=np.float64)
    if margins.shape != (len(ref),):
        raise ValueError(f"{len(ref)} reference tokens but margins of shape {margins.shape}")
    for step, (a, b) in enumerate(zip(mine, ref, strict=False)):
        if a == b:
            continue
        if margins[step] < tol:
            return GreedyComparison(
                True, step, f"agree on {step} tokens, then a tie (ref margin {margins[step]:.3g} < {tol:g})"
            )
        return GreedyComparison(
            False,
            step,
            f"step {step}: ours {a}, reference {b} with top-2 margin {margins[step]:.4g} >= {tol:g}; "
            f"ours {mine}, reference {ref}",
        )
    if len(mine) == len(ref) or (allow_shorter and len(mine) < len(ref)):
        return GreedyComparison(True, len(mine), f"agree on all {len(mine)} tokens")
    return GreedyComparison(
        False, min(len(mine), len(ref)), f"length {len(mine)} vs reference {len(ref)}: ours {mine}, ref {ref}"
    )


def max_rel_err(ours: np.ndarray | Any, ref: np.ndarray) -> float:
    """Norm-wise error `max|ours - ref| / max|ref|` (element-wise relative error blows up near zero)."""
    a = np.asarray(ours, dtype=np.float64)
    b = np.asarray(ref, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape {a.shape} vs reference {b.shape}")
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))
