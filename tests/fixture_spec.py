"""One place for the test fixtures' names, configs and prompts.

`scripts/build_test_fixtures.py` builds from this module and `tests/conftest.py`
reads by it, so the builder and the tests cannot drift apart. Only the standard
library and `runtime.paths` are imported here: the kernel-test venv (no torch,
no transformers) loads the same conftest.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from runtime import paths

# Bump when the builder's code changes what it stores. Changes to the constants
# below are caught by `fixture_digest` without a bump.
FIXTURE_VERSION = 1

REFERENCE_NPZ = "reference.npz"
REFERENCE_JSON = "reference.json"

SMOLLM2 = paths.DEFAULT_MODEL_NAME
MINILM = paths.EMBEDDING_MODEL_NAME


def compile_level_for(model_path: str | Path) -> int | None:
    """The `--xla-backend-optimization-level` tests serve `model_path` at. The tiny random models
    (and copies of them) compile at 0: their programs' compiles outweigh their steps. The real
    models keep XLA's own level (None), under which their steps run faster."""
    return None if Path(model_path).name in (SMOLLM2, MINILM) else 0


def compile_level_flags(model_path: str | Path) -> tuple[str, ...]:
    """`compile_level_for` as server flags."""
    level = compile_level_for(model_path)
    return () if level is None else ("--xla-backend-optimization-level", str(level))


TINY_LLAMA = "tiny-llama"
TINY_LLAMA_TIED_GQA8 = "tiny-llama-tied-gqa8"
TINY_QWEN2 = "tiny-qwen2"
TINY_QWEN2_MOE = "tiny-qwen2-moe"
TINY_LLAMA_REWARD = "tiny-llama-reward"
TINY_QWEN2_CLS = "tiny-qwen2-cls"
TINY_LLAMA_SHARDED = "tiny-llama-sharded"

VOCAB_SIZE = 49152  # SmolLM2's tokenizer, saved beside every random checkpoint
MAX_POSITIONS = 2048

# Random weights: wider than HF's 0.02 so greedy margins are comfortable.
INIT_STD = 0.08
NORM_NOISE = 0.05
BIAS_STD = 0.02

CHAT_QUESTION = "What is the capital of France?"
CHAT_MESSAGES: list[dict[str, str]] = [{"role": "user", "content": CHAT_QUESTION}]

# Token-id prompts shared by every causal LM: random ids of these lengths (ids at
# or above RANDOM_ID_LOW, so no special tokens), then the chat-templated question.
RANDOM_PROMPT_LENGTHS: tuple[int, ...] = (7, 33, 100)
RANDOM_ID_LOW = 100
PROMPT_SEED = 1234
CHAT_PROMPT_INDEX = len(RANDOM_PROMPT_LENGTHS)
NUM_PROMPTS = len(RANDOM_PROMPT_LENGTHS) + 1
GREEDY_TOKENS = 16
SMOLLM2_CHAT_GREEDY_TOKENS = 32

# A random prompt is redrawn (next seed) when the reference's smallest top-2
# margin along its greedy path falls under this, so that float noise in a port
# cannot flip a near-tie and make a test flaky.
MIN_COMFORTABLE_MARGIN = 0.01
MAX_PROMPT_DRAWS = 6

# Continuous-batching set on SmolLM2: mixed prompt lengths and output lengths.
BATCH_NUM_PROMPTS = 16
BATCH_MIN_LEN = 5
BATCH_MAX_LEN = 700
BATCH_MAX_NEW_TOKENS = 24
BATCH_SEED = 4321

# SGLang's reward-model example (docs, Skywork-Reward): one question, a wrong
# answer and a right one.
REWARD_PROMPT = "What is the range of the numeric output of a sigmoid node in a neural network?"
REWARD_RESPONSES: tuple[str, str] = (
    "The output of a sigmoid node is bounded between -1 and 1.",
    "The output of a sigmoid node is bounded between 0 and 1.",
)
REWARD_CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": REWARD_PROMPT}, {"role": "assistant", "content": answer}]
    for answer in REWARD_RESPONSES
]

# Sentences for all-MiniLM-L6-v2: English, code, unicode, short and long.
MINILM_SENTENCES: list[str] = [
    "The capital of France is Paris.",
    "Paris is the capital city of France.",
    "I like to eat apples and bananas.",
    "A man is playing a guitar on stage.",
    "hello",
    "?",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "SELECT name, COUNT(*) FROM users GROUP BY name HAVING COUNT(*) > 1;",
    'for (int i = 0; i < 10; ++i) { printf("%d\\n", i); }',
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "東京は日本の首都です。",
    "Москва — столица России.",
    "Emoji test: 🚀🔥✨ are popular symbols 😀",
    "naïve café résumé coöperate façade",
    "The quick brown fox jumps over the lazy dog. " * 12,
    "Machine learning models are trained on large datasets to recognise patterns, "
    "and their performance depends on the quality and diversity of those datasets, "
    "the architecture chosen, the optimisation procedure, and careful evaluation on "
    "held-out data that the model has never seen during training.",
    "   leading and trailing spaces   ",
    "UPPER CASE SENTENCE WITH NUMBERS 12345 AND SYMBOLS #@!",
    "A sentence\nspanning\nseveral lines.",
    "The weather today is sunny with a light breeze.",
]


