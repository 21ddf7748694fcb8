"""Checkpoints on disk -> host tensors, without torch.

Three formats reach the engine: an HF folder of safetensors (one file or sharded
with an index), a GGUF file (dequantized here with the `gguf` package's numpy
code, renamed to HF names, Llama's Q/K rows put back in HF order), and an Orbax
checkpoint (`<dir>/params/` beside `config.json` and the tokenizer files).
Everything comes back as numpy arrays on the host: the model decides layout and
device placement. `check_params_match` guards hot swaps and Orbax loads: a tree
of the wrong shape must fail loudly, naming the leaf, before it reaches a jitted
step.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import ml_dtypes
import numpy as np

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
ORBAX_PARAMS_DIR = "params"
# Files beside the weights that a server folder needs (config, tokenizer, generation defaults).
MODEL_METADATA_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "added_tokens.json",
)

LoadFormat = Literal["safetensors", "gguf", "orbax"]


class WeightError(ValueError):
    """A checkpoint that cannot be loaded as asked: missing, corrupt, or not the expected shape."""


# --------------------------------------------------------------------------- format detection


def _is_gguf_file(path: Path) -> bool:
    """A GGUF file by its magic bytes (the extension alone could lie)."""
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _is_orbax_dir(path: Path) -> bool:
    """An Orbax checkpoint directory: it carries Orbax's own metadata files."""
    return path.is_dir() and ((path / "_CHECKPOINT_METADATA").exists() or (path / "_METADATA").exists())


def _gguf_in_dir(path: Path) -> Path | None:
    """The one `.gguf` file of a folder, or None; several are ambiguous and refused."""
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        raise WeightError(f"{path} holds several GGUF files ({[p.name for p in found]}); name one of them")
    return found[0] if found else None


# What `--load-format` takes: a checkpoint format, "auto" (detected) or "dummy" (random weights).
LOAD_FORMATS = ("auto", "safetensors", "gguf", "orbax", "dummy")


def detect_load_format(path: str | os.PathLike) -> LoadFormat:
    """Which loader a model path needs: "safetensors", "gguf" or "orbax".

    Safetensors wins in a folder that has both (a GGUF converted in place keeps its source beside it).
    """
    p = Path(path)
    if not p.exists():
        raise WeightError(f"model path {p} does not exist")
    if p.is_file():
        if _is_gguf_file(p):
            return "gguf"
        if p.suffix == ".safetensors":
            return "safetensors"
        raise WeightError(f"{p} is neither a GGUF nor a safetensors file")
    if (p / SAFETENSORS_INDEX).exists() or (p / SAFETENSORS_FILE).exists():
        return "safetensors"
    if _is_orbax_dir(p / ORBAX_PARAMS_DIR) or _is_orbax_dir(p):
        return "orbax"
    if _gguf_in_dir(p) is not None:
        return "gguf"
    raise WeightError(
        f"{p} holds no {SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, "
        f"Orbax '{ORBAX_PARAMS_DIR}/' checkpoint or .gguf file"
    )


# --------------------------------------------------------------------------- safetensors

