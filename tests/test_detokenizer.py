"""Incremental detokenization and stop strings with SmolLM2's real (byte-level BPE) tokenizer."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from runtime.detokenizer import (
    REPLACEMENT_CHAR,
    IncrementalDetokenizer,
    StreamedText,
    find_stop_string,
    partial_stop_suffix,
    trim_at_stop,
)
from runtime.sampling_params import SamplingParams

MIXED_TEXT = (
    "Hello 🙂 world! 日本語のテキストです。 café naïve façade — “quotes” 😀👍🏽 "
    "Ünïcödé ĉapitals, 한국어 문장, and emoji 🧑‍🚀 at the end 🎉"
)


@pytest.fixture(scope="module")
def tokenizer(smollm2_path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


class CountingTokenizer:
    """Wraps a tokenizer and records how many ids each decode call was given."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.lengths: list[int] = []

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        self.lengths.append(len(ids))
        return self.inner.decode(ids, **kwargs)


def test_token_by_token_equals_full_decode_without_replacement_chars(tokenizer: Any) -> None:
    ids = tokenizer.encode(MIXED_TEXT)
    assert any(REPLACEMENT_CHAR in tokenizer.decode([i]) for i in ids)  # the text splits characters
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add([i]) for i in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == tokenizer.decode(ids) == MIXED_TEXT
    assert detok.text == MIXED_TEXT
    assert not any(REPLACEMENT_CHAR in d for d in deltas)
    assert detok.output_ids == ids


@pytest.mark.parametrize("chunk", [2, 3, 7])
def test_chunks_of_tokens_equal_full_decode(tokenizer: Any, chunk: int) -> None:
    ids = tokenizer.encode(MIXED_TEXT * 2)
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    assert detok.flush() == ""
    assert "".join(deltas) == tokenizer.decode(ids)
    assert not any(REPLACEMENT_CHAR in d for d in deltas)


def test_cost_stays_in_a_short_window(tokenizer: Any) -> None:
    ids = tokenizer.encode(MIXED_TEXT * 20)
    counting = CountingTokenizer(tokenizer)
    detok = IncrementalDetokenizer(counting)
    for i in ids:
        detok.add([i])
    assert detok.text == tokenizer.decode(ids)
    assert len(ids) > 500 and max(counting.lengths) <= 8  # the longest character split is 4 tokens


def test_a_text_ending_mid_character_is_released_by_flush(tokenizer: Any) -> None:
    ids = tokenizer.encode("ok 😀")
    cut = ids[:-1]  # the emoji's bytes are incomplete
    detok = IncrementalDetokenizer(tokenizer)
    streamed = "".join(detok.add([i]) for i in cut)
    assert streamed == "ok " and REPLACEMENT_CHAR in tokenizer.decode(cut)
    assert streamed + detok.flush() == tokenizer.decode(cut)
    assert detok.text == tokenizer.decode(cut)


def test_text_before_a_split_character_is_not_held(tokenizer: Any) -> None:
    ids = tokenizer.encode("abc 😀")
    detok = IncrementalDetokenizer(tokenizer)
    head = [i for i in ids if REPLACEMENT_CHAR not in tokenizer.decode([i])]
    split = ids[len(head) :]
    assert len(split) >= 2 and head + split == ids
    assert "".join(detok.add([i]) for i in head) == "abc"
    assert detok.add(split[:1]) == " "  # the space before the emoji is final already
    assert "".join(detok.add([i]) for i in split[1:]) == "😀"


def test_context_ids_seed_the_window_but_not_the_text(tokenizer: Any) -> None:
    prompt = tokenizer.encode("The answer is")
    output = tokenizer.encode(" forty-two 🙂.")
    detok = IncrementalDetokenizer(tokenizer, context_ids=prompt[-5:])
    text = "".join(detok.add([i]) for i in output)
    assert text == " forty-two 🙂." == detok.text
    assert detok.output_ids == output


def test_skip_special_tokens(tokenizer: Any) -> None:
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = [*tokenizer.encode("Hi there"), end, *tokenizer.encode(" more")]
    skipping = IncrementalDetokenizer(tokenizer)
    keeping = IncrementalDetokenizer(tokenizer, skip_special_tokens=False)
    skipped = "".join(skipping.add([i]) for i in ids)
    kept = "".join(keeping.add([i]) for i in ids)
    assert skipped == tokenizer.decode(ids, skip_special_tokens=True) == "Hi there more"
    assert kept == tokenizer.decode(ids) == "Hi there<|im_end|> more"


# ----------------------------------------------------------------------------- stop strings


def test_find_stop_string_basics() -> None:
    assert find_stop_string("hello world", ["xyz"]) is None
    assert find_stop_string("hello world", ["wor", "lo"]) == (3, "lo")
    assert find_stop_string("hello world", []) is None
    # Matches wholly before search_from were seen by an earlier call.
    assert find_stop_string("ab ab", ["ab"], search_from=3) == (3, "ab")
    assert find_stop_string("ab cd", ["ab"], search_from=3) is None
    # A match spanning the boundary of the new text is found.
    assert find_stop_string("hello world", ["lo wo"], search_from=7) == (3, "lo wo")


def test_find_stop_string_takes_the_match_that_completes_first() -> None:
    # "xbc" starts earlier but "b" completes first: a char-by-char stream stops at "b".
    assert find_stop_string("axbc", ["xbc", "b"]) == (2, "b")
    # Same end: the longer (earlier-starting) stop wins.
    assert find_stop_string("axbc", ["bc", "xbc"]) == (1, "xbc")


