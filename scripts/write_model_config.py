"""Write a config-only model folder of a published shape, for benchmarks with random weights.

No model hub is reachable from the machines here, so a GPU benchmark of a
Qwen2.5-0.5B-shaped model (issue 9) starts from its shape alone: this script
writes `config.json` (the published Qwen2.5-0.5B values) and the server fills the
weights with random values of the right shapes:

    python scripts/write_model_config.py --out /tmp/qwen2.5-0.5b-shape
    python -m server.launch_server --model-path /tmp/qwen2.5-0.5b-shape \\
        --load-format dummy --skip-tokenizer-init --dtype bfloat16

`--set KEY=VALUE` overrides a field (JSON values: `--set num_hidden_layers=2`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

# Qwen/Qwen2.5-0.5B's config.json (Qwen2ForCausalLM, 494M parameters, tied embeddings).
PRESETS: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-06,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "sliding_window": 32768,
        "max_window_layers": 24,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "torch_dtype": "bfloat16",
    },
}


def parse_override(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` with VALUE read as JSON (a bare word stays a string)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def write_config(preset: str, out: Path, overrides: dict[str, Any]) -> Path:
    """Write `out/config.json` for `preset` with `overrides` applied; returns its path."""
    config = {**PRESETS[preset], **overrides}
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.json"
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="qwen2.5-0.5b")
    parser.add_argument("--out", type=Path, required=True, help="Folder to write config.json into.")
    parser.add_argument("--set", type=parse_override, action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    print(write_config(args.preset, args.out, dict(args.set)))


if __name__ == "__main__":
    main()