# safetensors dtype names -> numpy dtypes (bf16 and fp8 through ml_dtypes, which JAX uses too).
_ST_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of one safetensors file, as numpy arrays in the stored dtype.

    Parsed here rather than through `safetensors.numpy` so that bf16/fp8 come back as ml_dtypes
    arrays and so that a truncated or corrupt file is a `WeightError` naming the file, checked
    before any tensor is read.
    """
    p = Path(path)
    if not p.is_file():
        raise WeightError(f"safetensors file {p} does not exist")
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightError(f"{p} is truncated: {size} bytes, too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
            raise WeightError(
                f"{p} is truncated or corrupt: header of {header_len} bytes in a {size}-byte file"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightError(f"{p} has a corrupt safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise WeightError(f"{p} has a corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    data_len = size - data_start

    specs: list[tuple[str, np.dtype, tuple[int, ...], int, int]] = []
    for name, info in header.items():
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise WeightError(f"{p}: bad header entry for tensor {name!r}: {info!r}") from e
        if end > data_len:
            raise WeightError(
                f"{p} is truncated: tensor {name!r} ends at byte {end} of a {data_len}-byte data section"
            )
        if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
            raise WeightError(f"{p} is corrupt: tensor {name!r} has {end - begin} bytes for shape {shape}")
        specs.append((name, dtype, shape, begin, end))

    if not specs:
        return {}
    raw = np.memmap(p, dtype=np.uint8, mode="r", offset=data_start, shape=(data_len,)) if data_len else None
    out: dict[str, np.ndarray] = {}
    for name, dtype, shape, begin, end in specs:
        if raw is None or end == begin:
            out[name] = np.zeros(shape, dtype)
            continue
        # Copy out of the map: the result must not depend on the file staying unchanged.
        out[name] = np.array(raw[begin:end].view(dtype).reshape(shape))
    del raw
    return out


def _load_sharded(folder: Path) -> dict[str, np.ndarray]:
    """All shards an index names; each tensor must be where the index says."""
    index_path = folder / SAFETENSORS_INDEX
    try:
        index = json.loads(index_path.read_text())
        weight_map: dict[str, str] = index["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise WeightError(f"{index_path} is not a valid safetensors index: {e}") from e
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if not (folder / shard).is_file():
            raise WeightError(f"shard {folder / shard} named by {index_path} does not exist")
    tensors: dict[str, np.ndarray] = {}
    for shard in shards:
        part = read_safetensors(folder / shard)
        for name, arr in part.items():
            if name in tensors:
                raise WeightError(f"tensor {name!r} is in more than one shard (again in {folder / shard})")
            owner = weight_map.get(name)
            if owner is not None and owner != shard:
                raise WeightError(f"tensor {name!r} is in {folder / shard} but the index puts it in {owner}")
            tensors[name] = arr
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise WeightError(
            f"{index_path} names {len(missing)} tensor(s) missing from their shards, first {missing[0]!r} "
            f"(expected in {folder / weight_map[missing[0]]})"
        )
    return tensors


def load_hf_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """HF-named host tensors from a safetensors folder/file or a GGUF file (dequantized to float32)."""
    p = Path(path)
    fmt = detect_load_format(p)
    if fmt == "gguf":
        return load_gguf_tensors(p)
    if fmt == "orbax":
        raise WeightError(f"{p} is an Orbax checkpoint (a parameter tree, not HF tensors): use load_orbax")
    if p.is_file():
        return read_safetensors(p)
    if (p / SAFETENSORS_INDEX).exists():
        return _load_sharded(p)
    return read_safetensors(p / SAFETENSORS_FILE)


# --------------------------------------------------------------------------- GGUF


def _gguf_reader(path: Path):
    """A `gguf.GGUFReader` over the file, its failures reported as WeightError.

    Opening parses the whole vocabulary (seconds), and a conversion needs the config, the
    tokenizer and the tensors of one file: the last reader is kept while the file is unchanged.
    """
    st = path.stat()
    return _gguf_reader_cached(str(path.resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=1)
def _gguf_reader_cached(path: str, mtime_ns: int, size: int):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/struct.error/IndexError on bad files
        raise WeightError(f"{path} is not a readable GGUF file: {e}") from e


def _gguf_metadata(reader) -> dict[str, Any]:
    """The file's key/value metadata as plain Python values (strings decoded, arrays as lists)."""
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = field.contents()
    return meta


def _resolve_gguf(path: Path) -> Path:
    """A GGUF path given as the file or as the folder holding exactly one."""
    if path.is_dir():
        found = _gguf_in_dir(path)
        if found is None:
            raise WeightError(f"{path} holds no .gguf file")
        return found
    if not _is_gguf_file(path):
        raise WeightError(f"{path} is not a GGUF file")
    return path


# GGUF tensor name (after the block prefix) -> HF Llama name (after the layer prefix).
_LLAMA_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LLAMA_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# llama.cpp's llama3 rope table: read into the config (`gguf_config_dict`), not a weight.
_GGUF_ROPE_FACTORS = "rope_freqs.weight"
_GGUF_IGNORED = {_GGUF_ROPE_FACTORS}


def gguf_name_to_hf(name: str) -> str:
    """HF Llama name of a GGUF tensor (`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`)."""
    stem, _, suffix = name.rpartition(".")
    if stem in _LLAMA_TOP_NAMES:
        return f"{_LLAMA_TOP_NAMES[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LLAMA_LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LLAMA_LAYER_NAMES[parts[2]]}.{suffix}"
    raise WeightError(f"GGUF tensor {name!r} has no HF Llama counterpart")


