"""The checks a request passes before it is queued, and the engine facts they need.

They live apart from the engine so that the HTTP process, which talks to an
engine in another process, fails a bad request with a 400 on its own, without a
round trip: the facts (`RequestLimits`) are small and fixed once the engine is up.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Container

from runtime.grammar import grammar_source
from runtime.io_struct import EngineRequest

# Logprobs a request may ask for per token: each is a (logprob, id) pair in every position's
# answer, so a whole-vocabulary ask would cost megabytes a token in both processes.
MAX_LOGPROBS_PER_TOKEN = 1024


@dataclasses.dataclass
class ModelInfo:
    model_path: str
    tokenizer_path: str | None
    is_generation: bool
    embedding_kind: str | None  # "embed", "classify" or None for generation models
    context_length: int
    vocab_size: int
    served_model_name: str
    architecture: str
    # the length of an /encode answer's vector or of /classify's scores; None for generation
    embedding_size: int | None = None


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """What a request is checked against."""

    model_info: ModelInfo
    kv_capacity: int | None  # tokens the KV pool holds; None for encoders, which keep no KV cache
    allow_auto_truncate: bool
    has_tokenizer: bool


def check_request(req: EngineRequest, limits: RequestLimits) -> None:
    """Every check that can fail a request, with the message the client sees (a ValueError).

    With --allow-auto-truncate an over-long prompt is cut to fit instead, in place.
    """
    info = limits.model_info
    if req.kind == "generate" and not info.is_generation:
        raise ValueError(
            "This model is an embedding model: /generate is not served. Use /encode or /classify."
        )
    if req.kind != "generate" and info.is_generation:
        raise ValueError(
            "This model does not appear to be an embedding model by default. Please add `--is-embedding` "
            "when launching the server or try another model."
        )
    if not req.input_ids:
        raise ValueError("input_ids cannot be empty.")
    for token in req.input_ids:
        if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < info.vocab_size:
            raise ValueError(f"Token id {token} is outside the vocabulary (size {info.vocab_size}).")
    context = info.context_length
    if len(req.input_ids) >= context and req.kind == "generate" or len(req.input_ids) > context:
        if limits.allow_auto_truncate:  # to the most it serves: a generation needs one more slot
            keep = context - 1 if req.kind == "generate" else context
            if limits.kv_capacity is not None:
                keep = min(keep, limits.kv_capacity - 1)  # and the KV cache (checked below)
            req.input_ids = req.input_ids[:keep]
        else:
            raise ValueError(
                f"The input ({len(req.input_ids)} tokens) is longer than the model's context length "
                f"({context} tokens)."
            )
    params = req.sampling_params
    if limits.kv_capacity is not None and len(req.input_ids) >= limits.kv_capacity:
        raise ValueError(
            f"The input ({len(req.input_ids)} tokens) does not fit the KV cache "
            f"({limits.kv_capacity} tokens, --max-total-tokens)."
        )
    if req.kind == "generate" and params.max_new_tokens is not None:
        total = len(req.input_ids) + params.max_new_tokens
        if total > context:
            raise ValueError(
                f"Requested token count exceeds the model's maximum context length of {context} tokens. "
                f"You requested a total of {total} tokens: {len(req.input_ids)} tokens from the input "
                f"messages and {params.max_new_tokens} tokens for the completion. Please reduce the "
                "number of tokens in the input messages or the completion to fit within the limit."
            )
        if limits.kv_capacity is not None and total > limits.kv_capacity:  # else cut short unasked
            raise ValueError(
                f"Requested token count exceeds the KV cache of {limits.kv_capacity} tokens "
                f"(--max-total-tokens). You requested a total of {total} tokens: {len(req.input_ids)} "
                f"tokens from the input and {params.max_new_tokens} tokens for the completion."
            )
    params.verify(info.vocab_size)
    if not limits.has_tokenizer and params.stop:
        raise ValueError("stop strings need a tokenizer: the server runs with --skip-tokenizer-init.")
    grammar = grammar_source(params)
    if not limits.has_tokenizer and grammar is not None:
        raise ValueError(f"{grammar[0]} needs a tokenizer: the server runs with --skip-tokenizer-init.")
    if req.return_logprob and req.top_logprobs_num < 0:
        raise ValueError(f"top_logprobs_num must be at least 0, got {req.top_logprobs_num}.")
    if req.return_logprob and req.top_logprobs_num > MAX_LOGPROBS_PER_TOKEN:
        raise ValueError(
            f"top_logprobs_num may be at most {MAX_LOGPROBS_PER_TOKEN}, got {req.top_logprobs_num}."
        )
    if req.return_logprob and len(req.token_ids_logprob or ()) > MAX_LOGPROBS_PER_TOKEN:
        raise ValueError(
            f"token_ids_logprob may list at most {MAX_LOGPROBS_PER_TOKEN} ids, "
            f"got {len(req.token_ids_logprob or ())}."
        )
    if req.return_logprob and req.logprob_start_len >= len(req.input_ids):
        raise ValueError(
            f"logprob_start_len ({req.logprob_start_len}) must be less than the input length "
            f"({len(req.input_ids)})."
        )


def check_not_in_flight(rid: str, in_flight: Container[str]) -> None:
    """A request id names one request at a time: refuse an id until its request has ended."""
    if rid in in_flight:
        raise ValueError(f"Request id {rid!r} is already in flight.")
