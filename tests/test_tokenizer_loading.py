"""Loading the server's tokenizer (runtime/tokenizer.py): from a folder or a GGUF file, and the
launch-time refusals of a path that is not there, a folder without a tokenizer and a chat
template that cannot render."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from runtime import paths
from runtime.server_args import ServerArgs
from runtime.tokenizer import load_tokenizer
from tests.test_weights import GGUF_NAME

TEXTS = ["Hello world", "The capital of France is", "1234 + 5678 = 6912", "  spaced\tout\n"]


def test_a_gguf_file_serves_its_own_tokenizer(smollm2_path: Path) -> None:
    """`--model-path x.gguf` alone: the tokenizer is rebuilt from the file, and encodes as the
    HF folder's does."""
    gguf = paths.models_dir() / "gguf" / GGUF_NAME
    if not gguf.is_file():
        pytest.skip(f"{gguf} missing: run scripts/fetch_models.py (make models)")
    from_file = load_tokenizer(ServerArgs(model_path=str(gguf)))
    from_folder = load_tokenizer(ServerArgs(model_path=str(smollm2_path)))
    assert [from_file.encode(t) for t in TEXTS] == [from_folder.encode(t) for t in TEXTS]


def test_a_path_that_is_not_there_is_refused_at_once() -> None:
    """Never the model hub: a repo-id-shaped path would retry it for about a minute."""
    for missing in ("/nonexistent/model", "Qwen/Qwen2-0.5B"):
        started = time.monotonic()
        with pytest.raises(ValueError, match="does not exist"):
            load_tokenizer(ServerArgs(model_path=missing))
        assert time.monotonic() - started < 5


def test_a_folder_without_a_tokenizer_says_so(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ValueError, match=f"no tokenizer in {tmp_path}"):
        load_tokenizer(ServerArgs(model_path=str(tmp_path)))


def test_a_chat_template_that_cannot_render_is_refused_at_launch(tiny_llama_path: Path) -> None:
    """Rather than a 400 blaming every chat request's client."""
    for broken in ("{{ broken", "{% for m in messages %}{{ m.content }"):
        with pytest.raises(ValueError, match="--chat-template cannot render a one-message chat"):
            load_tokenizer(ServerArgs(model_path=str(tiny_llama_path), chat_template=broken))
    good = "{% for m in messages %}{{ m.content }}{% endfor %}"
    tokenizer = load_tokenizer(ServerArgs(model_path=str(tiny_llama_path), chat_template=good))
    assert tokenizer.chat_template == good
