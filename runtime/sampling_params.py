"""Sampling parameters: one request's `sampling_params`, validated, with the reference's defaults.

`from_dict` turns a client's `sampling_params` object into a `SamplingParams`,
with the reference server's defaults and error messages (NATIVE_API.md), so the
server can answer 400 before anything runs. Apart from the device sampling
(`runtime/sampling.py`) because the HTTP process needs this and not JAX.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from runtime.grammar import GRAMMAR_KEYS, check_grammar

# Temperatures below this are greedy (the reference's _SAMPLING_EPS).
GREEDY_TEMPERATURE = 1e-6
# Bounds the reference leaves open, so that one small request cannot hold the scheduler
# thread or the memory for long: every step checks each stop string against the text's
# tail, and n multiplies a request.
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
MAX_N = 1024

_FLOAT_KEYS = (
    "temperature",
    "top_p",
    "min_p",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
)
_INT_KEYS = ("min_new_tokens", "top_k", "n")
_OPTIONAL_INT_KEYS = ("max_new_tokens", "sampling_seed")
_BOOL_KEYS = ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim")


@dataclasses.dataclass
class SamplingParams:
    """One request's `sampling_params`, with the reference's defaults (NATIVE_API.md).

    Numbers keep the type the client sent (an int temperature stays an int), so
    error messages print values exactly as the reference does.
    """

    max_new_tokens: int | None = 128  # None: up to the context length
    min_new_tokens: int = 0
    stop: list[str] = dataclasses.field(default_factory=list)
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    n: int = 1
    regex: str | None = None
    json_schema: str | dict[str, Any] | None = None
    ebnf: str | None = None
    structural_tag: str | dict[str, Any] | None = None
    custom_params: dict[str, Any] | None = None
    sampling_seed: int | None = None

    def __post_init__(self) -> None:
        # The API accepts one string or null for `stop`; the engine always sees a list.
        # Empty strings would match at once and end every request: they are dropped.
        stop: Any = self.stop
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        self.stop = [s for s in stop if s]
        self.stop_token_ids = list(dict.fromkeys(self.stop_token_ids or []))  # checked each step

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> SamplingParams:
        """Build from a client's JSON object; ValueError names the offending key."""
        if d is None:
            d = {}
        if not isinstance(d, dict):
            raise ValueError(f"sampling_params must be an object, got {type(d).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key not in known:
                raise ValueError(f"Unknown sampling parameter: {key!r}.")
            kwargs[key] = _checked_type(key, value)
        params = cls(**kwargs)
        params.validate()
        return params

    def validate(self) -> None:
        """Range checks in the reference's order and wording."""
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.top_k < 1 and self.top_k != -1:
            raise ValueError(f"top_k must be -1 (disable) or at least 1, got {self.top_k}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        if not 0.0 <= self.repetition_penalty <= 2.0:
            raise ValueError(f"repetition_penalty must be in [0, 2], got {self.repetition_penalty}.")
        if self.max_new_tokens is not None and self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be at least 0, got {self.max_new_tokens}.")
        upper = self.max_new_tokens if self.max_new_tokens is not None else math.inf
        if not 0 <= self.min_new_tokens <= upper:
            raise ValueError(
                f"min_new_tokens must be in [0, max_new_tokens({self.max_new_tokens})], "
                f"got {self.min_new_tokens}."
            )
        if self.sampling_seed is not None and not -(2**63) <= self.sampling_seed < 2**64:
            # A seed is its 64 bits (`seeds_to_key_data`): a wider one would stand for another (a
            # JSON number past 64 bits even reaches here rounded, as a float).
            raise ValueError(f"sampling_seed must be in [-2**63, 2**64), got {self.sampling_seed}.")
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}.")
        if self.n > MAX_N:
            raise ValueError(f"n may be at most {MAX_N}, got {self.n}.")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop holds {len(self.stop)} strings; at most {MAX_STOP_STRINGS} are served.")
        longest = max(map(len, self.stop), default=0)
        if longest > MAX_STOP_STRING_CHARS:
            raise ValueError(
                f"stop strings may be up to {MAX_STOP_STRING_CHARS} characters long, got one of {longest}."
            )
        for token_id in self.stop_token_ids:
            if token_id < 0:
                raise ValueError(f"stop_token_ids must be non-negative token ids, got {token_id}.")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(
                f"stop_token_ids holds {len(self.stop_token_ids)} distinct ids; at most "
                f"{MAX_STOP_TOKEN_IDS} are served."
            )
        grammars = [key for key in GRAMMAR_KEYS if getattr(self, key) is not None]
        if len(grammars) > 1:
            raise ValueError("Only one of regex, json_schema, or ebnf can be set.")
        if grammars and self.structural_tag is not None:
            raise ValueError("structural_tag cannot be set with regex, json_schema or ebnf.")
        check_grammar(self)

    def verify(self, vocab_size: int) -> None:
        """Checks that need the model: stop token ids must lie inside the vocabulary."""
        self.validate()
        for token_id in self.stop_token_ids:
            if not 0 <= token_id < vocab_size:
                raise ValueError(
                    f"stop_token_ids contains {token_id}, outside the vocabulary [0, {vocab_size})."
                )

    @property
    def is_greedy(self) -> bool:
        """Argmax decoding: the same rule `sample` applies on the device."""
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    def for_sample(self, sample_index: int) -> SamplingParams:
        """A copy for sample `sample_index` of n; a seeded request's sample j uses seed + j, so
        the samples differ."""
        seed = self.sampling_seed
        if seed is not None:
            seed += sample_index
            if seed >= 2**64:  # the same 64 bits, in range
                seed -= 2**64
        return dataclasses.replace(self, n=1, sampling_seed=seed)


def _type_error(key: str, expected: str, value: Any) -> ValueError:
    return ValueError(f"{key} must be {expected}, got {value!r}.")


def _as_int(key: str, value: Any) -> int:
    """JSON has one number type: 128.0 is accepted as 128, 1.5 and true are not."""
    if isinstance(value, bool):
        raise _type_error(key, "an integer", value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise _type_error(key, "an integer", value)


def _checked_type(key: str, value: Any) -> Any:
    """The value of `key` if its JSON type fits (integral floats become ints), else ValueError."""
    if key in _FLOAT_KEYS:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _type_error(key, "a number", value)
        if not math.isfinite(value):
            raise _type_error(key, "a finite number", value)
        return value
    if key in _INT_KEYS:
        return _as_int(key, value)
    if key in _OPTIONAL_INT_KEYS:
        return None if value is None else _as_int(key, value)
    if key in _BOOL_KEYS:
        if not isinstance(value, bool):
            raise _type_error(key, "a boolean", value)
        return value
    if key == "stop":
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(s, str) for s in value):
            return value
        raise _type_error(key, "a string or a list of strings", value)
    if key == "stop_token_ids":
        if value is None:
            return None
        if isinstance(value, list):
            return [_as_int(key, v) for v in value]
        raise _type_error(key, "a list of integers", value)
    if key in ("regex", "ebnf"):
        if value is not None and not isinstance(value, str):
            raise _type_error(key, "a string", value)
        return value
    if key in ("json_schema", "structural_tag"):
        if value is not None and not isinstance(value, str | dict):
            raise _type_error(key, "a string or an object", value)
        return value
    if key == "custom_params":
        if value is not None and not isinstance(value, dict):
            raise _type_error(key, "an object", value)
        return value
    raise AssertionError(f"no type rule for sampling parameter {key!r}")
