"""Incremental detokenization and stop strings, on the host, per request.

Decoding a request's whole output at every step costs O(length) per token;
`IncrementalDetokenizer` decodes only a short window of recent tokens (the
prefix / read offsets of vLLM and SGLang), so a step costs O(new tokens). A
token can end in the middle of a multi-byte character (byte-level BPE splits
emoji and CJK across tokens): the window then decodes to a trailing U+FFFD, and
that tail is held back until the character completes, so no streamed delta ever
shows a replacement character that later turns into text.

Stop strings are searched in the finalised output text. `find_stop_string`
only looks at matches that end in the newly added text, and
`partial_stop_suffix` says how much of the tail could still grow into a stop
string, so a stream never shows text that a later stop match would trim.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from runtime.sampling_params import SamplingParams

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns one request's output token ids into text, a few tokens at a time.

    `context_ids` (e.g. the prompt's last few tokens) seed the window so the first
    output tokens decode as they would after the prompt (SentencePiece drops the
    leading space of a text's first word); their text is never part of `text`.
    """

    def __init__(
        self,
        tokenizer: Any,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        context_ids: Sequence[int] = (),
    ) -> None:
        self._tokenizer = tokenizer
        self._decode_kwargs = {
            "skip_special_tokens": skip_special_tokens,
            "spaces_between_special_tokens": spaces_between_special_tokens,
        }
        self._ids: list[int] = list(context_ids)
        # ids[prefix_offset:read_offset] decode to text already emitted (the window's context);
        # ids[read_offset:] are the tokens whose text is not fully emitted yet.
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        self._emitted_past_read = 0  # chars after prefix_text already emitted (held-back tails)
        self._chunks: list[str] = []
        self._joined = ""
        self._joined_chunks = 0
        self._num_context = len(self._ids)

    def _decode(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        return self._tokenizer.decode(list(ids), **self._decode_kwargs)

    def add(self, new_ids: Sequence[int]) -> str:
        """Append tokens; return the text they finalise (possibly empty, never a partial character)."""
        self._ids.extend(int(i) for i in new_ids)
        tail = self._decode(self._ids[self._prefix_offset :])[len(self._prefix_text) :]
        stable = tail.rstrip(REPLACEMENT_CHAR)
        if len(stable) < len(tail):
            # A character is still incomplete: emit what precedes it, keep the window.
            delta = stable[self._emitted_past_read :]
            self._emitted_past_read = max(self._emitted_past_read, len(stable))
        else:
            delta = tail[self._emitted_past_read :]
            self._advance()
        return self._emit(delta)

    def flush(self) -> str:
        """At finish: whatever is still held back (an unfinished character decodes to U+FFFD)."""
        tail = self._decode(self._ids[self._prefix_offset :])[len(self._prefix_text) :]
        delta = tail[self._emitted_past_read :]
        # Later tokens (if any) start a fresh window: the old one may end in a broken character.
        self._prefix_offset = self._read_offset = len(self._ids)
        self._prefix_text = ""
        self._emitted_past_read = 0
        return self._emit(delta)

    def _advance(self) -> None:
        """Everything up to the last token is emitted: the window restarts at the read offset."""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        self._emitted_past_read = 0

    def _emit(self, delta: str) -> str:
        if delta:
            self._chunks.append(delta)
        return delta

    @property
    def text(self) -> str:
        """All finalised output text so far (joined lazily: O(new text) per call)."""
        if self._joined_chunks < len(self._chunks):
            self._joined += "".join(self._chunks[self._joined_chunks :])
            self._joined_chunks = len(self._chunks)
        return self._joined

    @property
    def output_ids(self) -> list[int]:
        """The output token ids added so far (without the context)."""
        return self._ids[self._num_context :]


def scheduler_needs_text(params: SamplingParams) -> bool:
    """Whether the scheduler must detokenize a request itself: stop strings are matched in the
    text. A server's HTTP process detokenizes every other request (`Engine.submit(detokenize=
    False)`), as the reference's detokenizer process does, off the scheduler's thread: at batch 64
    with SmolLM2's tokenizer that was 0.7-1.5 ms of the scheduler thread's CPU a step on the
    2-core box (docs/benchmarks.md)."""
    return bool(params.stop)


class OutputText:
    """One request's output text as its ids arrive, and at its end the rule for a matched stop
    token (left out of the text unless no_stop_trim; the id stays in output_ids). The scheduler
    and the HTTP process both use it, so their texts are the same."""

    def __init__(self, tokenizer: Any, params: SamplingParams) -> None:
        self._tokenizer = tokenizer
        self._params = params
        self._detokenizer: IncrementalDetokenizer | None = None
        self._added = 0  # output ids detokenized so far

    def add(self, output_ids: Sequence[int]) -> str:
        """The text that the ids past those added before finalise (`output_ids` is cumulative)."""
        new = output_ids[self._added :]
        if not new:
            return ""
        if self._detokenizer is None:
            self._detokenizer = IncrementalDetokenizer(
                self._tokenizer,
                skip_special_tokens=self._params.skip_special_tokens,
                spaces_between_special_tokens=self._params.spaces_between_special_tokens,
            )
        self._added = len(output_ids)
        return self._detokenizer.add(new)

    def final(self, output_ids: Sequence[int], finish_reason: dict | None) -> str:
        """The text still to come once the request ended: what `add` had not given yet, less a
        matched stop token's, plus a held-back tail. With nothing added before, the whole output
        decoded at once (a request that did not stream)."""
        matched = finish_reason.get("matched") if finish_reason else None
        keep_last = not isinstance(matched, int) or self._params.no_stop_trim
        ids = list(output_ids if keep_last else output_ids[:-1])
        if self._detokenizer is None:
            return self._tokenizer.decode(
                ids,
                skip_special_tokens=self._params.skip_special_tokens,
                spaces_between_special_tokens=self._params.spaces_between_special_tokens,
            )
        return self.add(ids) + self._detokenizer.flush()


class StreamedText:
    """The HTTP process's text of a request the engine leaves to it (`scheduler_needs_text`).

    It is fed the ids each output brings: one at a time, or `--stream-interval` of them, where
    the in-process engine feeds one at a time. The incremental decode gives the same text for
    any grouping where decoding a window of ids is decoding its tokens one after another (the
    tests check SmolLM2's byte-level BPE); a request that did not stream is decoded whole on
    either side."""

    def __init__(self, tokenizer: Any, params: SamplingParams) -> None:
        self._output_text = OutputText(tokenizer, params)
        self._text = ""

    def text_of(self, output_ids: Sequence[int], finished: bool, finish_reason: dict | None) -> str:
        """The text of an output of the request (cumulative ids), its outputs taken in order."""
        if finished:
            return self._text + self._output_text.final(output_ids, finish_reason)
        self._text += self._output_text.add(output_ids)
        return self._text


def find_stop_string(text: str, stops: Sequence[str], search_from: int = 0) -> tuple[int, str] | None:
    """The first stop string to complete in `text`: (its start, the stop), or None.

    Only matches ending after `search_from` count (earlier text was searched by
    earlier calls), so pass the text's length before the newest delta. "First"
    means the match that ends earliest (ties: the one that starts earliest): that
    is where a character-by-character stream would have stopped, so the result
    does not depend on how tokens grouped the characters. Callers keep
    `text[:start]`, or `text[:start + len(stop)]` with no_stop_trim.
    """
    best: tuple[int, int, str] | None = None
    for stop in stops:
        if not stop:
            continue
        start = text.find(stop, max(0, search_from - len(stop) + 1))
        if start < 0:
            continue
        end = start + len(stop)
        if best is None or (end, start) < best[:2]:
            best = (end, start, stop)
    if best is None:
        return None
    return best[1], best[2]


def trim_at_stop(text: str, match: tuple[int, str], no_stop_trim: bool = False) -> str:
    """The output text once `match` (from find_stop_string) ends the request."""
    start, stop = match
    return text[: start + len(stop)] if no_stop_trim else text[:start]


def partial_stop_suffix(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of `text` could be the start of a stop string.

    A stream shows `text[:len(text) - partial_stop_suffix(text, stops)]`: the held
    characters are released once they cannot begin a match any more.

    Candidates are the tail's places where the stop's first character occurs, earliest
    (longest) first, each compared in C: per stop, one `find` pass over its last
    len(stop) - 1 characters instead of a copy of every prefix of the stop.
    """
    longest = 0
    for stop in stops:
        start = text.find(stop[0], max(0, len(text) - len(stop) + 1)) if stop else -1
        while 0 <= start and len(text) - start > longest:
            if stop.startswith(text[start:]):
                longest = len(text) - start
                break
            start = text.find(stop[0], start + 1)
    return longest
