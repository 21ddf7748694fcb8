"""A reasoning model's thinking, split from its answer (`--reasoning-parser`).

Reasoning models write their thinking between `<think>` and `</think>` before the answer. The
chat routes return the thinking as `reasoning_content` and the rest as `content`, as the
reference does. DeepSeek-R1's template opens the `<think>` in the prompt, so its output starts
inside the thinking (`deepseek-r1`); Qwen3 writes the tag itself, and without it (thinking turned
off) the whole output is the answer (`qwen3`).
"""

from __future__ import annotations

import dataclasses

from runtime.detokenizer import partial_stop_suffix

START, END = "<think>", "</think>"


@dataclasses.dataclass(frozen=True)
class ThinkingSplit:
    """An output split into its thinking and its answer, as far as it can be told yet."""

    reasoning: str
    content: str


class ReasoningParser:
    """`starts_thinking`: the output begins inside the thinking even without a `<think>` tag."""

    def __init__(self, starts_thinking: bool) -> None:
        self.starts_thinking = starts_thinking

    def split(self, text: str, finished: bool = True) -> ThinkingSplit:
        """The thinking and the answer of `text`. Unfinished, a tail that may still become a tag is
        left out of both, so what a stream has sent never needs taking back."""
        head = text.lstrip()
        if head.startswith(START):
            body = head[len(START) :]
        elif not finished and START.startswith(head):
            return ThinkingSplit("", "")  # may still open with the tag
        elif self.starts_thinking:
            body = text
        else:
            return ThinkingSplit("", text)
        end = body.find(END)
        if end >= 0:
            return ThinkingSplit(body[:end].strip(), body[end + len(END) :].lstrip())
        if finished:
            return ThinkingSplit(body.strip(), "")
        return ThinkingSplit(body[: len(body) - partial_stop_suffix(body, (END,))].lstrip(), "")


# Each parser by name: whether the model's output starts inside the thinking.
PARSERS = {"deepseek-r1": True, "qwen3": False}
