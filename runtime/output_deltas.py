"""A request's outputs as what is new since its previous one, and the cumulative outputs again.

A `RequestOutput` is cumulative: every event holds all of `output_ids` and
`text` so far, and the per-token logprobs and hidden states when asked for.
Built that way on the scheduler thread, each streamed output copied every list
so far: O(tokens so far) per output, O(length^2) over a request, and at batch
64 and 1024 tokens deep pickling a step's outputs for the HTTP process took 0.5
ms and unpickling 1.2 ms (190 KB). So the scheduler cuts each output down to
the new entries of every list that only grows and the text's new tail
(`OutputDeltas`, one per request), and whoever wants cumulative outputs
rebuilds them (`OutputRebuilder`): the in-process `Engine.submit`, or the HTTP
process after the pipe (`DeltaDecoder`). The prompt's logprobs travel whole:
they are complete before the first token, and a retracted request recomputes
them.
"""

from __future__ import annotations

from collections.abc import Callable

from runtime.io_struct import RequestOutput

# The lists of an output that only ever grow while its request runs (one entry per new token).
GROWING_FIELDS = (
    "output_ids",
    "output_token_logprobs",
    "output_top_logprobs",
    "output_token_ids_logprobs",
    "hidden_states",
)

# (the output with only its new entries and text tail, how many entries of each growing list
# came before, how much of the text is kept)
OutputDelta = tuple[RequestOutput, tuple[int, ...], int]
NOTHING_SENT = (0,) * len(GROWING_FIELDS)
DeltaCallback = Callable[[OutputDelta], None]


def whole(output: RequestOutput) -> OutputDelta:
    """An output that stands alone (a request's first and only one, e.g. an error) as a delta."""
    return output, NOTHING_SENT, 0


class OutputDeltas:
    """Engine side, one per request: what its consumer already has."""

    __slots__ = ("_counts", "_text")

    def __init__(self) -> None:
        self._counts = NOTHING_SENT
        self._text = ""

    def cut(self, output: RequestOutput) -> OutputDelta:
        """Strip `output` down to what is new. Its growing lists may be the request's own, still
        growing: each is replaced by a new list of its new entries, so call this before another
        token is added."""
        counts = self._counts
        if output.output_token_logprobs is None and output.hidden_states is None:
            # The usual output, ids only (top and chosen-ids logprobs come with the logprobs):
            # the general loop below took about half of a step's output work at batch 64.
            ids = output.output_ids
            lengths = [len(ids), 0, 0, 0, 0]
            output.output_ids = ids[counts[0] :]
        else:
            lengths = []
            for name, count in zip(GROWING_FIELDS, counts, strict=True):
                entries = getattr(output, name)
                if entries is None:
                    lengths.append(0)
                else:
                    lengths.append(len(entries))
                    setattr(output, name, entries[count:])
        text, kept_text = output.text, 0
        if text is not None and text.startswith(self._text):
            kept_text = len(self._text)
            output.text = text[kept_text:]
        self._counts, self._text = tuple(lengths), text or ""
        return output, counts, kept_text


class OutputRebuilder:
    """Consumer side, one per request: its lists and text so far, to rebuild cumulative outputs."""

    __slots__ = ("_lists", "_text")

    def __init__(self) -> None:
        self._lists: tuple[list | None, ...] = (None,) * len(GROWING_FIELDS)
        self._text = ""

    def rebuild(self, delta: OutputDelta) -> RequestOutput:
        output, counts, kept_text = delta
        for name, count, before in zip(GROWING_FIELDS, counts, self._lists, strict=True):
            new = getattr(output, name)
            if new is not None:
                # A new list each time: an earlier output may still be on its way to the client.
                setattr(output, name, (before or [])[:count] + new)
        if output.text is not None:
            output.text = self._text[:kept_text] + output.text
        self._lists = tuple(getattr(output, name) for name in GROWING_FIELDS)
        self._text = output.text or ""
        return output


class DeltaDecoder:
    """Consumer side for many requests at once (the HTTP process): a rebuilder per request id
    in flight, forgotten at its final output (an id may come back as a new request)."""

    def __init__(self) -> None:
        self._requests: dict[str, OutputRebuilder] = {}

    def decode(self, delta: OutputDelta) -> RequestOutput:
        rid = delta[0].rid
        rebuilder = self._requests.pop(rid, None) or OutputRebuilder()
        output = rebuilder.rebuild(delta)
        if not output.finished:
            self._requests[rid] = rebuilder
        return output
