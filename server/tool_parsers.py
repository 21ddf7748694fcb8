"""Tool calls a model writes in its own format (`--tool-call-parser`), read out of its answer.

With `tool_choice` auto a model decides itself whether to call a tool, and writes the call the way
its chat template taught it. These parsers find those calls in the answer's text and return them
as `(name, arguments)` pairs, with the text before them; `server/app.py` turns the pairs into
OpenAI's `tool_calls`. A stream holds its text back from where a call may begin (`hold_from`), so
no part of a call goes out as content.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection
from typing import Any

from runtime.detokenizer import partial_stop_suffix

Calls = list[tuple[str, Any]]
logger = logging.getLogger(__name__)


class _ToolCallParser:
    """`offered`: the names of the request's tools (`parse_offered` drops calls of others)."""

    def __init__(self, offered: Collection[str] = ()) -> None:
        self.offered = offered

    def parse(self, text: str) -> tuple[str, Calls] | None:
        raise NotImplementedError

    def parse_offered(self, text: str) -> tuple[str, Calls] | None:
        """`parse`'s result less the calls of tools the request did not offer (logged and dropped,
        as the reference does: a client looks its handlers up by name). An answer left with no
        call is returned as text (None), as one with a malformed call is."""
        parsed = self.parse(text)
        if parsed is None:
            return None
        content, calls = parsed
        kept = [(name, arguments) for name, arguments in calls if name in self.offered]
        for name in {name for name, _ in calls} - set(self.offered):
            logger.warning("The model called %r, which is not among the request's tools: dropped", name)
        return (content, kept) if kept else None


class Qwen25Parser(_ToolCallParser):
    """Qwen2.5 (and Hermes-style templates): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`,
    one block per call, after any text."""

    START, END = "<tool_call>", "</tool_call>"

    def hold_from(self, text: str) -> int:
        """Where a call may begin: the first `<tool_call>`, or a tail that could still become one."""
        found = text.find(self.START)
        return found if found >= 0 else len(text) - partial_stop_suffix(text, (self.START,))

    def parse(self, text: str) -> tuple[str, Calls] | None:
        """The text before the calls and the calls, or None when the answer holds no complete,
        well-formed call (it is then returned as text). Each block's JSON is decoded as JSON, so a
        `</tool_call>` inside one of its strings does not end it."""
        start = text.find(self.START)
        if start < 0:
            return None
        calls, pos = [], start
        while (begin := text.find(self.START, pos)) >= 0:
            try:
                call, end = _DECODER.raw_decode(text, _skip_blank(text, begin + len(self.START)))
            except (ValueError, RecursionError):  # not JSON, or nested past the interpreter's stack
                return None
            end = _skip_blank(text, end)
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                return None
            if not text.startswith(self.END, end):
                return None
            # "parameters" as Llama's format names them: some Qwen-template models write that
            calls.append((call["name"], call.get("arguments", call.get("parameters", {}))))
            pos = end + len(self.END)
        return text[:start].strip(), calls


class Llama3Parser(_ToolCallParser):
    """Llama 3.1 / 3.2 JSON calls: the whole answer is `{"name": ..., "parameters": {...}}`, several
    separated by `;`, after an optional `<|python_tag|>` (a special token, so usually not in the
    text)."""

    TAG = "<|python_tag|>"

    def hold_from(self, text: str) -> int:
        """An answer that is (or may still become) a call is held whole: it starts with `{` or the
        tag, or is only blank so far."""
        head = text.lstrip()
        if not head or head.startswith(("{", self.TAG)) or self.TAG.startswith(head):
            return 0
        return len(text)

    def parse(self, text: str) -> tuple[str, Calls] | None:
        body = text.strip().removeprefix(self.TAG).strip()
        if not body.startswith("{"):
            return None
        calls = []
        for part in _split_top_level(body, ";"):
            call = _json_object(part)
            if call is None or not isinstance(call.get("name"), str):
                return None
            calls.append((call["name"], call.get("parameters", call.get("arguments", {}))))
        return "", calls


PARSERS = {"qwen25": Qwen25Parser, "llama3": Llama3Parser}


_DECODER = json.JSONDecoder()


def _skip_blank(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _split_top_level(text: str, separator: str) -> list[str]:
    """`text` split at `separator`s outside JSON strings and brackets."""
    parts, depth, in_string, escaped, begin = [], 0, False, False, 0
    for i, char in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
            continue
        if char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
        elif char == separator and depth == 0:
            parts.append(text[begin:i])
            begin = i + 1
    parts.append(text[begin:])
    return [part.strip() for part in parts if part.strip()]
