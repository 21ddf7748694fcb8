"""The JSON of one /generate or /encode answer, built from the engine's records.

The HTTP server and the offline `Engine.generate` both call these, so an offline
caller sees exactly what a client of the native API sees (NATIVE_API.md,
"Response"): `text` (or `output_ids` without a tokenizer) and `meta_info` with
the finish reason, token counts and, when asked, logprobs as
`[logprob, token_id, text_or_null]` triples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from runtime.io_struct import EngineRequest, RequestOutput


class TokenDecoder(Protocol):
    """The one tokenizer method needed here (an HF tokenizer has it)."""

    def decode(self, token_ids: list[int], **kwargs: Any) -> str: ...


def _token_texts(token_ids: Sequence[int], tokenizer: TokenDecoder | None) -> list[str | None]:
    """Each token alone, decoded; None for every token when there is no tokenizer."""
    if tokenizer is None:
        return [None] * len(token_ids)
    return [tokenizer.decode([token_id]) for token_id in token_ids]


def _logprob_triples(
    entries: Sequence[tuple[float | None, int]], tokenizer: TokenDecoder | None
) -> list[list[Any]]:
    """`[(logprob, id), ...]` -> `[[logprob, id, text_or_null], ...]`."""
    texts = _token_texts([token_id for _, token_id in entries], tokenizer)
    return [[logprob, token_id, text] for (logprob, token_id), text in zip(entries, texts, strict=True)]


def _per_position_triples(
    positions: Sequence[Sequence[tuple[float, int]] | None], tokenizer: TokenDecoder | None
) -> list[list[list[Any]] | None]:
    """Top-k (or chosen-ids) lists per position; an empty or missing position is null, as the reference."""
    return [_logprob_triples(entries, tokenizer) if entries else None for entries in positions]


def logprob_meta_info(
    request: EngineRequest, output: RequestOutput, tokenizer: TokenDecoder | None
) -> dict[str, Any]:
    """The logprob keys of meta_info for a request that asked for them (empty dict otherwise)."""
    if not request.return_logprob:
        return {}
    decoder = tokenizer if request.return_text_in_logprobs else None
    meta: dict[str, Any] = {
        "input_token_logprobs": _logprob_triples(output.input_token_logprobs or [], decoder),
        "output_token_logprobs": _logprob_triples(output.output_token_logprobs or [], decoder),
    }
    if request.top_logprobs_num > 0:
        meta["input_top_logprobs"] = _per_position_triples(output.input_top_logprobs or [], decoder)
        meta["output_top_logprobs"] = _per_position_triples(output.output_top_logprobs or [], decoder)
    if request.token_ids_logprob is not None:
        meta["input_token_ids_logprobs"] = _per_position_triples(
            output.input_token_ids_logprobs or [], decoder
        )
        meta["output_token_ids_logprobs"] = _per_position_triples(
            output.output_token_ids_logprobs or [], decoder
        )
    return meta


def generate_response(
    request: EngineRequest,
    output: RequestOutput,
    tokenizer: TokenDecoder | None,
    skip_tokenizer_init: bool,
) -> dict[str, Any]:
    """One /generate answer (or one streamed event): cumulative text or ids, and meta_info."""
    meta_info: dict[str, Any] = {
        "id": output.rid,
        "finish_reason": output.finish_reason if output.finished else None,
        "prompt_tokens": output.prompt_tokens,
        "completion_tokens": output.completion_tokens,
        "cached_tokens": output.cached_tokens,
    }
    meta_info.update(logprob_meta_info(request, output, tokenizer))
    if request.return_hidden_states and output.hidden_states is not None:
        meta_info["hidden_states"] = output.hidden_states
    if output.finished:
        meta_info["e2e_latency"] = output.e2e_latency
    if skip_tokenizer_init or tokenizer is None:
        return {"output_ids": list(output.output_ids), "meta_info": meta_info}
    return {"text": output.text if output.text is not None else "", "meta_info": meta_info}


def embedding_response(output: RequestOutput) -> dict[str, Any]:
    """One /encode or /classify answer: the vector (or scores) and meta_info."""
    return {
        "embedding": output.embedding if output.embedding is not None else [],
        "meta_info": {
            "id": output.rid,
            "finish_reason": output.finish_reason or {"type": "length", "length": 0},
            "prompt_tokens": output.prompt_tokens,
            "e2e_latency": output.e2e_latency,
        },
    }
