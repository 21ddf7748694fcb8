"""The server's tokenizer: loading it (with --chat-template) and encoding prompts.

Kept apart from the engine because the HTTP process loads its own copy: it
tokenizes, renders chat templates and decodes logprob texts without the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runtime.paths import path_exists
from runtime.server_args import ServerArgs
from runtime.weights import gguf_tokenizer


def chat_template_text(value: str) -> str:
    """`--chat-template`: a Jinja file, or the template itself. SGLang's named templates
    (`chatml`, `llama-2`, ...) are not available here: a name is refused rather than used as
    a template that would drop every message."""
    path = Path(value)
    if path.is_file():
        return path.read_text()
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(
        f"--chat-template {value!r} is neither a file nor a Jinja template; named templates are "
        "not available in this server: pass a .jinja file (or leave it out to use the tokenizer's)."
    )


def load_tokenizer(server_args: ServerArgs) -> Any:
    """The HF tokenizer (with --chat-template applied), or None with --skip-tokenizer-init.

    From a local folder, or rebuilt from a GGUF's vocabulary (the file, or a folder holding one
    and no tokenizer files). Never from the model hub: this server loads local models only, and a
    missing path would otherwise retry the hub for a minute before failing. A --chat-template
    that cannot render a one-message chat is refused here, at launch, rather than failing every
    chat request as the client's mistake."""
    if server_args.skip_tokenizer_init:
        return None
    from transformers import AutoTokenizer

    path = Path(server_args.tokenizer_path)
    if not path_exists(path):
        raise ValueError(
            f"tokenizer path {path} does not exist (pass --tokenizer-path or --skip-tokenizer-init)"
        )
    try:
        if path.is_file():
            tokenizer = gguf_tokenizer(path)
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        if not (path.is_dir() and any(path.glob("*.gguf"))):
            raise ValueError(f"no tokenizer in {path}: {_first_line(exc)}") from exc
        tokenizer = gguf_tokenizer(path)
    if server_args.chat_template:
        tokenizer.chat_template = chat_template_text(server_args.chat_template)
        try:
            tokenizer.apply_chat_template(
                [{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:
            raise ValueError(f"--chat-template cannot render a one-message chat: {_first_line(exc)}") from exc
    return tokenizer


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def tokenize(tokenizer: Any, text: str) -> list[int]:
    """A prompt's ids, special tokens added as the model expects."""
    if tokenizer is None:
        raise ValueError(
            "The server was launched with --skip-tokenizer-init: send input_ids instead of text."
        )
    return list(tokenizer.encode(text, add_special_tokens=True))
