"""Structured output: grammars checked and compiled (runtime/grammar.py), masks applied by the
sampler, and constrained greedy decoding on SmolLM2 token for token against HF transformers
decoding under the same grammar."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from runtime.engine import Engine
from runtime.grammar import TokenGrammars, _closed_objects, compile_grammar
from runtime.sampling import SamplingRow, allowed_tokens, make_sampling_batch, mask_disallowed, sample
from runtime.sampling_params import SamplingParams
from tests.conftest import greedy_agrees
from tests.fixture_spec import compile_level_for

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


@pytest.mark.parametrize(
    ("params", "start"),
    [
        ({"regex": "("}, "Invalid regex: "),
        ({"regex": "[z-a]"}, "Invalid regex: "),
        ({"json_schema": "{not json"}, "Invalid json_schema: Expecting property name"),
        ({"json_schema": {"type": "intger"}}, "Invalid json_schema: "),
        ({"json_schema": "[1, 2]"}, "Invalid json_schema: "),
        ({"ebnf": 'root ::= ("a"'}, "Invalid ebnf: "),
        ({"ebnf": "root ::= missing"}, "Invalid ebnf: "),
    ],
)
def test_a_grammar_that_does_not_compile_is_refused_naming_its_key(params: dict, start: str) -> None:
    with pytest.raises(ValueError) as err:
        SamplingParams.from_dict(params)
    assert str(err.value).startswith(start), str(err.value)


@pytest.mark.parametrize(
    "params",
    [
        {"regex": "(yes|no)"},
        {"json_schema": PERSON},
        {"json_schema": json.dumps(PERSON)},
        {"ebnf": 'root ::= "a" [0-9]+ rest\nrest ::= "." | "!"'},  # GBNF, the reference's syntax
        {"ebnf": 'start: "a" | "b"'},  # Lark
    ],
)
def test_valid_grammars_are_accepted(params: dict) -> None:
    SamplingParams.from_dict(params)


def test_object_schemas_that_name_properties_are_closed_unless_they_say_otherwise() -> None:
    schema = {
        "type": "object",
        "properties": {
            "properties": {"type": "object", "properties": {"x": {"type": "integer"}}},
            "type": {"type": "string"},
            "open": {"type": "object", "additionalProperties": True},
            "choice": {"anyOf": [{"type": "object", "properties": {"a": {}}}]},
        },
        "$defs": {"item": {"properties": {"y": {"const": {"type": "object"}}}}},
        "items": [{"type": "object"}, {"type": "object", "properties": {"z": {}}}],
    }
    closed = _closed_objects(schema)
    assert closed["additionalProperties"] is False
    inner = closed["properties"]
    assert set(inner) == {"properties", "type", "open", "choice"}  # property names are not schemas
    assert inner["properties"]["additionalProperties"] is False
    assert "additionalProperties" not in inner["type"]
    assert inner["open"]["additionalProperties"] is True
    assert inner["choice"]["anyOf"][0]["additionalProperties"] is False  # alternatives: each closed
    item = closed["$defs"]["item"]
    assert item["additionalProperties"] is False
    assert item["properties"]["y"] == {"const": {"type": "object"}}  # data, not a schema
    # Any object where no property is named.
    assert closed["items"] == [
        {"type": "object"},
        {"type": "object", "properties": {"z": {}}, "additionalProperties": False},
    ]
    assert "additionalProperties" not in schema  # the caller's schema is left as it was


BASE = {"properties": {"id": {"type": "integer"}}, "required": ["id"]}
EXTRA = {"properties": {"extra": {"type": "string"}}, "required": ["extra"]}


@pytest.mark.parametrize(
    "schema",
    [
        {"allOf": [BASE, EXTRA]},
        {"$defs": {"base": BASE}, "allOf": [{"$ref": "#/$defs/base"}, EXTRA]},
        {"$defs": {"base": BASE}, "$ref": "#/$defs/base", **EXTRA},
        {**EXTRA, "anyOf": [BASE]},
    ],
    ids=["allOf", "allOf-ref", "ref-beside-properties", "anyOf-beside-properties"],
)
def test_schemas_whose_properties_add_up_stay_open(schema: dict) -> None:
    """Properties that combine (allOf, a $ref or an anyOf beside properties) would refuse each
    other if each part were closed: those parts stay open, and the schema compiles."""
    compile_grammar("json_schema", json.dumps(schema))
    closed = _closed_objects(schema)
    parts = [*closed.get("allOf", []), *closed.get("anyOf", []), *closed.get("$defs", {}).values(), closed]
    assert not any("additionalProperties" in part for part in parts), closed


def _mask_words(allowed: np.ndarray) -> np.ndarray:
    """Mask words int32 [S, W] from bool [S, V], llguidance's layout."""
    rows, vocab = allowed.shape
    padded = np.zeros((rows, -(-vocab // 32) * 32), np.bool_)
    padded[:, :vocab] = allowed
    return np.packbits(padded, axis=1, bitorder="little").view(np.int32)


def test_the_sampler_draws_only_allowed_tokens() -> None:
    """Greedy rows take the best allowed token, sampled rows (with top-k, top-p) draw only allowed
    ones, and a row with every bit set samples as it would with no mask at all."""
    rng = np.random.default_rng(0)
    rows, vocab = 6, 300
    logits = jnp.asarray(rng.normal(size=(rows, vocab)).astype(np.float32) * 3)
    allowed = rng.random((rows, vocab)) < 0.05
    allowed[5] = True
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=1.3, top_k=20),
        SamplingParams(temperature=0.8, top_p=0.5),
        SamplingParams(temperature=1.0),
    ]
    counts = jnp.zeros((rows + 1, vocab), jnp.int32)
    prompt_mask = jnp.zeros((rows + 1, vocab), jnp.bool_)
    for seed in range(20):
        batch = make_sampling_batch(
            [
                SamplingRow(params=p, seed=seed * 10 + i, output_index=0, penalty_slot=0)
                for i, p in enumerate(params)
            ],
            rows,
        )
        masked_logits = mask_disallowed(logits, jnp.asarray(_mask_words(allowed)))
        masked = sample(masked_logits, batch, counts, prompt_mask, raw=logits)
        tokens = np.asarray(masked.tokens)
        # the draws are scored by the model's own logits, not the masked ones
        own = np.asarray(jax.nn.log_softmax(logits, axis=-1))[np.arange(rows), tokens]
        np.testing.assert_allclose(np.asarray(masked.chosen_logprob), own, rtol=1e-5, atol=1e-5)
        assert allowed[np.arange(rows), tokens].all(), tokens
        best = np.where(allowed, np.asarray(logits), -np.inf).argmax(-1)
        assert tokens[:2].tolist() == best[:2].tolist()
        free = sample(logits, batch, counts, prompt_mask)
        assert tokens[5] == int(free.tokens[5])


def _hf_constrained_greedy(hf, matcher, prompt: list[int], max_new_tokens: int, eos: int):
    """HF's greedy tokens under the grammar's masks (llguidance, as the engine's), with the top-2
    margin among the allowed tokens at each step, until EOS. HF keeps its KV cache between
    steps, as its `generate` does: recomputing the whole sequence each step made this loop most
    of the grammar tests' time (40 forwards of up to 110 tokens, about 0.75 s each on the 2-core
    box)."""
    import llguidance.numpy
    import torch

    tokens, margins = [], []
    words = llguidance.numpy.allocate_token_bitmask(1, hf.config.vocab_size)
    step_input, cache = list(prompt), None
    for _ in range(max_new_tokens):
        with torch.no_grad():
            out = hf(torch.tensor([step_input]), cache=cache, use_cache=True)
        logits, cache = out.logits[0, -1].double().numpy(), out.cache
        llguidance.numpy.fill_next_token_bitmask(matcher, words)
        bits = np.unpackbits(words.view(np.uint8), bitorder="little")[: logits.size].astype(bool)
        masked = np.where(bits, logits, -np.inf)
        top2 = np.sort(masked)[-2:]
        token = int(masked.argmax())
        tokens.append(token)
        margins.append(float(top2[1] - top2[0]) if np.isfinite(top2[0]) else np.inf)
        assert matcher.consume_token(token)
        step_input = [token]
        if token == eos:
            break
    return tokens, margins


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    engine = Engine(model_path=str(smollm2_path), max_total_tokens=4096, warmup=False, random_seed=0)
    yield engine
    engine.shutdown()


def test_constrained_greedy_decoding_matches_hf_under_the_same_grammar(smollm2_path, smollm2) -> None:
    """A JSON schema, a regex and a GBNF grammar on SmolLM2: the engine's greedy tokens are HF's
    greedy tokens under llguidance's masks, the texts fit their grammars, and each ends at EOS."""
    import llguidance.hf
    from llguidance import LLMatcher
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_path))
    hf = AutoModelForCausalLM.from_pretrained(str(smollm2_path)).eval()
    llg_tokenizer = llguidance.hf.from_tokenizer(tokenizer)

    def chat(text: str) -> list[int]:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(rendered)["input_ids"]

    cases = [
        ("json_schema", json.dumps(PERSON), chat("Describe Alice, who is 30, as JSON.")),
        ("regex", r"The answer is (yes|no)\.", chat("Is the sky blue?")),
        (
            "ebnf",
            'root ::= "Colours: " colour ", " colour " and " colour "."\ncolour ::= [a-z]+',
            chat("Name three colours."),
        ),
    ]
    for key, text, prompt in cases:
        params = {"temperature": 0, "max_new_tokens": 40, key: text}
        out = smollm2.generate(input_ids=prompt, sampling_params=params, return_logprob=True)
        matcher = LLMatcher(llg_tokenizer, compile_grammar(key, text), log_level=0)
        want, margins = _hf_constrained_greedy(hf, matcher, prompt, 40, tokenizer.eos_token_id)
        got = [token for _, token, _ in out["meta_info"]["output_token_logprobs"]]
        result = greedy_agrees(got, want, margins)
        assert result, (key, result, tokenizer.decode(got), tokenizer.decode(want))
        assert got[-1] == tokenizer.eos_token_id, (key, out)
        assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": tokenizer.eos_token_id}
        if key == "json_schema":
            person = json.loads(out["text"])
            assert set(person) == {"name", "age"} and isinstance(person["age"], int), out["text"]
        elif key == "regex":
            assert re.fullmatch(text, out["text"]), out["text"]
        else:
            assert re.fullmatch(r"Colours: [a-z]+, [a-z]+ and [a-z]+\.", out["text"]), out["text"]


