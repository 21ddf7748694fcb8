"""A reasoning model's thinking split from its answer (server/reasoning_parsers.py), whole and as a
stream sees it growing."""

from __future__ import annotations

import pytest

from runtime.server_args import REASONING_PARSERS
from server.reasoning_parsers import PARSERS, ReasoningParser, ThinkingSplit

ANSWER = "<think>\nThe capital of France.\n</think>\n\nParis."


def test_every_flag_value_has_a_parser() -> None:
    assert tuple(PARSERS) == REASONING_PARSERS


@pytest.mark.parametrize("starts_thinking", [True, False])
def test_the_thinking_and_the_answer(starts_thinking: bool) -> None:
    parser = ReasoningParser(starts_thinking)
    assert parser.split(ANSWER) == ThinkingSplit("The capital of France.", "Paris.")
    untagged = "The capital of France.\n</think>\n\nParis."
    want = (
        ThinkingSplit("The capital of France.", "Paris.") if starts_thinking else ThinkingSplit("", untagged)
    )
    assert parser.split(untagged) == want
    # Ended while thinking: all of it is thinking, if it was thinking at all.
    assert parser.split("<think>Still going") == ThinkingSplit("Still going", "")


def test_qwen3_without_the_tag_is_all_answer() -> None:
    assert ReasoningParser(PARSERS["qwen3"]).split("Paris.") == ThinkingSplit("", "Paris.")
    assert ReasoningParser(PARSERS["deepseek-r1"]).split("Paris.") == ThinkingSplit("Paris.", "")


@pytest.mark.parametrize("name", REASONING_PARSERS)
def test_a_stream_never_sends_what_it_must_take_back(name: str) -> None:
    """Split at every prefix, each part only grows, ends as the whole split, and never shows a
    piece of a tag."""
    parser = ReasoningParser(PARSERS[name])
    reasoning, content = "", ""
    for end in range(len(ANSWER) + 1):
        split = parser.split(ANSWER[:end], finished=False)
        assert split.reasoning.startswith(reasoning.strip()) or not reasoning.strip(), (end, split)
        assert split.content.startswith(content), (end, split)
        assert "<" not in split.reasoning and "<" not in split.content, (end, split)
        reasoning, content = split.reasoning, split.content
    whole = parser.split(ANSWER)
    assert (reasoning.strip(), content) == (whole.reasoning, whole.content)