def unpermute_qk_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation.

    llama.cpp's converter reorders each head's rows from HF's rotate-half layout (first half of
    the head dim, then second half) to interleaved pairs (0, d/2, 1, d/2+1, ...), for its rotary
    kernel. Per head, the stored rows are `[d/2, 2]` read row-major; swapping those two axes back
    gives `[2, d/2]`, the HF order. Applies to the bias as well as the weight (rows are axis 0).
    """
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise WeightError(f"cannot un-permute {rows} rows over {n_heads} heads")
    half = rows // n_heads // 2
    return np.ascontiguousarray(
        weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def _gguf_llama_arch(meta: Mapping[str, Any], path: Path) -> str:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise WeightError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")
    return arch


def load_gguf_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A Llama GGUF's tensors, dequantized to float32 with HF names and HF Q/K row order."""
    import gguf

    p = _resolve_gguf(Path(path))
    reader = _gguf_reader(p)
    meta = _gguf_metadata(reader)
    arch = _gguf_llama_arch(meta, p)
    n_heads = int(meta[f"{arch}.attention.head_count"])
    n_kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", n_heads))

    out: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        if t.name in _GGUF_IGNORED:
            continue
        hf_name = gguf_name_to_hf(t.name)
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise WeightError(f"{p}: tensor {t.name}: {e}") from e
        w = np.array(w, dtype=np.float32)  # own the memory; float32 whatever the storage
        if ".attn_q." in t.name:
            w = unpermute_qk_rows(w, n_heads)
        elif ".attn_k." in t.name:
            w = unpermute_qk_rows(w, n_kv_heads)
        out[hf_name] = w
    return out


