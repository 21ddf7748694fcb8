"""Convert a checkpoint (HF safetensors folder or GGUF) into an Orbax checkpoint of our parameters.

The output folder holds `params/` (the model's parameter tree, as `nnx.state`
spells it, written by `runtime.weights.save_orbax`) with `config.json`, the
tokenizer files and any sentence-transformers pooling config beside it, so it
is itself a valid `--model-path`. Loading it skips the HF-name mapping and,
with `--dtype`, the cast.

    python scripts/convert_checkpoint.py --model-path HF_DIR --output DIR [--dtype bfloat16] [--overwrite]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # run as a plain script

import jax  # noqa: E402
import numpy as np  # noqa: E402

from models.loader import (  # noqa: E402
    DTYPES,
    abstract_model,
    checkpoint_dtype,
    param_shapes,
    read_params,
    resolve_dtype,
)
from models.registry import architecture_of, get_model_class  # noqa: E402
from runtime.weights import (  # noqa: E402
    ORBAX_PARAMS_DIR,
    WeightError,
    copy_model_metadata,
    detect_load_format,
    gguf_tokenizer,
    load_config,
    save_orbax,
)

# sentence-transformers files that configure pooling (module folders are copied as modules.json lists them).
SENTENCE_TRANSFORMERS_FILES = (
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
)


def _copy_sentence_transformers(src: Path, out: Path) -> None:
    """modules.json, its siblings, and every module folder it names (e.g. `1_Pooling/`)."""
    for name in SENTENCE_TRANSFORMERS_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    if not (src / "modules.json").is_file():
        return
    for module in json.loads((src / "modules.json").read_text()):
        path = module.get("path", "")
        if path and (src / path).is_dir():
            shutil.copytree(src / path, out / path, dirs_exist_ok=True)


def _spellings(out: Path, source: Path) -> list[tuple[Path, Path]]:
    """The output and the source written out absolute, then with links resolved: a source
    reached through a link inside the output holds the output only as written."""
    return [(out.absolute(), source.absolute()), (out.resolve(), source.resolve())]


def convert(model_path: str, output: str, dtype: str = "auto", overwrite: bool = False) -> Path:
    """Write `output/params` (Orbax) plus config and tokenizer files; returns the output folder.

    `dtype` "auto" keeps the checkpoint's own dtype; otherwise the parameters are stored cast,
    and config.json says so (so that "auto" serves them as stored).
    """
    source = Path(model_path)
    out = Path(output)
    if any(o == src or o in src.parents for o, src in _spellings(out, source)):
        # --overwrite empties the output first: that would delete the source before it is read
        raise WeightError(f"the output {out} holds the source {source}; write the checkpoint elsewhere")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise WeightError(f"{out} exists and is not empty; pass --overwrite to replace it")
    config = load_config(source)
    cls = get_model_class(architecture_of(config))
    target = checkpoint_dtype(config) if dtype == "auto" else resolve_dtype(dtype, config, "any")
    expected = param_shapes(abstract_model(cls, config, target))
    params = read_params(cls, config, expected, source, "auto")
    if out.exists() and overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True)
    save_orbax(jax.tree.map(np.asarray, params), out / ORBAX_PARAMS_DIR)

    if detect_load_format(source) == "gguf":
        config.save_pretrained(out)
        gguf_tokenizer(source).save_pretrained(out)
    else:
        folder = source if source.is_dir() else source.parent
        copy_model_metadata(folder, out)
        _copy_sentence_transformers(folder, out)
    if dtype != "auto":
        config_file = out / "config.json"
        stored = json.loads(config_file.read_text())
        stored.pop("torch_dtype", None)
        stored["dtype"] = np.dtype(target).name
        config_file.write_text(json.dumps(stored, indent=2, sort_keys=True) + "\n")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-path", required=True, help="HF folder (safetensors, sharded) or GGUF file")
    parser.add_argument("--output", required=True, help="folder to write (params/ + config + tokenizer)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="stored parameter dtype")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)
    try:
        out = convert(args.model_path, args.output, args.dtype, args.overwrite)
    except (WeightError, ValueError) as e:
        print(f"convert_checkpoint: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
