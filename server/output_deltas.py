"""Streamed outputs cross the engine's pipe as what is new since the request's last one.

A `RequestOutput` is cumulative (every event holds all of `output_ids` and
`text` so far), so sending it whole costs O(tokens so far) per event: at batch
64 and 1024 tokens deep, pickling a step's outputs took 0.5 ms and unpickling
1.2 ms, for 190 KB through the pipe. The engine side sends the new ids and the
text's new tail; the HTTP side rebuilds the cumulative output. Other fields
(logprobs, hidden states) travel whole: they are there only when asked for.
"""

from __future__ import annotations

from runtime.io_struct import RequestOutput

# (the output with only its new ids and text tail, how many ids came before, how much text is kept)
OutputDelta = tuple[RequestOutput, int, int]


class DeltaEncoder:
    """Engine side: what each request's client already has."""

    def __init__(self) -> None:
        self._sent: dict[str, tuple[int, str]] = {}

    def encode(self, output: RequestOutput) -> OutputDelta:
        """Strip `output` (which the caller hands over) down to what is new."""
        num_ids, text = self._sent.pop(output.rid, (0, ""))
        ids = output.output_ids
        new_text = output.text
        kept_text = 0
        if new_text is not None and new_text.startswith(text):
            kept_text = len(text)
            output.text = new_text[kept_text:]
        output.output_ids = ids[num_ids:]
        if not output.finished:
            self._sent[output.rid] = (len(ids), new_text or "")
        return output, num_ids, kept_text


class DeltaDecoder:
    """HTTP side: each request's ids and text so far, to rebuild its cumulative outputs."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[list[int], str]] = {}

    def decode(self, delta: OutputDelta) -> RequestOutput:
        output, num_ids, kept_text = delta
        ids, text = self._seen.pop(output.rid, ([], ""))
        # New objects each time: an earlier output may still be on its way to the client.
        output.output_ids = ids[:num_ids] + output.output_ids
        if output.text is not None:
            output.text = text[:kept_text] + output.text
        if not output.finished:
            self._seen[output.rid] = (output.output_ids, output.text or "")
        return output
