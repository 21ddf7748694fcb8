"""Where models, caches and profiler traces live on disk.

One place decides it so that `make`, the scripts, the server and the tests agree:
`$SGLAX_CACHE` when set, else `<repo>/.cache` (git-ignored).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDING_MODEL_NAME = "all-MiniLM-L6-v2"


def cache_dir() -> Path:
    """The root of everything fetched or compiled: `$SGLAX_CACHE`, else `<repo>/.cache`."""
    env = os.environ.get("SGLAX_CACHE")
    return Path(env).expanduser().resolve() if env else REPO_ROOT / ".cache"


def models_dir() -> Path:
    """Folder holding one sub-folder per model (HF layout), plus `gguf/` for the source files."""
    return cache_dir() / "models"


def default_model_path() -> Path:
    """The HF folder of the default chat model (SmolLM2-135M-Instruct, written by fetch_models)."""
    return models_dir() / DEFAULT_MODEL_NAME


def embedding_model_path() -> Path:
    """The sentence-transformers folder of all-MiniLM-L6-v2 (written by fetch_models)."""
    return models_dir() / EMBEDDING_MODEL_NAME


def compile_cache_dir() -> Path:
    """JAX's persistent compilation cache: beside the models, so a fresh checkout compiles once."""
    return cache_dir() / "jax_compile"


def path_exists(path: str | os.PathLike) -> bool:
    """Whether `path` names something on disk; False for a name the OS refuses (too long, say)."""
    try:
        return Path(path).exists()
    except OSError:
        return False


# How /stop_profile's refusal begins when nothing traces (`--dp-size` tells it from real failures).
NOT_PROFILING = "Profiling is not in progress."


def default_profile_dir() -> str:
    """Where /start_profile writes without an `output_dir`: `$SGLAX_PROFILE_DIR`, else
    `<tmp>/sglax_profile`."""
    return os.environ.get("SGLAX_PROFILE_DIR") or str(Path(tempfile.gettempdir()) / "sglax_profile")