@pytest.mark.parametrize("extra", [{"ignore_eos": True}, {"min_new_tokens": 10}])
def test_a_complete_grammar_ends_the_request_at_its_eos(smollm2, extra: dict) -> None:
    """Once the grammar is complete only EOS may follow, and that EOS ends the request even where
    ignore_eos or min_new_tokens would let it go on (it would otherwise sample from nothing)."""
    eos = smollm2.tokenizer.eos_token_id
    params = {"temperature": 0, "max_new_tokens": 20, "regex": " (Yes|No)", **extra}
    out = smollm2.generate("Is the sky blue? Answer:", sampling_params=params, return_logprob=True)
    ids = [token for _, token, _ in out["meta_info"]["output_token_logprobs"]]
    assert out["text"] in (" Yes", " No") and ids[-1] == eos, out
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": eos}


def test_a_structural_tag_constrains_each_call_and_leaves_the_text_free(smollm2_path, smollm2) -> None:
    """The reference's structural tag: free text, in which each call from its trigger on follows its
    schema (here a city the model would not pick), token for token as HF under the same masks."""
    import llguidance.hf
    from llguidance import LLMatcher
    from transformers import AutoModelForCausalLM

    weather = {"type": "object", "properties": {"city": {"enum": ["Lyon", "Nice"]}}, "required": ["city"]}
    tag = json.dumps(
        {
            "structures": [{"begin": "<function=get_weather>", "schema": weather, "end": "</function>"}],
            "triggers": ["<function="],
        }
    )
    prompt_text = (
        'Q: weather in Rome?\nA: <function=get_weather>{"city": "Rome"}</function>\n'
        'Q: weather in Oslo?\nA: <function=get_weather>{"city": "Oslo"}</function>\nQ: weather in Paris?\nA:'
    )
    prompt = smollm2.tokenize(prompt_text)
    params = {"temperature": 0, "max_new_tokens": 40, "structural_tag": tag}
    out = smollm2.generate(input_ids=prompt, sampling_params=params, return_logprob=True)
    free = smollm2.generate(input_ids=prompt, sampling_params={"temperature": 0, "max_new_tokens": 40})
    assert '{"city": "Paris"}' in free["text"]  # what the grammar rules out
    calls = re.findall(r"<function=get_weather>(.*?)</function>", out["text"], re.DOTALL)
    assert calls and all(json.loads(call)["city"] in ("Lyon", "Nice") for call in calls), out["text"]
    assert "\nQ: weather in" in out["text"]  # the text between calls is the model's own
    hf = AutoModelForCausalLM.from_pretrained(str(smollm2_path)).eval()
    tokenizer = smollm2.tokenizer
    matcher = LLMatcher(
        llguidance.hf.from_tokenizer(tokenizer), compile_grammar("structural_tag", tag), log_level=0
    )
    want, margins = _hf_constrained_greedy(hf, matcher, prompt, 40, tokenizer.eos_token_id)
    got = [token for _, token, _ in out["meta_info"]["output_token_logprobs"]]
    result = greedy_agrees(got, want, margins)
    assert result, (result, tokenizer.decode(got), tokenizer.decode(want))