def gguf_config_dict(path: str | os.PathLike) -> dict[str, Any]:
    """The HF `LlamaConfig` fields a Llama GGUF's metadata states (no torch, unlike transformers' route)."""
    p = _resolve_gguf(Path(path))
    reader = _gguf_reader(p)
    meta = _gguf_metadata(reader)
    arch = _gguf_llama_arch(meta, p)
    tensor_names = {t.name for t in reader.tensors}

    def key(name: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{name}", default)

    hidden = int(key("embedding_length"))
    n_heads = int(key("attention.head_count"))
    vocab = key("vocab_size")
    if vocab is None:
        vocab = len(meta["tokenizer.ggml.tokens"])
    head_dim = int(key("attention.key_length", hidden // n_heads))
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(key("attention.head_count_kv", n_heads)),
        "head_dim": head_dim,
        "max_position_embeddings": int(key("context_length", 2048)),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(key("rope.freq_base", 10000.0))},
        "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "dtype": "float32",
    }
    if key("rope.scaling.type") not in (None, "none"):
        raise WeightError(f"{p}: GGUF rope scaling {key('rope.scaling.type')!r} is not supported")
    if key("rope.dimension_count", head_dim) != head_dim:
        raise WeightError(f"{p}: partial rotary embeddings are not supported")
    factors = next((t for t in reader.tensors if t.name == _GGUF_ROPE_FACTORS), None)
    if factors is not None:
        cfg["rope_parameters"] = _gguf_llama3_rope(p, cfg["rope_parameters"]["rope_theta"], head_dim, factors)
    return cfg


def _gguf_llama3_rope(path: Path, theta: float, head_dim: int, tensor: Any) -> dict[str, Any]:
    """HF `rope_parameters` for llama.cpp's rope frequency table (how it stores llama3 scaling)."""
    import gguf

    from models.layers import RopeConfig  # models import this module: resolve at call time

    table = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
    try:
        rope = RopeConfig.from_freq_factors(theta, head_dim, table)
    except ValueError as e:
        raise WeightError(f"{path}: {e}") from e
    params = {"rope_type": rope.rope_type, "rope_theta": theta}
    if rope.rope_type == "llama3":
        params.update(
            factor=rope.factor,
            low_freq_factor=rope.low_freq_factor,
            high_freq_factor=rope.high_freq_factor,
            original_max_position_embeddings=rope.original_max_position_embeddings,
        )
    return params


def gguf_tokenizer(path: str | os.PathLike):
    """A fast HF tokenizer rebuilt from a GGUF's byte-level BPE vocabulary, merges and chat template.

    Built with `tokenizers` directly: transformers' own GGUF route imports torch. Control tokens
    become special added tokens, user-defined ones plain added tokens, as llama.cpp matches both
    whole. The pre-tokenizer follows `tokenizer.ggml.pre`: "smollm" splits digits one by one, as
    llama.cpp (and SmolLM's original tokenizer) do.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    p = _resolve_gguf(Path(path))
    meta = _gguf_metadata(_gguf_reader(p))
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise WeightError(
            f"{p}: tokenizer model {meta.get('tokenizer.ggml.model')!r} is not supported "
            "(only byte-level 'gpt2')"
        )
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]

    # Every regular token of a byte-level vocabulary is spelled in the 256-char byte alphabet;
    # respell any that is not (it would never match otherwise).
    alphabet = _bytes_to_unicode()
    letters = set(alphabet.values())
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        spelled = tok if set(tok) <= letters else "".join(alphabet[b] for b in tok.encode("utf-8"))
        vocab.setdefault(spelled, i)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre in _DIGIT_SPLIT_PRE:
        digits = pre_tokenizers.Digits(individual_digits=True)
        tk.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level])
    elif pre in _GGUF_PRE_SPLITS:
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_GGUF_PRE_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif pre in _GPT2_PRE:
        tk.pre_tokenizer = byte_level  # ByteLevel's own regex is GPT-2's
    else:
        # A wrong split silently changes token ids; refuse rather than guess.
        raise WeightError(f"{p}: GGUF pre-tokenizer {pre!r} is not supported")
    tk.decoder = decoders.ByteLevel()

    control = [t for t, ty in zip(tokens, types, strict=False) if ty == 3 and set(t) <= letters]
    user = [t for t, ty in zip(tokens, types, strict=False) if ty == 4]
    tk.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    if user:
        tk.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])

    def tok_of(field: str) -> str | None:
        idx = meta.get(f"tokenizer.ggml.{field}")
        return tokens[idx] if idx is not None and 0 <= idx < len(tokens) else None

    bos, eos = tok_of("bos_token_id"), tok_of("eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
        pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
        special = [(t, vocab[t]) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
        tk.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)

    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=bos,
        eos_token=eos,
        unk_token=tok_of("unknown_token_id"),
        pad_token=tok_of("padding_token_id"),
        chat_template=meta.get("tokenizer.chat_template"),
        model_max_length=int(meta.get(f"{meta['general.architecture']}.context_length", 2048)),
        clean_up_tokenization_spaces=False,
    )


# llama.cpp pre-tokenizer names (`tokenizer.ggml.pre`) by the split they stand for.
# Digits one by one, then GPT-2's regex (llama.cpp's STARCODER/SMOLLM/... group).
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
# GPT-2's regex alone.
_GPT2_PRE = {"default", "gpt-2", "gpt2", "mpt", "olmo", "jais"}
# One-expression splits (Llama 3's).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GGUF_PRE_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are spelled in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


def gguf_to_hf_folder(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write an ordinary HF folder (config.json, tokenizer, float32 model.safetensors) from a Llama GGUF.

    Written into a temporary sibling and renamed at the end, so a folder that exists is complete.
    A tied embedding is stored once (no `lm_head.weight`), as HF does.
    """
    from safetensors.numpy import save_file
    from transformers import LlamaConfig

    src = _resolve_gguf(Path(gguf_path))
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    cfg = LlamaConfig(**gguf_config_dict(src))
    cfg.save_pretrained(tmp)
    gguf_tokenizer(src).save_pretrained(tmp)
    tensors = load_gguf_tensors(src)
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, str(tmp / SAFETENSORS_FILE), metadata={"format": "pt"})
    os.chmod(tmp / SAFETENSORS_FILE, 0o644)  # save_file creates it private
    del tensors

    # Swap in the finished folder; a reader of the old one only ever sees a complete folder.
    old = out.with_name(out.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- config


def load_config(path: str | os.PathLike):
    """The transformers `PretrainedConfig` of a model path: HF folder, GGUF file, or Orbax checkpoint.

    For Orbax, `path` may be the checkpoint folder (config.json beside `params/`) or `params/` itself.
    """
    from transformers import AutoConfig, LlamaConfig

    p = Path(path)
    folder = p
    if not (p.is_dir() and (p / "config.json").exists()):  # a folder with a config needs no weights
        fmt = detect_load_format(p)
        if fmt == "gguf":
            return LlamaConfig(**gguf_config_dict(p))
        folder = p.parent if p.is_file() else p
        if fmt == "orbax" and not (folder / "config.json").exists() and _is_orbax_dir(folder):
            folder = folder.parent
    if not (folder / "config.json").exists():
        raise WeightError(f"no config.json in {folder}")
    try:
        return AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError and its own validation errors
        raise WeightError(f"cannot read {folder / 'config.json'}: {e}") from e


def copy_model_metadata(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> list[str]:
    """Copy config and tokenizer files from one model folder to another (e.g. beside an Orbax `params/`)."""
    src, dst = Path(src_dir), Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in MODEL_METADATA_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


# --------------------------------------------------------------------------- Orbax


def orbax_params_dir(path: str | os.PathLike) -> Path:
    """The Orbax tree folder of a checkpoint given as `<dir>` (with `params/`) or as `params/` itself."""
    p = Path(path).absolute()
    if _is_orbax_dir(p / ORBAX_PARAMS_DIR):
        return p / ORBAX_PARAMS_DIR
    if _is_orbax_dir(p):
        return p
    raise WeightError(f"{p} is not an Orbax checkpoint (no Orbax metadata in it or in {ORBAX_PARAMS_DIR}/)")


def save_orbax(params: Any, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Save a pytree of arrays with Orbax, synchronously, at exactly `path` (absolute-ised).

    For a servable checkpoint pass `<dir>/params` and put config/tokenizer files in `<dir>`
    (see `copy_model_metadata`).
    """
    import orbax.checkpoint as ocp

    p = Path(path).absolute()
    if p.exists():
        if not overwrite:
            raise WeightError(f"{p} already exists; pass overwrite=True to replace it")
        shutil.rmtree(p)
    p.parent.mkdir(parents=True, exist_ok=True)
    ckptr = ocp.PyTreeCheckpointer()
    ckptr.save(p, params)
    return p


def load_orbax(path: str | os.PathLike, like: Any = None) -> Any:
    """Restore an Orbax pytree as host numpy arrays (the caller places and shards them).

    Orbax stores every dict key as a string, so `{0: ...}` (how `nnx.to_pure_dict` spells a layer
    list) comes back as `{"0": ...}`. Pass `like`, the expected tree (arrays or shape/dtype
    structs), to get its key types back and have the result checked against it
    (`check_params_match`).
    """
    import jax
    import orbax.checkpoint as ocp

    p = orbax_params_dir(path)
    ckptr = ocp.PyTreeCheckpointer()
    try:
        meta = ckptr.metadata(p)
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        restored = ckptr.restore(p, restore_args=restore_args)
    except Exception as e:  # orbax/tensorstore raise a variety of types for damaged checkpoints
        raise WeightError(f"cannot restore Orbax checkpoint {p}: {e}") from e
    if like is None:
        return restored
    restored = _rekey_like(restored, like)
    check_params_match(like, restored)
    return restored


def _rekey_like(tree: Any, like: Any) -> Any:
    """`tree` with each dict key replaced by the key of `like` it spells (int 0 for "0")."""
    if not isinstance(tree, Mapping) or not isinstance(like, Mapping):
        return tree
    spelled = {str(k): k for k in like}
    out = {}
    for k, v in tree.items():
        key = k if k in like else spelled.get(str(k), k)
        out[key] = _rekey_like(v, like[key]) if key in like else v
    return out


# --------------------------------------------------------------------------- tree checks


def _flatten(tree: Any, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """(path, leaf) pairs of a tree of mappings / lists / tuples; anything else is a leaf."""
    if isinstance(tree, Mapping):
        for k in tree:
            yield from _flatten(tree[k], (*prefix, k))
    elif isinstance(tree, list | tuple):
        for i, v in enumerate(tree):
            yield from _flatten(v, (*prefix, i))
    else:
        yield prefix, tree


def _path_str(path: tuple) -> str:
    return ".".join(str(k) for k in path) or "<root>"


def _more(n: int) -> str:
    return f" (and {n - 1} more)" if n > 1 else ""


def check_params_match(expected: Any, got: Any) -> None:
    """Raise WeightError naming the first missing, unexpected, mis-shaped or wrong-dtype leaf.

    `expected` leaves need only `.shape` and `.dtype` (jax.ShapeDtypeStruct, arrays); `got` leaves
    are arrays. Both are pure trees (nested dicts, as `nnx.to_pure_dict` gives).
    """
    exp = dict(_flatten(expected))
    have = dict(_flatten(got))
    missing = [k for k in exp if k not in have]
    if missing:
        raise WeightError(f"missing parameter {_path_str(missing[0])!r}{_more(len(missing))}")
    extra = [k for k in have if k not in exp]
    if extra:
        raise WeightError(f"unexpected parameter {_path_str(extra[0])!r}{_more(len(extra))}")
    for k, e in exp.items():
        g = have[k]
        g_shape, e_shape = tuple(np.shape(g)), tuple(e.shape)
        if g_shape != e_shape:
            raise WeightError(f"parameter {_path_str(k)!r} has shape {g_shape}, expected {e_shape}")
    for k, e in exp.items():
        g = have[k]
        g_dtype = np.dtype(g.dtype if hasattr(g, "dtype") else np.asarray(g).dtype)
        if g_dtype != np.dtype(e.dtype):
            raise WeightError(f"parameter {_path_str(k)!r} has dtype {g_dtype}, expected {np.dtype(e.dtype)}")
