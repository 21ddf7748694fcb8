"""The test fixtures themselves: the greedy comparison rule, and that every built
reference has the keys and shapes the parity tests rely on (cheap: no torch)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests import fixture_spec as spec
from tests.conftest import fixture_path, greedy_agrees, load_reference, max_rel_err, prompts_of


def test_greedy_agrees_exact_and_tie_rule() -> None:
    ref, margins = [5, 6, 7, 8], [1.0, 1.0, 1e-5, 1.0]
    assert greedy_agrees([5, 6, 7, 8], ref, margins)
    tie = greedy_agrees([5, 6, 9, 1], ref, margins)  # differs where the reference is a near-tie
    assert tie and tie.compared == 2
    bad = greedy_agrees([5, 0, 7, 8], ref, margins)  # differs where the reference is confident
    assert not bad and "step 1" in str(bad)


def test_greedy_agrees_lengths() -> None:
    ref, margins = [1, 2, 3], [1.0, 1.0, 1.0]
    assert not greedy_agrees([1, 2], ref, margins)
    assert greedy_agrees([1, 2], ref, margins, allow_shorter=True)
    assert not greedy_agrees([1, 2, 3, 4], ref, margins)
    with pytest.raises(ValueError):
        greedy_agrees([1], ref, [1.0])


def test_max_rel_err() -> None:
    ref = np.array([[0.0, 2.0], [-4.0, 1.0]])
    assert max_rel_err(ref, ref) == 0.0
    assert max_rel_err(ref + np.array([[0.4, 0.0], [0.0, 0.0]]), ref) == pytest.approx(0.1)


def test_fixture_digest_tracks_spec() -> None:
    digests = {name: spec.fixture_digest(name) for name in spec.ALL_MODEL_NAMES}
    assert len(set(digests.values())) == len(digests)
    assert digests[spec.TINY_LLAMA] == spec.fixture_digest(spec.TINY_LLAMA)


@pytest.mark.parametrize("tiny", spec.TINY_MODELS, ids=lambda t: t.name)
def test_tiny_reference_layout(tiny: spec.TinyModel) -> None:
    ref = load_reference(tiny.name)
    config = json.loads((fixture_path(tiny.name) / "config.json").read_text())
    assert config["architectures"] == [tiny.architecture]
    assert config["vocab_size"] == spec.VOCAB_SIZE
    prompts = prompts_of(ref)
    assert len(prompts) == spec.NUM_PROMPTS
    for i, ids in enumerate(prompts):
        if tiny.causal:
            assert ref[f"logits_{i}"].shape == (len(ids), spec.VOCAB_SIZE)
            assert ref[f"greedy_{i}"].shape == ref[f"greedy_margin_{i}"].shape == (spec.GREEDY_TOKENS,)
            assert (ref[f"greedy_margin_{i}"] >= 0).all()
        if tiny.embedding:
            assert np.linalg.norm(ref[f"embedding_{i}"]) == pytest.approx(1.0, abs=1e-5)
        if tiny.router:
            counts = ref[f"router_counts_{i}"]
            assert counts.shape == (config["num_hidden_layers"], config["num_experts"])
            assert (counts.sum(axis=1) == len(ids) * config["num_experts_per_tok"]).all()
        if tiny.classifier:
            assert ref[f"score_{i}"].shape == (len(config["id2label"]),)
    if tiny.reward_conversations:
        assert ref["conv_score_0"].shape == ref["conv_score_1"].shape == (1,)
    if tiny.max_shard_size:
        folder = fixture_path(tiny.name)
        assert (folder / "model.safetensors.index.json").is_file()
        assert len(list(folder.glob("model-*-of-*.safetensors"))) >= 2


def test_smollm2_reference() -> None:
    ref = load_reference(spec.SMOLLM2)
    assert "Paris" in ref["chat_text"]
    chat = spec.CHAT_PROMPT_INDEX
    assert ref[f"greedy_{chat}"].shape == (spec.SMOLLM2_CHAT_GREEDY_TOKENS,)
    assert ref[f"greedy_{chat}"].tolist()[: len(ref["chat_answer_tokens"])] == ref["chat_answer_tokens"]
    max_new = ref["batch_max_new_tokens"]
    assert max_new.shape == (spec.BATCH_NUM_PROMPTS,)
    for j in range(spec.BATCH_NUM_PROMPTS):
        assert spec.BATCH_MIN_LEN <= ref[f"batch_prompt_{j}"].size <= spec.BATCH_MAX_LEN
        assert ref[f"batch_greedy_{j}"].shape == ref[f"batch_greedy_margin_{j}"].shape == (max_new[j],)


def test_minilm_reference() -> None:
    ref = load_reference(spec.MINILM)
    assert ref["embeddings"].shape == (len(spec.MINILM_SENTENCES), ref["embedding_dim"])
    assert ref["sentences"] == spec.MINILM_SENTENCES
    assert len(ref["input_ids"]) == len(spec.MINILM_SENTENCES)
