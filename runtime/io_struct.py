"""Records passed between the HTTP server, the engine and the scheduler thread.

They are plain dataclasses so that the server, the offline `Engine.generate` and
the tests all speak the same shapes; the server turns a `RequestOutput` into the
JSON of NATIVE_API.md with `to_generate_response`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

from runtime.sampling_params import SamplingParams

RequestKind = Literal["generate", "embed", "classify"]


@dataclasses.dataclass
class EngineRequest:
    """One prompt and one sample; the server expands batches and `n > 1` into several."""

    rid: str
    input_ids: list[int]
    sampling_params: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    kind: RequestKind = "generate"
    stream: bool = False
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    token_ids_logprob: list[int] | None = None
    return_text_in_logprobs: bool = False
    return_hidden_states: bool = False
    text: str | None = None


@dataclasses.dataclass
class RequestOutput:
    """A request's state as seen by its client: cumulative, so every event stands alone (inside
    the engine, an `OutputDelta` holds one cut down to what is new: runtime/output_deltas.py)."""

    rid: str
    output_ids: list[int]
    text: str | None
    finished: bool
    finish_reason: dict[str, Any] | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    e2e_latency: float = 0.0
    # Seconds from the engine's arrival to the first output token read back (None before it):
    # the metrics' time to first token for a request that does not stream.
    first_token_latency: float | None = None
    # Logprob entries are (logprob or None, token id); the server adds text when asked.
    input_token_logprobs: list[tuple[float | None, int]] | None = None
    output_token_logprobs: list[tuple[float | None, int]] | None = None
    input_top_logprobs: list[list[tuple[float, int]] | None] | None = None
    output_top_logprobs: list[list[tuple[float, int]]] | None = None
    input_token_ids_logprobs: list[list[tuple[float, int]] | None] | None = None
    output_token_ids_logprobs: list[list[tuple[float, int]]] | None = None
    hidden_states: list[list[float]] | None = None
    embedding: list[float] | None = None
    error: str | None = None
    error_status: int = 500  # the HTTP status of `error`: 400 when the request itself is at fault


def failed_output(
    request: EngineRequest, error: str, status: int = 500, reason: str | None = None
) -> RequestOutput:
    """The final output of a request that the engine could not run: aborted, with `error`."""
    return RequestOutput(
        request.rid,
        [],
        None,
        True,
        {"type": "abort", "message": reason or error},
        len(request.input_ids),
        0,
        0,
        error=error,
        error_status=status,
    )


OutputCallback = Callable[[RequestOutput], None]