@pytest.mark.parametrize("model_vocab", [49000, 49408])
def test_masks_cover_the_tokenizer_and_the_model(smollm2_path, model_vocab: int) -> None:
    """A model whose logits are narrower than its tokenizer (or wider, padded) still gets masks:
    as wide as the wider of the two, with no bit set past the tokenizer's tokens. An EOS id of the
    model's past the tokenizer's tokens (llguidance refuses it) is left out of the grammar's."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_path))
    grammars = TokenGrammars(tokenizer, model_vocab, frozenset({tokenizer.eos_token_id, 49300}))
    grammar = grammars.for_request(SamplingParams.from_dict({"regex": "[a-z]+"}))
    masks = np.full((2, grammars.mask_words), -1, np.int32)
    grammars.fill_masks([(grammar, 1)], masks)
    assert grammars.mask_words * 32 >= max(model_vocab, len(tokenizer))
    allowed = np.asarray(allowed_tokens(jnp.asarray(masks), model_vocab))
    assert allowed[0].all() and allowed[1].any() and not allowed[1].all()
    words = [tokenizer.decode([t]) for t in np.flatnonzero(allowed[1])[:50]]
    assert all(re.fullmatch("[a-z]+", word) for word in words), words


def test_an_object_schema_without_properties_takes_any_object(smollm2_path) -> None:
    """`{"type": "object"}` (OpenAI's json_object) stays any object: closed, it would allow `{}` alone."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_path))
    grammars = TokenGrammars(tokenizer, len(tokenizer), frozenset({tokenizer.eos_token_id}))
    for text, fits in (('{"a": [1, {"b": null}]}', True), ("[1]", False)):
        grammar = grammars.for_request(SamplingParams.from_dict({"json_schema": '{"type": "object"}'}))
        ids = tokenizer.encode(text)
        assert all(grammar.accept(token) for token in ids) is fits, text


def test_grammar_steps_run_the_warm_ups_samplers(tiny_llama_path) -> None:
    """A step with a grammar row masks its logits in a small program of its own, then runs the
    usual sampler of its row count: after the warm-up, grammar requests at several row counts,
    greedy and sampled, compile no sampler (one with the masks inside compiled inline at the first
    grammar step of each row count). The warm-up makes llguidance's view of the tokenizer aside."""
    engine = Engine(
        model_path=str(tiny_llama_path),
        max_total_tokens=4096,
        max_running_requests=16,
        random_seed=0,
        xla_backend_optimization_level=compile_level_for(tiny_llama_path),
    )
    try:
        engine.warmup()
        runner, grammars = engine.runner, engine.grammars
        runner.wait_for_background_compiles()
        assert grammars is not None and grammars._tokenizer is not None  # made aside by the warm-up
        samplers = (set(runner._background_samplers), set(runner._sampler_shapes))  # this runner's
        regex = {"max_new_tokens": 6, "regex": "[a-z ]+"}
        rng = np.random.default_rng(4)
        prompts = [rng.integers(5, 200, int(n)).tolist() for n in (3, 9, 17, 30, 5)]
        for count in (1, 2, 5):
            params = [{**regex, "temperature": 0.8 if i % 2 else 0.0} for i in range(count)]
            outputs = engine.generate(input_ids=prompts[:count], sampling_params=params)
            assert all(re.fullmatch(regex["regex"], out["text"]) for out in outputs), outputs
        runner.wait_for_background_compiles()
        assert (set(runner._background_samplers), set(runner._sampler_shapes)) == samplers
        assert runner._mask_disallowed._cache_size() >= 2  # one small program per row count met
    finally:
        engine.shutdown()
