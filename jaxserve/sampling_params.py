"""Per-request sampling parameters (vLLM-compatible names, defaults and ranges).

`SamplingParams` is a frozen, hashable dataclass. `__post_init__` checks the types and
ranges of every field and normalises the container fields:

- `top_k=-1` becomes 0 (both mean "disabled"),
- `stop` (None | str | list of str) becomes a tuple of str,
- `stop_token_ids` becomes a tuple of int,
- `logit_bias` (None | dict[int, float] | pairs) becomes a sorted tuple of (id, bias) pairs,
- numeric fields become plain Python `int` / `float` (numpy scalars are accepted),
- `structured_outputs` (None | StructuredOutputsParams | a dict of its fields) becomes a
  StructuredOutputsParams, whose JSON schema is canonical JSON text.

Every invalid value raises `ValueError` naming the field, the allowed range and the value
got. Every number is bounded to what the engine's fixed-width arrays hold: counts and token
ids to int32, floats to finite float32 values, seeds to 64 bits (signed or unsigned, as
vLLM). Checks that need the model (vocabulary size) live in `validate_for_model`; the context
length check belongs to the engine, which knows the prompt length.
"""

from __future__ import annotations

import dataclasses
import json as _json
import math
import numbers
from collections.abc import Mapping
from typing import Any

MAX_LOGPROBS = 20  # most top logprobs a request may ask for per token
MAX_LOGIT_BIAS = 100.0  # |logit_bias| bound, as OpenAI
# Temperatures below this are treated as greedy (vLLM's _SAMPLING_EPS): dividing logits by
# a tiny temperature only amplifies noise and can overflow.
GREEDY_TEMPERATURE_EPS = 1e-5
# Stop strings are searched on every output chunk: bound their number and length.
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
INT32_MAX = 2**31 - 1  # counts (n, top_k, max_tokens, min_tokens) and token ids
FLOAT32_MAX = 3.4028234663852886e38  # |float field| bound: the device columns are float32
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # signed or unsigned 64-bit


def _fail(name: str, rule: str, value: Any) -> ValueError:
    return ValueError(f"{name} must be {rule}, got {value!r}")


def _as_int(name: str, value: Any) -> int:
    # bool is an int subclass; accepting it would hide bugs like top_k=True.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _fail(name, "an int", value)
    return int(value)


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _fail(name, "a number", value)
    try:
        value = float(value)
    except OverflowError:  # an int beyond the float range
        raise _fail(name, "finite", value) from None
    if not math.isfinite(value):
        raise _fail(name, "finite", value)
    if abs(value) > FLOAT32_MAX:
        raise _fail(name, f"within the float32 range (|x| <= {FLOAT32_MAX:.4g})", value)
    return value


def _as_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(name, "a bool", value)
    return value