def test_trim_at_stop() -> None:
    match = find_stop_string("The answer. Next", [". N"])
    assert match == (10, ". N")
    assert trim_at_stop("The answer. Next", match) == "The answer"
    assert trim_at_stop("The answer. Next", match, no_stop_trim=True) == "The answer. N"


def test_partial_stop_suffix() -> None:
    assert partial_stop_suffix("hello <|en", ["<|end|>"]) == 4
    assert partial_stop_suffix("hello <", ["<|end|>", "STOP"]) == 1
    assert partial_stop_suffix("hello", ["<|end|>"]) == 0
    assert partial_stop_suffix("ST", ["<|end|>", "STOP"]) == 2
    assert partial_stop_suffix("abc", ["abc"]) == 0  # a whole match is find_stop_string's job
    assert partial_stop_suffix("xx", []) == 0


def test_partial_stop_suffix_matches_every_prefix_tried() -> None:
    """Against the plain definition (the longest proper prefix of a stop that ends the text),
    on texts and stops over two letters, where partial matches overlap the most."""
    rng = random.Random(0)

    def by_definition(text: str, stops: list[str]) -> int:
        sizes = [n for stop in stops for n in range(1, min(len(stop) - 1, len(text)) + 1)]
        return max(
            (n for n in sizes for stop in stops if n < len(stop) and text.endswith(stop[:n])), default=0
        )

    for _ in range(3000):
        text = "".join(rng.choice("ab") for _ in range(rng.randint(0, 12)))
        stops = [
            "".join(rng.choice("ab") for _ in range(rng.randint(1, 8))) for _ in range(rng.randint(1, 3))
        ]
        assert partial_stop_suffix(text, stops) == by_definition(text, stops), (text, stops)


def _stream(
    tokenizer: Any, ids: list[int], stops: list[str], no_stop_trim: bool
) -> tuple[str, tuple[int, str] | None, list[str]]:
    """What a scheduler does per token: detokenize, look for a stop, show only safe text."""
    detok = IncrementalDetokenizer(tokenizer)
    shown: list[str] = []
    for i in ids:
        before = len(detok.text)
        detok.add([i])
        text = detok.text
        match = find_stop_string(text, stops, search_from=before)
        if match is not None:
            final = trim_at_stop(text, match, no_stop_trim)
            shown.append(final)
            return final, match, shown
        shown.append(text[: len(text) - partial_stop_suffix(text, stops)])
    return detok.text + detok.flush(), None, shown


@pytest.mark.parametrize("no_stop_trim", [False, True])
def test_stop_string_spanning_tokens_in_a_stream(tokenizer: Any, no_stop_trim: bool) -> None:
    text = "The capital of France is Paris. It is 日本語 not. END OF ANSWER and more text"
    ids = tokenizer.encode(text)
    stop = "END OF ANSWER"
    assert len(tokenizer.encode(stop)) >= 3  # the stop spans several tokens
    final, match, shown = _stream(tokenizer, ids, [stop, "never"], no_stop_trim)
    assert match is not None and match[1] == stop
    expected = text[: text.index(stop)] + (stop if no_stop_trim else "")
    assert final == expected
    # The stream only ever grows, and never shows text the stop later trims.
    for earlier, later in zip(shown, shown[1:], strict=False):
        assert later.startswith(earlier)
    assert all(expected.startswith(s) for s in shown)


def test_stop_string_inside_a_multibyte_run(tokenizer: Any) -> None:
    text = "値段は日本語で書きます。終わり。その後"
    ids = tokenizer.encode(text)
    final, match, shown = _stream(tokenizer, ids, ["終わり"], no_stop_trim=False)
    assert match == (text.index("終わり"), "終わり") and final == "値段は日本語で書きます。"
    assert not any(REPLACEMENT_CHAR in s for s in shown)


def test_without_a_stop_the_stream_is_the_whole_text(tokenizer: Any) -> None:
    text = "no stop string here 🙂 at all"
    final, match, shown = _stream(tokenizer, tokenizer.encode(text), ["STOP"], no_stop_trim=False)
    assert match is None and final == text and shown[-1] == text


@pytest.mark.parametrize("no_stop_trim", [False, True])
@pytest.mark.parametrize("streamed", [False, True])
def test_streamed_text_ends_as_the_whole_decode_less_a_matched_stop_token(
    tokenizer: Any, streamed: bool, no_stop_trim: bool
) -> None:
    """The HTTP process's text of a request (`StreamedText`): each output's text is a prefix of
    the next; at the end, the output decoded whole, less the EOS that ended it unless
    no_stop_trim (the id stays in output_ids); a length or abort end keeps every token."""
    eos = tokenizer.eos_token_id
    ids = tokenizer.encode(MIXED_TEXT)
    params = SamplingParams(no_stop_trim=no_stop_trim, skip_special_tokens=False)
    for reason, last in (({"type": "stop", "matched": eos}, eos), ({"type": "length", "length": 9}, ids[-1])):
        output_ids = [*ids, last] if last == eos else ids
        text, shown = StreamedText(tokenizer, params), ""
        if streamed:
            for n in range(1, len(output_ids)):  # the final output brings the last id
                now = text.text_of(output_ids[:n], False, None)
                assert now.startswith(shown) and REPLACEMENT_CHAR not in now
                shown = now
        final = text.text_of(output_ids, True, reason)
        kept = output_ids if (last != eos or no_stop_trim) else output_ids[:-1]
        assert final == tokenizer.decode(kept, skip_special_tokens=False)
        assert final.startswith(shown)
