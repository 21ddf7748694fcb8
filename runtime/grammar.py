"""Structured output: a request's regex, JSON schema, EBNF grammar or structural tag as a mask of the
tokens it may sample next (llguidance, one of the reference's grammar backends).

A grammar is checked where the request arrives (`check_grammar`, no tokenizer needed, so the HTTP
process answers a bad one with a 400), and compiled against the tokenizer once per distinct text
(`TokenGrammars`): each request then takes a copy of the compiled matcher, which costs
microseconds. A mask is a row of 32-bit words, bit `t % 32` of word `t // 32` set when token `t`
is allowed (llguidance's layout): the sampler unpacks it on the device (`runtime/sampling.py`), so
a step sends V/32 words per row rather than V flags.
"""

from __future__ import annotations

import collections
import functools
import json
import threading
from collections.abc import Sequence
from typing import Any

import llguidance
import llguidance.hf
import llguidance.numpy
import numpy as np
from llguidance import LLMatcher, StructTag

# At most one of these per request (the reference's check); `structural_tag` goes with none of them.
GRAMMAR_KEYS = ("regex", "json_schema", "ebnf")
_SOURCE_KEYS = (*GRAMMAR_KEYS, "structural_tag")
# Distinct grammars kept compiled per engine (a compiled SmolLM2 schema matcher is ~100 KB).
MAX_COMPILED_GRAMMARS = 256
# JSON Schema keywords whose value maps names to schemas, and those whose value is data.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_VALUES = ("enum", "const", "default", "examples")
# Keywords that combine a schema with others, whose properties then add up with its own.
_COMBINING = ("$ref", "allOf", "anyOf", "oneOf")
# llguidance's name for each key's format ("ebnf" reads GBNF, the reference's syntax, or Lark; a
# structural tag becomes Lark here first).
_FORMATS = {"regex": "regex", "json_schema": "json_schema", "ebnf": "ebnf", "structural_tag": "lark"}


def grammar_source(params: Any) -> tuple[str, str] | None:
    """The request's grammar as (key, text), or None; a JSON schema given as an object is
    serialised with sorted keys, so equal schemas share one compiled grammar."""
    for key in _SOURCE_KEYS:
        value = getattr(params, key)
        if value is None:
            continue
        try:
            return key, value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        except RecursionError:
            raise ValueError(f"Invalid {key}: nested too deeply.") from None
    return None


@functools.lru_cache(maxsize=MAX_COMPILED_GRAMMARS)
def compile_grammar(key: str, text: str) -> str:
    """llguidance's grammar for a grammar key (GRAMMAR_KEYS, `structural_tag`) and its text;
    ValueError naming the key when the text is not a valid grammar of that kind (errors are not
    cached)."""
    try:
        if key == "json_schema":
            text = json.dumps(_closed_objects(json.loads(text)))
        elif key == "structural_tag":
            text = _structural_tag_lark(json.loads(text))
        grammar = llguidance.grammar_from(_FORMATS[key], text)
    except ValueError as exc:  # json.JSONDecodeError is one
        raise ValueError(f"Invalid {key}: {exc}") from None
    except RecursionError:
        raise ValueError(f"Invalid {key}: nested too deeply.") from None
    error = LLMatcher.validate_grammar(grammar)
    if error:
        raise ValueError(f"Invalid {key}: {error.strip()}")
    return grammar


def _closed_objects(schema: Any, close: bool = True, open_refs: frozenset[str] | None = None) -> Any:
    """The schema with `"additionalProperties": false` on every object schema that names its
    properties and does not say otherwise: the reference's default backend (xgrammar, strict mode)
    allows no property such a schema does not name, where JSON Schema itself would allow any
    (SmolLM2, asked for a name and an age, went on to invent six more fields).

    Left open, since closing would refuse properties that are meant to add up: a schema that names
    none (`{"type": "object"}` is any object); one that combines its properties with others
    (`$ref`, `allOf`, `anyOf`, `oneOf` beside them); the members of an `allOf`, and of an `anyOf`
    or `oneOf` beside properties (`close` false); and a `$defs` entry referenced where it combines
    so (`open_refs`, `_combined_refs`)."""
    if open_refs is None:
        open_refs = frozenset(_combined_refs(schema))
    if isinstance(schema, list):
        return [_closed_objects(item, close, open_refs) for item in schema]
    if not isinstance(schema, dict):
        return schema
    names_properties = "properties" in schema or "patternProperties" in schema
    closed = {}
    for key, value in schema.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):  # names to schemas: no schema itself
            closed[key] = {
                name: _closed_objects(sub, f"#/{key}/{name}" not in open_refs, open_refs)
                for name, sub in value.items()
            }
        elif key in _SCHEMA_VALUES:
            closed[key] = value
        else:
            members_add_up = key == "allOf" or (key in ("anyOf", "oneOf") and names_properties)
            closed[key] = _closed_objects(value, not members_add_up, open_refs)
    if (
        close
        and names_properties
        and not any(keyword in schema for keyword in _COMBINING)
        and "additionalProperties" not in schema
        and "unevaluatedProperties" not in schema
    ):
        closed["additionalProperties"] = False
    return closed


def _combined_refs(schema: Any) -> set[str]:
    """The `$ref` targets used where their properties add up with others': an `allOf` member's,
    one beside properties or another combination, an `anyOf` / `oneOf` member's beside
    properties."""
    refs: set[str] = set()
    if isinstance(schema, list):
        for item in schema:
            refs |= _combined_refs(item)
        return refs
    if not isinstance(schema, dict):
        return refs
    names_properties = "properties" in schema or "patternProperties" in schema
    ref = schema.get("$ref")
    if isinstance(ref, str) and (names_properties or any(k in schema for k in _COMBINING[1:])):
        refs.add(ref)
    for key in ("allOf", "anyOf", "oneOf") if names_properties else ("allOf",):
        members = schema.get(key)
        if isinstance(members, list):
            refs.update(m["$ref"] for m in members if isinstance(m, dict) and isinstance(m.get("$ref"), str))
    for key, value in schema.items():
        if key in _SCHEMA_VALUES:
            continue
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            value = list(value.values())
        refs |= _combined_refs(value)
    return refs