def _as_stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (list, tuple)):
        raise _fail("stop", "None, a str or a list of str", value)
    if len(value) > MAX_STOP_STRINGS:
        raise ValueError(f"stop must hold at most {MAX_STOP_STRINGS} strings, got {len(value)}")
    for s in value:
        if not isinstance(s, str) or not s:
            raise _fail("stop", "non-empty strings", s)
        if len(s) > MAX_STOP_STRING_CHARS:
            raise ValueError(f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters, got {len(s)}")
    return tuple(value)


def _as_token_ids(name: str, value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise _fail(name, "a list of int", value)
    ids = tuple(_as_int(name, t) for t in value)
    for t in ids:
        if not 0 <= t <= INT32_MAX:
            raise _fail(name, f"token ids in [0, {INT32_MAX}]", t)
    return ids


def _as_logit_bias(value: Any) -> tuple[tuple[int, float], ...] | None:
    if value is None:
        return None
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, (list, tuple)):
        items = list(value)
        if not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in items):
            raise _fail("logit_bias", "a dict[int, float] or (id, bias) pairs", value)
    else:
        raise _fail("logit_bias", "None or a dict[int, float]", value)
    out: dict[int, float] = {}
    for k, v in items:
        tid = _as_int("logit_bias key", k)
        if not 0 <= tid <= INT32_MAX:
            raise _fail("logit_bias key", f"a token id in [0, {INT32_MAX}]", tid)
        bias = _as_float("logit_bias value", v)
        if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
            raise _fail("logit_bias value", f"in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]", bias)
        out[tid] = bias
    return tuple(sorted(out.items()))


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample one request's completion(s); see vLLM's SamplingParams."""

    n: int = 1  # completions per prompt
    temperature: float = 1.0  # >= 0; 0 (or < GREEDY_TEMPERATURE_EPS) is greedy
    top_p: float = 1.0  # (0, 1]; 1 = off
    top_k: int = 0  # >= 0; 0 (or -1 on input) = off
    min_p: float = 0.0  # [0, 1]; 0 = off
    repetition_penalty: float = 1.0  # > 0; 1 = off; over prompt + output tokens
    presence_penalty: float = 0.0  # [-2, 2]; over output tokens
    frequency_penalty: float = 0.0  # [-2, 2]; over output tokens
    seed: int | None = None  # [-2**63, 2**64); the engine reduces it mod 2**31
    max_tokens: int | None = 16  # >= 1; None = up to the context length
    min_tokens: int = 0  # EOS / stop_token_ids banned until this many tokens
    stop: tuple[str, ...] = ()  # stop strings; accepts None | str | list[str]
    stop_token_ids: tuple[int, ...] = ()  # extra stop token ids; accepts a list
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs per token, [0, MAX_LOGPROBS]
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Additive bias per token id, in [-100, 100]; accepts dict[int, float], stored as a
    # sorted tuple of (id, bias) pairs so the dataclass stays hashable.
    logit_bias: tuple[tuple[int, float], ...] | None = None
    # Constrained decoding (JSON schema, regex, choice, grammar); accepts a dict of its fields.
    structured_outputs: "StructuredOutputsParams | None" = None
    # Top logprobs per prompt position (vLLM): each prompt token's logprob and the top k at its
    # position, in RequestOutput.prompt_logprobs (position 0 is None); [0, MAX_LOGPROBS].
    prompt_logprobs: int | None = None
    # Samples to generate, of which the n with the highest cumulative logprob are returned
    # (vLLM); None = n. Needs best_of >= n and sampling (temperature > 0) when best_of > n.
    best_of: int | None = None

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        for name in ("n", "top_k", "min_tokens"):
            set_(name, _as_int(name, getattr(self, name)))
        for name in ("temperature", "top_p", "min_p", "repetition_penalty",
                     "presence_penalty", "frequency_penalty"):
            set_(name, _as_float(name, getattr(self, name)))
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            set_(name, _as_bool(name, getattr(self, name)))
        for name in ("seed", "max_tokens", "logprobs", "prompt_logprobs", "best_of"):
            if getattr(self, name) is not None:
                set_(name, _as_int(name, getattr(self, name)))
        if self.top_k == -1:
            set_("top_k", 0)
        set_("stop", _as_stop(self.stop))
        set_("stop_token_ids", _as_token_ids("stop_token_ids", self.stop_token_ids))
        set_("logit_bias", _as_logit_bias(self.logit_bias))
        set_("structured_outputs", as_structured_outputs(self.structured_outputs))
        self._check_ranges()

    def _check_ranges(self) -> None:
        checks = [
            ("n", 1 <= self.n <= INT32_MAX, f"in [1, {INT32_MAX}]"),
            ("temperature", self.temperature >= 0, ">= 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", 0 <= self.top_k <= INT32_MAX, f"in [0, {INT32_MAX}] (or -1 to disable)"),
            ("min_p", 0 <= self.min_p <= 1, "in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "in [-2, 2]"),
            ("max_tokens", self.max_tokens is None or 1 <= self.max_tokens <= INT32_MAX,
             f"in [1, {INT32_MAX}] or None"),
            ("min_tokens", 0 <= self.min_tokens <= INT32_MAX, f"in [0, {INT32_MAX}]"),
            ("seed", self.seed is None or SEED_MIN <= self.seed <= SEED_MAX,
             "in [-2**63, 2**64 - 1] (64 bits) or None"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
             f"in [0, {MAX_LOGPROBS}] or None"),
            ("prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
             f"in [0, {MAX_LOGPROBS}] or None"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise _fail(name, rule, getattr(self, name))
        if self.best_of is not None:
            if not self.n <= self.best_of <= INT32_MAX:
                raise _fail("best_of", f"in [n ({self.n}), {INT32_MAX}] or None", self.best_of)
            if self.best_of > self.n and self.is_greedy:
                raise _fail("best_of", f"n ({self.n}) with greedy sampling (every sample is the same)", self.best_of)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise _fail("min_tokens", f"<= max_tokens ({self.max_tokens})", self.min_tokens)

    @property
    def is_greedy(self) -> bool:
        """True when sampling reduces to argmax (temperature ~ 0 or top_k == 1)."""
        return self.temperature < GREEDY_TEMPERATURE_EPS or self.top_k == 1

    @property
    def needs_penalties(self) -> bool:
        """True when any repetition / presence / frequency penalty is active."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    @property
    def num_logprobs(self) -> int:
        """Top logprobs wanted per token; 0 when `logprobs` is None."""
        return self.logprobs or 0

    @property
    def logit_bias_dict(self) -> dict[int, float]:
        """`logit_bias` as a fresh dict ({} when None)."""
        return dict(self.logit_bias or ())

    def validate_for_model(self, *, vocab_size: int) -> None:
        """Check top_k and the token ids in `stop_token_ids` and `logit_bias` against the
        vocabulary (top_k may equal vocab_size, as vLLM: the whole vocabulary)."""
        if self.top_k > vocab_size:
            raise _fail("top_k", f"<= vocab_size ({vocab_size}) (or 0 / -1 to disable)", self.top_k)
        for t in self.stop_token_ids:
            if t >= vocab_size:
                raise _fail("stop_token_ids", f"< vocab_size ({vocab_size})", t)
        for t, _ in self.logit_bias or ():
            if t >= vocab_size:
                raise _fail("logit_bias key", f"< vocab_size ({vocab_size})", t)


