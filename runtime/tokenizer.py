"""The server's tokenizer: loading it (with --chat-template) and encoding prompts.

Kept apart from the engine because the HTTP process loads its own copy: it
tokenizes, renders chat templates and decodes logprob texts without the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runtime.server_args import ServerArgs


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
    """The HF tokenizer (with --chat-template applied), or None with --skip-tokenizer-init."""
    if server_args.skip_tokenizer_init:
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(server_args.tokenizer_path)
    if server_args.chat_template:
        tokenizer.chat_template = chat_template_text(server_args.chat_template)
    return tokenizer


def tokenize(tokenizer: Any, text: str) -> list[int]:
    """A prompt's ids, special tokens added as the model expects."""
    if tokenizer is None:
        raise ValueError(
            "The server was launched with --skip-tokenizer-init: send input_ids instead of text."
        )
    return list(tokenizer.encode(text, add_special_tokens=True))
