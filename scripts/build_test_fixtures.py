"""Build the test fixtures: tiny random checkpoints and HF reference outputs.

The ports are checked against HF transformers (torch, float32, eager attention)
on the same folders. Running torch in every test would be slow on two cores, so
the reference outputs are computed here once and stored beside each checkpoint
as `reference.npz` (arrays) and `reference.json` (lists, strings, and the
completion marker: `fixture_digest` of the spec in tests/fixture_spec.py, and
for fetched models the fetcher's stamp). A folder whose marker matches is
skipped, so `make test` pays for this only once.

Needs `scripts/fetch_models.py` to have written SmolLM2-135M-Instruct (its
tokenizer is saved beside every random checkpoint) and all-MiniLM-L6-v2.

    python scripts/build_test_fixtures.py [--force] [--only NAME ...] [--wait SECONDS]
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run as a plain script: make `tests.fixture_spec` importable

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoTokenizer, DynamicCache, PreTrainedModel, PreTrainedTokenizerBase  # noqa: E402

from tests import fixture_spec as spec  # noqa: E402

FETCH_STAMP = ".sglax_fetched.json"  # written by scripts/fetch_models.py into each fetched folder

Arrays = dict[str, np.ndarray]
Meta = dict[str, Any]

CONFIG_CLASSES: dict[str, type[transformers.PretrainedConfig]] = {
    "LlamaForCausalLM": transformers.LlamaConfig,
    "LlamaForSequenceClassification": transformers.LlamaConfig,
    "Qwen2ForCausalLM": transformers.Qwen2Config,
    "Qwen2ForSequenceClassification": transformers.Qwen2Config,
    "Qwen2MoeForCausalLM": transformers.Qwen2MoeConfig,
}


def log(msg: str) -> None:
    """Progress on stderr, flushed: `make test` shows where the time goes."""
    print(f"[fixtures] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- markers and files


def is_current(folder: Path) -> bool:
    """True when `folder` holds references built from the current spec (digest in the json marker)."""
    marker = folder / spec.REFERENCE_JSON
    if not marker.is_file() or not (folder / spec.REFERENCE_NPZ).is_file():
        return False
    try:
        meta = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return meta.get("fixture_digest") == spec.fixture_digest(folder.name) and meta.get(
        "source"
    ) == source_stamp(folder)


def source_stamp(folder: Path) -> Any:
    """What fetch_models recorded about a fetched folder (None for our own checkpoints)."""
    stamp = folder / FETCH_STAMP
    return json.loads(stamp.read_text()) if stamp.is_file() else None


def write_reference(folder: Path, arrays: Arrays, meta: Meta) -> None:
    """Write npz then json, each through a rename: the json is the completion marker."""
    for key, value in arrays.items():
        if value.dtype == np.float64:
            raise TypeError(f"{key}: references are stored as float32")
    npz_tmp = folder / (spec.REFERENCE_NPZ + ".tmp.npz")
    np.savez(npz_tmp, **arrays)
    npz_tmp.replace(folder / spec.REFERENCE_NPZ)
    json_tmp = folder / (spec.REFERENCE_JSON + ".tmp")
    marker = {
        "fixture_version": spec.FIXTURE_VERSION,
        "fixture_digest": spec.fixture_digest(folder.name),
        "source": source_stamp(folder),
    }
    json_tmp.write_text(json.dumps({**marker, **meta}, indent=1))
    json_tmp.replace(folder / spec.REFERENCE_JSON)


def wait_for(folder: Path, required: str, timeout_s: float) -> None:
    """Wait until `folder/required` exists (fetch_models may still be writing); exit if it never does."""
    deadline = time.monotonic() + timeout_s
    while not (folder / required).exists():
        if time.monotonic() >= deadline:
            sys.exit(f"{folder / required} is missing: run `make models` (scripts/fetch_models.py) first")
        time.sleep(5)


# ----------------------------------------------------------------------------- torch helpers


def load_hf(folder: Path, cls: type[PreTrainedModel]) -> PreTrainedModel:
    """The reference model: float32, eager attention, eval mode."""
    model = cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def _cache_kwarg(model: PreTrainedModel) -> str:
    """transformers 5.x renames `past_key_values` to `cache`; accept either."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.inference_mode()