# -- structured outputs (vLLM's StructuredOutputsParams) ---------------------------------

MAX_GRAMMAR_CHARS = 1 << 20  # a schema / regex / grammar larger than 1 MiB is refused
MAX_CHOICES = 4096
_STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclasses.dataclass(frozen=True)
class StructuredOutputsParams:
    """Constrains a request's output to a JSON schema, a regex, one of a list of strings, or a
    grammar (Lark, or GBNF as llama.cpp writes it); vLLM's names. Exactly one is set.

    `json` accepts a dict or a JSON string and is stored as canonical JSON text (sorted keys),
    so equal schemas share one compiled grammar and the dataclass stays hashable; `choice`
    accepts a list and is stored as a tuple. `json_object=True` is any JSON object (OpenAI's
    response_format json_object).

    disable_any_whitespace: JSON is written with fixed separators (", " and ": ") and no other
    whitespace. True by default here (vLLM's default is False): with free whitespace a model
    can emit whitespace until max_tokens, a known failure of constrained JSON. Set False for
    free whitespace between JSON tokens.
    """

    json: str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = True

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        if self.json is not None:
            set_("json", _as_schema_text(self.json))
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, str) or not value:
                    raise _fail(f"structured_outputs.{name}", "a non-empty string", value)
                _check_size(f"structured_outputs.{name}", len(value))
        if self.choice is not None:
            set_("choice", _as_choice(self.choice))
        if self.json_object is not None:
            _as_bool("structured_outputs.json_object", self.json_object)
            if not self.json_object:
                set_("json_object", None)
        _as_bool("structured_outputs.disable_any_whitespace", self.disable_any_whitespace)
        given = [k for k in _STRUCTURED_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"structured_outputs must set exactly one of {', '.join(_STRUCTURED_KINDS)}, "
                             f"got {', '.join(given) or 'none'}")

    @property
    def kind(self) -> str:
        """Which constraint is set: json | regex | choice | grammar | json_object."""
        return next(k for k in _STRUCTURED_KINDS if getattr(self, k) is not None)

    @property
    def spec(self) -> str:
        """The constraint as text: the schema's JSON, the regex, the grammar, the choices as a
        JSON list, or the any-object schema."""
        kind = self.kind
        if kind == "choice":
            return _json.dumps(list(self.choice))
        if kind == "json_object":
            return '{"type": "object"}'
        return getattr(self, kind)


def _check_size(name: str, n: int) -> None:
    if n > MAX_GRAMMAR_CHARS:
        raise ValueError(f"{name} must be at most {MAX_GRAMMAR_CHARS} characters, got {n}")


def _as_schema_text(value: Any) -> str:
    name = "structured_outputs.json"
    if isinstance(value, str):
        _check_size(name, len(value))
        try:
            value = _json.loads(value)
        except ValueError as e:
            raise ValueError(f"{name} must be a JSON schema, got text that is not JSON: {e}") from None
    if not isinstance(value, (Mapping, bool)):
        raise _fail(name, "a JSON schema (an object, or true / false)", value)
    try:
        text = _json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be JSON-serialisable: {e}") from None
    _check_size(name, len(text))
    return text


def _as_choice(value: Any) -> tuple[str, ...]:
    name = "structured_outputs.choice"
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise _fail(name, "a list of strings", value)
    if not 1 <= len(value) <= MAX_CHOICES:
        raise ValueError(f"{name} must hold 1 to {MAX_CHOICES} strings, got {len(value)}")
    if not all(isinstance(c, str) for c in value):
        raise _fail(name, "a list of strings", value)
    _check_size(name, sum(len(c) for c in value))
    return tuple(value)


def as_structured_outputs(value: Any) -> StructuredOutputsParams | None:
    """None, a StructuredOutputsParams, or a dict of its fields (unknown fields refused)."""
    if value is None or isinstance(value, StructuredOutputsParams):
        return value
    if isinstance(value, Mapping):
        known = {f.name for f in dataclasses.fields(StructuredOutputsParams)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"structured_outputs has unknown fields {', '.join(map(str, unknown))}; "
                             f"known: {', '.join(sorted(known))}")
        return StructuredOutputsParams(**value)
    raise _fail("structured_outputs", "a StructuredOutputsParams, a dict or None", value)