def _structural_tag_lark(tag: Any) -> str:
    """A Lark grammar for the reference's structural tag: free text in which each of `structures`
    (`begin`, a JSON `schema`, `end`) may appear, constrained from one of `triggers` on (a trigger
    begins some structure's `begin`; the longest that does is that structure's)."""
    if not isinstance(tag, dict):
        raise ValueError("a structural tag is an object with structures and triggers")
    structures, triggers = tag.get("structures"), tag.get("triggers")
    if not isinstance(structures, list) or not structures or not all(isinstance(s, dict) for s in structures):
        raise ValueError("structures must be a non-empty list of objects with begin, schema and end")
    if not isinstance(triggers, list) or not all(isinstance(t, str) and t for t in triggers):
        raise ValueError("triggers must be a list of non-empty strings")
    tags = []
    for structure in structures:
        begin, schema, end = structure.get("begin"), structure.get("schema"), structure.get("end")
        if not isinstance(begin, str) or not isinstance(end, str) or not isinstance(schema, dict):
            raise ValueError("each structure needs a begin and an end (strings) and a schema (an object)")
        trigger = max((t for t in triggers if begin.startswith(t)), key=len, default=None)
        if trigger is None:
            raise ValueError(f"begin {begin!r} starts with none of the triggers")
        tags.append(StructTag(trigger=trigger, begin=begin, grammar=_closed_objects(schema), end=end))
    return StructTag.to_grammar(tags)


def check_grammar(params: Any) -> None:
    """Raise ValueError for a grammar that cannot be compiled (a request's `sampling_params`)."""
    source = grammar_source(params)
    if source is not None:
        compile_grammar(*source)


class RequestGrammar:
    """One request's place in its grammar: what it may sample next, and whether it is done."""

    def __init__(self, matcher: LLMatcher, eos_ids: frozenset[int]) -> None:
        self.matcher = matcher
        self._eos_ids = eos_ids
        # An EOS the grammar accepted: the request ends there whatever ignore_eos and
        # min_new_tokens say, since nothing else may follow.
        self.terminated = False

    def accept(self, token: int) -> bool:
        """Advance past a sampled token; False when the grammar refuses it (the matcher's error
        then says why)."""
        if not self.matcher.consume_token(token):
            return False
        self.terminated = token in self._eos_ids and self.matcher.is_stopped()
        return True

    @property
    def complete(self) -> bool:
        """Nothing but EOS may follow: the mask allows EOS alone."""
        return self.matcher.is_stopped()

    @property
    def error(self) -> str:
        return self.matcher.get_error()


class TokenGrammars:
    """An engine's grammars: its tokenizer as llguidance sees it (made at the first grammar, ~0.3 s
    for SmolLM2's 49k tokens), and one compiled matcher per distinct grammar, copied per request.
    `for_request` runs on the threads that submit requests, `fill_masks` on the scheduler's."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, eos_ids: frozenset[int]) -> None:
        """`vocab_size`: the model's (its logits' width). A tokenizer with more tokens than that
        widens the masks to its own size; the sampler reads the first `vocab_size` bits."""
        self._hf_tokenizer = hf_tokenizer
        self.vocab_size = max(vocab_size, len(hf_tokenizer))
        self.mask_words = (self.vocab_size + 31) // 32
        self._eos_ids = eos_ids
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._compiled: collections.OrderedDict[tuple[str, str], LLMatcher] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._executor = llguidance.LLExecutor()

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        """Under the lock. llguidance refuses an EOS id past the tokenizer's tokens (a model config's
        EOS in the padded part of its vocabulary, or a tokenizer of another model), and every grammar
        request then failed: the grammars end at the EOS ids the tokenizer has (its own if none)."""
        if self._tokenizer is None:
            known = sorted(i for i in self._eos_ids if i < len(self._hf_tokenizer))
            self._tokenizer = llguidance.hf.from_tokenizer(
                self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=known or None
            )
        return self._tokenizer

    def prepare(self) -> None:
        """Make llguidance's view of the tokenizer now (the warm-up has it made aside), not at the
        first grammar request."""
        with self._lock:
            self._llg_tokenizer()

    def for_request(self, params: Any) -> RequestGrammar | None:
        """A fresh matcher for the request's grammar, or None if it has none; ValueError when the
        grammar does not compile against this tokenizer."""
        source = grammar_source(params)
        if source is None:
            return None
        with self._lock:
            compiled = self._compiled.get(source)
            if compiled is None:
                compiled = LLMatcher(self._llg_tokenizer(), compile_grammar(*source), log_level=0)
                if compiled.is_error():
                    raise ValueError(f"Invalid {source[0]}: {compiled.get_error()}")
                self._compiled[source] = compiled
                if len(self._compiled) > MAX_COMPILED_GRAMMARS:
                    self._compiled.popitem(last=False)
            else:
                self._compiled.move_to_end(source)
        return RequestGrammar(compiled.deep_copy(), self._eos_ids)

    def fill_masks(self, rows: Sequence[tuple[RequestGrammar, int]], masks: np.ndarray) -> None:
        """Write each grammar's mask into row `row` of `masks` (int32 [S, mask_words]); the
        matchers run on llguidance's threads."""
        pairs = [(grammar.matcher, row) for grammar, row in rows]
        llguidance.numpy.fill_next_token_bitmask_par(self._executor, pairs, masks)
