"""Tool calls in a model's own format (server/tool_parsers.py): what each parser reads out of an
answer, what it leaves as text, and where a stream holds its text back."""

from __future__ import annotations

import pytest

from runtime.server_args import TOOL_CALL_PARSERS
from server.tool_parsers import PARSERS, Llama3Parser, Qwen25Parser


def test_every_flag_value_has_a_parser() -> None:
    assert tuple(PARSERS) == TOOL_CALL_PARSERS


def test_qwen25_reads_each_block_after_the_text() -> None:
    parser = Qwen25Parser()
    text = (
        "Let me look.\n<tool_call>\n"
        '{"name": "weather", "arguments": {"city": "Paris", "note": "a \\"quoted\\" </tool_call>"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "clock", "arguments": {}}\n</tool_call>'
    )
    assert parser.parse(text) == (
        "Let me look.",
        [("weather", {"city": "Paris", "note": 'a "quoted" </tool_call>'}), ("clock", {})],
    )
    assert parser.parse("No tools needed.") is None
    assert parser.parse('<tool_call>\n{"name": "weather", "argu') is None  # cut short: text
    assert parser.parse('<tool_call>\n{"arguments": {}}\n</tool_call>') is None  # no name


def test_qwen25_takes_parameters_where_a_model_writes_them_for_arguments() -> None:
    text = '<tool_call>\n{"name": "weather", "parameters": {"city": "Paris"}}\n</tool_call>'
    assert Qwen25Parser().parse(text) == ("", [("weather", {"city": "Paris"})])


def test_calls_of_tools_not_offered_are_dropped() -> None:
    """A client looks its handlers up by name: a call of a tool the request did not offer is
    dropped (logged), and an answer left with no call is text, as one with a malformed call is."""
    parser = Qwen25Parser({"weather"})
    block = '<tool_call>\n{{"name": "{}", "arguments": {{}}}}\n</tool_call>'
    both = "Hm.\n" + block.format("launch_rocket") + block.format("weather")
    assert parser.parse_offered(both) == ("Hm.", [("weather", {})])
    assert parser.parse_offered(block.format("launch_rocket")) is None
    assert parser.parse_offered("No tools needed.") is None


@pytest.mark.parametrize(
    ("text", "held"),
    [("Sure", 4), ("Sure.\n<tool", 6), ("Sure.\n<tool_call>\n{", 6), ("a <b", 4), ("", 0), ("<", 0)],
)
def test_qwen25_holds_back_from_where_a_call_may_begin(text: str, held: int) -> None:
    assert Qwen25Parser().hold_from(text) == held


def test_llama3_reads_json_calls_separated_by_semicolons() -> None:
    parser = Llama3Parser()
    calls = (
        '{"name": "weather", "parameters": {"city": "a;b"}}; {"name": "clock", "arguments": {"tz": "UTC"}}'
    )
    assert parser.parse(calls) == ("", [("weather", {"city": "a;b"}), ("clock", {"tz": "UTC"})])
    assert parser.parse("<|python_tag|>" + calls)[1][0][0] == "weather"
    assert parser.parse("The weather is fine.") is None
    assert parser.parse('{"name": "weather", "parameters": {') is None
    assert parser.parse('{"weather": 1}') is None


@pytest.mark.parametrize(
    ("text", "held"),
    [("", 0), ("  ", 0), ('{"na', 0), ("<|python", 0), ("<|python_tag|>{", 0), ("It is", 5)],
)
def test_llama3_holds_an_answer_that_may_be_a_call(text: str, held: int) -> None:
    assert Llama3Parser().hold_from(text) == held