@dataclass(frozen=True)
class TinyModel:
    """A random checkpoint: HF architecture, config fields, seed, and what to reference."""

    name: str
    architecture: str
    config: dict[str, Any]
    seed: int
    causal: bool = True  # logits + greedy references
    embedding: bool = False  # last-token pooled, normalised hidden state references
    router: bool = False  # MoE router top-k count references
    classifier: bool = False  # sequence-classification score references
    reward_conversations: bool = False  # score SGLang's reward example too
    max_shard_size: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


_LLAMA_BASE: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": MAX_POSITIONS,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}

_QWEN2_BASE: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": MAX_POSITIONS,
    "hidden_size": 96,  # 6 heads x head_dim 16 (Qwen2 derives head_dim = hidden / heads)
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
}

TINY_MODELS: tuple[TinyModel, ...] = (
    TinyModel(TINY_LLAMA, "LlamaForCausalLM", dict(_LLAMA_BASE), seed=1),
    TinyModel(
        TINY_LLAMA_TIED_GQA8,
        "LlamaForCausalLM",
        {
            **_LLAMA_BASE,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 3,
            "num_attention_heads": 8,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "tie_word_embeddings": True,
            "rope_theta": 100000.0,
        },
        seed=2,
    ),
    TinyModel(TINY_QWEN2, "Qwen2ForCausalLM", dict(_QWEN2_BASE), seed=3, embedding=True),
    TinyModel(
        TINY_QWEN2_MOE,
        "Qwen2MoeForCausalLM",
        {
            **_QWEN2_BASE,
            "hidden_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,  # multi-head, as Qwen1.5-MoE-A2.7B
            "intermediate_size": 128,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "norm_topk_prob": False,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 64,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "qkv_bias": True,
        },
        seed=4,
        router=True,
    ),
    TinyModel(
        TINY_LLAMA_REWARD,
        "LlamaForSequenceClassification",
        {**_LLAMA_BASE, "num_labels": 1},
        seed=5,
        causal=False,
        classifier=True,
        reward_conversations=True,
    ),
    TinyModel(
        TINY_QWEN2_CLS,
        "Qwen2ForSequenceClassification",
        # Explicit labels: HF leaves its default two labels out of config.json.
        {
            **_QWEN2_BASE,
            "id2label": {0: "negative", 1: "positive"},
            "label2id": {"negative": 0, "positive": 1},
        },
        seed=6,
        causal=False,
        classifier=True,
    ),
    TinyModel(TINY_LLAMA_SHARDED, "LlamaForCausalLM", dict(_LLAMA_BASE), seed=16, max_shard_size="5MB"),
)

ALL_MODEL_NAMES: tuple[str, ...] = (SMOLLM2, MINILM, *(m.name for m in TINY_MODELS))


def cache_dir() -> Path:
    """The git-ignored cache root, as `runtime.paths` decides it."""
    return paths.cache_dir()


def models_dir() -> Path:
    """Where model folders live: <cache>/models."""
    return paths.models_dir()


def fixture_digest(name: str) -> str:
    """A hash of everything in this module that shapes fixture `name`.

    Stored in each reference.json; the builder rebuilds, and the tests skip, a
    fixture whose digest differs, so editing a seed or a prompt cannot leave a
    stale reference looking current.
    """
    shared: dict[str, Any] = {
        "version": FIXTURE_VERSION,
        "vocab": VOCAB_SIZE,
        "chat": CHAT_MESSAGES,
        "prompts": [RANDOM_PROMPT_LENGTHS, RANDOM_ID_LOW, PROMPT_SEED, GREEDY_TOKENS],
        "margins": [MIN_COMFORTABLE_MARGIN, MAX_PROMPT_DRAWS],
    }
    tiny = {m.name: m for m in TINY_MODELS}
    if name in tiny:
        model = tiny[name]
        specific: Any = [asdict(model), INIT_STD, NORM_NOISE, BIAS_STD, MAX_POSITIONS]
        if model.reward_conversations:
            specific.append(REWARD_CONVERSATIONS)
    elif name == SMOLLM2:
        specific = [
            SMOLLM2_CHAT_GREEDY_TOKENS,
            [BATCH_NUM_PROMPTS, BATCH_MIN_LEN, BATCH_MAX_LEN, BATCH_MAX_NEW_TOKENS, BATCH_SEED],
        ]
    elif name == MINILM:
        shared = {"version": FIXTURE_VERSION}
        specific = MINILM_SENTENCES
    else:
        raise KeyError(f"unknown fixture {name!r}")
    blob = json.dumps([name, shared, specific], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