def greedy(
    model: PreTrainedModel, ids: Sequence[int], steps: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prompt logits, then `steps` greedy tokens (EOS ignored) and the top-2 logit margin at each.

    A plain loop over raw logits rather than `generate`: no logits processor
    (min_new_tokens would mask EOS) may change what argmax sees.
    """
    kw = _cache_kwarg(model)
    cache = DynamicCache()
    out = model(input_ids=torch.tensor([list(ids)]), use_cache=True, **{kw: cache})
    prompt_logits = out.logits[0].float().numpy().copy()
    last = out.logits[0, -1].float()
    tokens: list[int] = []
    margins: list[float] = []
    for step in range(steps):
        top = torch.topk(last, 2)
        token = int(top.indices[0])
        tokens.append(token)
        margins.append(float(top.values[0] - top.values[1]))
        if step + 1 < steps:
            out = model(input_ids=torch.tensor([[token]]), use_cache=True, **{kw: cache})
            last = out.logits[0, -1].float()
    return prompt_logits, np.asarray(tokens, np.int32), np.asarray(margins, np.float32)


def random_ids(length: int, seed: int) -> list[int]:
    """Random non-special token ids: deterministic for a given seed."""
    rng = np.random.default_rng(seed)
    return rng.integers(spec.RANDOM_ID_LOW, spec.VOCAB_SIZE, size=length).tolist()


def comfortable_prompt(
    model: PreTrainedModel, length: int, base_seed: int, steps: int
) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray, int]:
    """Draw random prompts until the greedy path has no near-tie; keep the best if none is clean.

    Returns ids, prompt logits, greedy tokens, margins and the seed that was used.
    """
    best: tuple[list[int], np.ndarray, np.ndarray, np.ndarray, int] | None = None
    for attempt in range(spec.MAX_PROMPT_DRAWS):
        seed = base_seed + attempt
        ids = random_ids(length, seed)
        logits, tokens, margins = greedy(model, ids, steps)
        if best is None or margins.min() > best[3].min():
            best = (ids, logits, tokens, margins, seed)
        if margins.min() >= spec.MIN_COMFORTABLE_MARGIN:
            break
    assert best is not None
    return best


def chat_ids(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], generation_prompt: bool
) -> list[int]:
    """Token ids of a chat through the tokenizer's own template, as the server's chat route builds them."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    direct = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    if not isinstance(direct, list):  # BatchEncoding in newer transformers
        direct = direct["input_ids"]
    if list(direct) != list(ids):
        raise RuntimeError("apply_chat_template(tokenize=True) disagrees with encoding its text")
    return list(ids)


def causal_references(
    model: PreTrainedModel, chat: list[int], chat_steps: int, arrays: Arrays
) -> tuple[list[list[int]], Meta]:
    """The shared prompt set: random prompts with comfortable margins, then the chat prompt.

    Fills `prompt_<i>`, `logits_<i>`, `greedy_<i>`, `greedy_margin_<i>` into `arrays`.
    """
    prompts: list[list[int]] = []
    seeds: list[int] = []
    min_margins: list[float] = []
    for i, length in enumerate([*spec.RANDOM_PROMPT_LENGTHS, None]):
        if length is None:
            ids = chat
            logits, tokens, margins = greedy(model, ids, chat_steps)
        else:
            base_seed, steps = spec.PROMPT_SEED + 100 * i, spec.GREEDY_TOKENS
            ids, logits, tokens, margins, seed = comfortable_prompt(model, length, base_seed, steps)
            seeds.append(seed)
        prompts.append(ids)
        arrays[f"prompt_{i}"] = np.asarray(ids, np.int32)
        arrays[f"logits_{i}"] = logits
        arrays[f"greedy_{i}"] = tokens
        arrays[f"greedy_margin_{i}"] = margins
        min_margins.append(float(margins.min()))
    meta: Meta = {
        "num_prompts": spec.NUM_PROMPTS,
        "chat_prompt_index": spec.CHAT_PROMPT_INDEX,
        "greedy_tokens": spec.GREEDY_TOKENS,
        "chat_greedy_tokens": chat_steps,
        "prompt_seeds": seeds,
        "min_greedy_margin": min_margins,
    }
    return prompts, meta


# ----------------------------------------------------------------------------- random checkpoints


def init_weights(model: PreTrainedModel, seed: int) -> None:
    """Spread-out random weights: matrices N(0, 0.08), norms 1 + noise, small biases.

    HF's N(0, 0.02) gives near-flat logits over a 49k vocabulary, so greedy
    references would hinge on float noise.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied weights are listed once
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + spec.NORM_NOISE * noise)
            elif name.endswith(".bias"):
                param.copy_(spec.BIAS_STD * noise)
            else:
                param.copy_(spec.INIT_STD * noise)


def build_checkpoint(tiny: spec.TinyModel, tokenizer: PreTrainedTokenizerBase, dest: Path) -> None:
    """Save a random `tiny` checkpoint and SmolLM2's tokenizer into `dest` (through a temp folder)."""
    if len(tokenizer) != spec.VOCAB_SIZE:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens, the fixtures assume {spec.VOCAB_SIZE}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = CONFIG_CLASSES[tiny.architecture](
        **tiny.config,
        architectures=[tiny.architecture],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad,
        dtype="float32",
    )
    torch.manual_seed(tiny.seed)
    model = getattr(transformers, tiny.architecture)(config).to(torch.float32).eval()
    init_weights(model, tiny.seed)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_kw: dict[str, Any] = {"safe_serialization": True}
    if tiny.max_shard_size:
        save_kw["max_shard_size"] = tiny.max_shard_size
    model.save_pretrained(tmp, **save_kw)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


@torch.inference_mode()
def router_counts(model: PreTrainedModel, ids: Sequence[int]) -> np.ndarray:
    """int32[num_layers, num_experts]: how often each expert is in a prompt token's top-k, per layer.

    Recomputed from the router logits the way Qwen2MoeTopKRouter does it
    (softmax in float32, then top-k), over the prompt's tokens only.
    """
    cfg = model.config
    out = model(input_ids=torch.tensor([list(ids)]), output_router_logits=True)
    rows = []
    for layer_logits in out.router_logits:
        probs = torch.softmax(layer_logits.reshape(-1, cfg.num_experts).float(), dim=-1)
        chosen = torch.topk(probs, cfg.num_experts_per_tok, dim=-1).indices
        rows.append(torch.bincount(chosen.reshape(-1), minlength=cfg.num_experts))
    counts = torch.stack(rows).numpy().astype(np.int32)
    if (
        counts.shape != (cfg.num_hidden_layers, cfg.num_experts)
        or not (counts.sum(axis=1) == len(ids) * cfg.num_experts_per_tok).all()
    ):
        raise RuntimeError(f"unexpected router counts {counts.shape}: {counts.sum(axis=1)}")
    return counts


@torch.inference_mode()
def pooled_embedding(model: PreTrainedModel, ids: Sequence[int]) -> np.ndarray:
    """gte-Qwen2 style: last token's hidden state after the final norm, L2-normalised."""
    hidden = model.model(input_ids=torch.tensor([list(ids)])).last_hidden_state[0, -1].float()
    return torch.nn.functional.normalize(hidden, dim=-1).numpy().copy()


@torch.inference_mode()
def class_scores(model: PreTrainedModel, ids: Sequence[int]) -> np.ndarray:
    """float32[num_labels]: the classification head's logits on the last (non-pad) token."""
    if ids[-1] == model.config.pad_token_id:
        raise RuntimeError("a scored prompt must not end in the pad id (HF would pool another token)")
    return model(input_ids=torch.tensor([list(ids)])).logits[0].float().numpy().copy()


def tiny_references(tiny: spec.TinyModel, folder: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    """Load the saved checkpoint back and store every reference its spec asks for."""
    model = load_hf(folder, getattr(transformers, tiny.architecture))
    chat = chat_ids(tokenizer, spec.CHAT_MESSAGES, generation_prompt=True)
    arrays: Arrays = {}
    meta: Meta = {"name": tiny.name, "architecture": tiny.architecture}
    if tiny.causal:
        prompts, causal_meta = causal_references(model, chat, spec.GREEDY_TOKENS, arrays)
        meta.update(causal_meta)
    else:
        lengths = spec.RANDOM_PROMPT_LENGTHS
        prompts = [random_ids(n, spec.PROMPT_SEED + 100 * i) for i, n in enumerate(lengths)] + [chat]
        meta.update(num_prompts=spec.NUM_PROMPTS, chat_prompt_index=spec.CHAT_PROMPT_INDEX)
    for i, ids in enumerate(prompts):
        arrays[f"prompt_{i}"] = np.asarray(ids, np.int32)
        if tiny.embedding:
            arrays[f"embedding_{i}"] = pooled_embedding(model, ids)
        if tiny.router:
            arrays[f"router_counts_{i}"] = router_counts(model, ids)
        if tiny.classifier:
            arrays[f"score_{i}"] = class_scores(model, ids)
    if tiny.reward_conversations:
        for j, conv in enumerate(spec.REWARD_CONVERSATIONS):
            ids = chat_ids(tokenizer, conv, generation_prompt=False)
            arrays[f"conv_ids_{j}"] = np.asarray(ids, np.int32)
            arrays[f"conv_score_{j}"] = class_scores(model, ids)
        meta["conversations"] = spec.REWARD_CONVERSATIONS
        meta["conversation_texts"] = [
            tokenizer.apply_chat_template(conv, tokenize=False) for conv in spec.REWARD_CONVERSATIONS
        ]
    write_reference(folder, arrays, meta)


def build_tiny(tiny: spec.TinyModel, tokenizer: PreTrainedTokenizerBase, force: bool) -> None:
    """One random model: checkpoint plus references, unless already current."""
    folder = spec.models_dir() / tiny.name
    if not force and is_current(folder):
        log(f"{tiny.name}: up to date")
        return
    start = time.monotonic()
    build_checkpoint(tiny, tokenizer, folder)
    tiny_references(tiny, folder, tokenizer)
    log(f"{tiny.name}: built in {time.monotonic() - start:.1f}s")


# ----------------------------------------------------------------------------- real models


def build_smollm2(force: bool) -> None:
    """SmolLM2 references: shared prompts, the chat answer, and the continuous-batching set."""
    folder = spec.models_dir() / spec.SMOLLM2
    if not force and is_current(folder):
        log(f"{spec.SMOLLM2}: up to date")
        return
    start = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = load_hf(folder, transformers.AutoModelForCausalLM)
    arrays: Arrays = {}
    chat = chat_ids(tokenizer, spec.CHAT_MESSAGES, generation_prompt=True)
    _, meta = causal_references(model, chat, spec.SMOLLM2_CHAT_GREEDY_TOKENS, arrays)
    tokens = arrays[f"greedy_{spec.CHAT_PROMPT_INDEX}"]
    eos = tokenizer.eos_token_id
    answer = tokens.tolist()
    answer_until_eos = answer[: answer.index(eos) + 1] if eos in answer else answer
    chat_text = tokenizer.decode(answer_until_eos, skip_special_tokens=True)
    if "Paris" not in chat_text:
        raise RuntimeError(f"SmolLM2's chat answer lacks 'Paris': {chat_text!r} (is the checkpoint right?)")

    rng = np.random.default_rng(spec.BATCH_SEED)
    log_len = rng.uniform(np.log(spec.BATCH_MIN_LEN), np.log(spec.BATCH_MAX_LEN), spec.BATCH_NUM_PROMPTS)
    lengths = np.rint(np.exp(log_len)).astype(int)
    lengths[0], lengths[-1] = spec.BATCH_MIN_LEN, spec.BATCH_MAX_LEN
    max_new = rng.integers(1, spec.BATCH_MAX_NEW_TOKENS + 1, spec.BATCH_NUM_PROMPTS)
    max_new[1], max_new[-1] = 1, spec.BATCH_MAX_NEW_TOKENS
    batch_seeds, batch_min_margins = [], []
    for j, (length, steps) in enumerate(zip(lengths.tolist(), max_new.tolist(), strict=True)):
        base_seed = spec.BATCH_SEED + 100 * (j + 1)
        ids, _, tokens, margins, seed = comfortable_prompt(model, length, base_seed, steps)
        arrays[f"batch_prompt_{j}"] = np.asarray(ids, np.int32)
        arrays[f"batch_greedy_{j}"], arrays[f"batch_greedy_margin_{j}"] = tokens, margins
        batch_seeds.append(seed)
        batch_min_margins.append(float(margins.min()))
    arrays["batch_max_new_tokens"] = max_new.astype(np.int32)

    meta.update(
        name=spec.SMOLLM2,
        chat_messages=spec.CHAT_MESSAGES,
        chat_prompt_text=tokenizer.decode(chat),
        chat_answer_tokens=answer_until_eos,
        chat_text=chat_text,
        eos_token_id=eos,
        batch_num_prompts=spec.BATCH_NUM_PROMPTS,
        batch_prompt_lengths=lengths.tolist(),
        batch_prompt_seeds=batch_seeds,
        batch_min_greedy_margin=batch_min_margins,
    )
    write_reference(folder, arrays, meta)
    log(f"{spec.SMOLLM2}: references in {time.monotonic() - start:.1f}s; chat answer {chat_text!r}")


def build_minilm(force: bool) -> None:
    """sentence-transformers embeddings of varied sentences, with the token ids it fed the encoder."""
    folder = spec.models_dir() / spec.MINILM
    if not force and is_current(folder):
        log(f"{spec.MINILM}: up to date")
        return
    from sentence_transformers import SentenceTransformer

    start = time.monotonic()
    model = SentenceTransformer(str(folder), device="cpu")
    sentences = spec.MINILM_SENTENCES
    embeddings = model.encode(sentences, batch_size=32, convert_to_numpy=True, show_progress_bar=False)
    # sentence-transformers >= 6 renamed `tokenize` to `preprocess`
    features = getattr(model, "preprocess", model.tokenize)(sentences)
    mask = features["attention_mask"].numpy().astype(bool)
    input_ids = [row[m].tolist() for row, m in zip(features["input_ids"].numpy(), mask, strict=True)]
    meta: Meta = {
        "name": spec.MINILM,
        "sentences": sentences,
        "input_ids": input_ids,
        "max_seq_length": model.max_seq_length,
        "embedding_dim": int(embeddings.shape[1]),
    }
    write_reference(folder, {"embeddings": np.asarray(embeddings, np.float32)}, meta)
    log(f"{spec.MINILM}: references in {time.monotonic() - start:.1f}s")


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """Build whatever is missing or stale; `--only` narrows, `--force` rebuilds."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--force", action="store_true", help="rebuild even when the version marker matches")
    parser.add_argument("--only", nargs="+", choices=spec.ALL_MODEL_NAMES, help="build just these fixtures")
    parser.add_argument("--wait", type=float, default=0.0, help="seconds to wait for fetch_models' folders")
    args = parser.parse_args(argv)
    wanted = set(args.only or spec.ALL_MODEL_NAMES)

    torch.set_num_threads(2)
    torch.manual_seed(0)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    models = spec.models_dir()
    models.mkdir(parents=True, exist_ok=True)
    smollm2 = models / spec.SMOLLM2
    wait_for(smollm2, "model.safetensors", args.wait)
    wait_for(smollm2, "tokenizer.json", args.wait)

    start = time.monotonic()
    tiny_wanted = [tiny for tiny in spec.TINY_MODELS if tiny.name in wanted]
    if tiny_wanted:
        tokenizer = AutoTokenizer.from_pretrained(smollm2)
        for tiny in tiny_wanted:
            build_tiny(tiny, tokenizer, args.force)
    if spec.SMOLLM2 in wanted:
        build_smollm2(args.force)
    if spec.MINILM in wanted:
        wait_for(models / spec.MINILM, "modules.json", args.wait)
        build_minilm(args.force)
    log(f"done in {time.monotonic() - start:.1f}s ({models})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
