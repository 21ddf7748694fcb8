"""The checks a request passes before it is queued (runtime/request_checks.py): each refusal's
message, and the sizes just inside each limit accepted."""

from __future__ import annotations

import dataclasses

import pytest

from runtime.io_struct import EngineRequest
from runtime.request_checks import MAX_LOGPROBS_PER_TOKEN, ModelInfo, RequestLimits, check_request
from runtime.sampling_params import SamplingParams

CONTEXT = 2048
KV_TOKENS = 1024  # a pool smaller than the context, as --max-total-tokens can make it
VOCAB = 500


def limits(kv_capacity: int | None = KV_TOKENS) -> RequestLimits:
    info = ModelInfo(
        model_path="m",
        tokenizer_path=None,
        is_generation=True,
        embedding_kind=None,
        context_length=CONTEXT,
        vocab_size=VOCAB,
        served_model_name="m",
        architecture="LlamaForCausalLM",
    )
    return RequestLimits(
        model_info=info, kv_capacity=kv_capacity, allow_auto_truncate=False, has_tokenizer=True
    )


def request(prompt_len: int = 10, max_new_tokens: int | None = 16, **fields) -> EngineRequest:
    params = SamplingParams.from_dict({"max_new_tokens": max_new_tokens})
    return EngineRequest(rid="r", input_ids=[7] * prompt_len, sampling_params=params, **fields)


def test_prompt_plus_completion_beyond_the_kv_cache_is_refused_not_cut() -> None:
    """Within the context but beyond the pool: the engine would end it early with a `length`
    finish that the client never asked for."""
    check_request(request(1000, 24), limits())  # exactly the pool
    with pytest.raises(ValueError, match=r"exceeds the KV cache of 1024 tokens \(--max-total-tokens\)"):
        check_request(request(1000, 25), limits())
    check_request(request(1000, 25), limits(kv_capacity=4096))
    check_request(request(1000, None), limits())  # null: as many as fit, by the API's definition


def test_the_context_is_checked_first() -> None:
    with pytest.raises(ValueError, match="maximum context length of 2048 tokens"):
        check_request(request(1000, 1100), limits())


@pytest.mark.parametrize("field", ["top_logprobs_num", "token_ids_logprob"])
def test_logprobs_per_token_are_bounded(field: str) -> None:
    def ask(count: int) -> EngineRequest:
        value = count if field == "top_logprobs_num" else [i % VOCAB for i in range(count)]
        return request(return_logprob=True, **{field: value})

    check_request(ask(MAX_LOGPROBS_PER_TOKEN), limits())
    with pytest.raises(ValueError, match=f"{field} may .*at most {MAX_LOGPROBS_PER_TOKEN}"):
        check_request(ask(MAX_LOGPROBS_PER_TOKEN + 1), limits())
    # Without return_logprob the field asks for nothing.
    unused = ask(MAX_LOGPROBS_PER_TOKEN + 1)
    unused.return_logprob = False
    check_request(unused, limits())


@pytest.mark.parametrize("key", ["regex", "json_schema", "ebnf"])
def test_a_grammar_needs_the_tokenizer(key: str) -> None:
    grammar = {"regex": "a+", "json_schema": {"type": "object"}, "ebnf": 'root ::= "a"'}[key]
    params = SamplingParams.from_dict({"max_new_tokens": 4, key: grammar})
    req = EngineRequest(rid="r", input_ids=[7], sampling_params=params)
    check_request(req, limits())
    without = dataclasses.replace(limits(), has_tokenizer=False)
    with pytest.raises(
        ValueError, match=f"^{key} needs a tokenizer: the server runs with --skip-tokenizer-init"
    ):
        check_request(req, without)


def test_auto_truncate_cuts_to_the_most_each_kind_serves() -> None:
    """--allow-auto-truncate: a generation to the context less one (its first new token needs a
    slot), a pooling request (/encode, /classify) to the whole context, which it is served at."""
    generation = dataclasses.replace(limits(kv_capacity=None), allow_auto_truncate=True)
    long_prompt = request(CONTEXT + 50, None)
    check_request(long_prompt, generation)
    assert len(long_prompt.input_ids) == CONTEXT - 1
    info = dataclasses.replace(generation.model_info, is_generation=False, embedding_kind="embed")
    pooling = dataclasses.replace(generation, model_info=info)
    for length in (CONTEXT, CONTEXT + 1, CONTEXT + 90):
        embed = EngineRequest(rid="e", input_ids=[7] * length, kind="embed")
        check_request(embed, pooling)
        assert len(embed.input_ids) == CONTEXT
    # a KV cache of the context's size (a causal LM served --is-embedding) holds one less
    pool_sized = dataclasses.replace(pooling, kv_capacity=CONTEXT)
    embed = EngineRequest(rid="e", input_ids=[7] * (CONTEXT + 90), kind="embed")
    check_request(embed, pool_sized)
    assert len(embed.input_ids) == CONTEXT - 1
