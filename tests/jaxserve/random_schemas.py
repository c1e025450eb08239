"""Random JSON schemas from a seed, for the structured-output tests and the grammar-engine
benchmark (scripts/bench_structured_output.py).

Every schema is an object whose values are bounded: strings have a maxLength or a pattern
with bounded repeats, arrays have maxItems, integers a range, numbers a range, and nesting
stops at `max_depth`. So every instance has a bounded length and a constrained sampler can
finish one within a small max_tokens budget. Features drawn: nested objects, arrays with
minItems / maxItems, enums (string and integer), integers and numbers with ranges (inclusive
and exclusive bounds), required and optional properties, strings with patterns, booleans,
null, `additionalProperties: false`.
"""

from __future__ import annotations

import random
from typing import Any

_WORDS = ["id", "name", "age", "tags", "kind", "score", "items", "meta", "ok", "size", "code", "note", "level",
          "x", "y", "mode", "unit", "count", "flag", "label"]
_PATTERNS = [r"^[a-z]{1,6}$", r"^[A-Z][0-9]{2}$", r"^(yes|no|maybe)$", r"^[0-9]{3}-[0-9]{2}$", r"^[a-f0-9]{4}$",
             r"^v[0-9]\.[0-9]$"]


def random_schema(rng: random.Random, max_depth: int = 2) -> dict[str, Any]:
    """One object schema (see the module doc)."""
    return _object(rng, max_depth, max_props=4)


def random_schemas(n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [random_schema(rng) for _ in range(n)]


def _object(rng: random.Random, depth: int, max_props: int) -> dict[str, Any]:
    names = rng.sample(_WORDS, rng.randint(1, max_props))
    props = {name: _value(rng, depth - 1) for name in names}
    required = [name for name in names if rng.random() < 0.6]
    schema: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        schema["required"] = required
    return schema


def _value(rng: random.Random, depth: int) -> dict[str, Any]:
    kinds = ["string", "pattern", "integer", "number", "boolean", "enum", "int_enum", "null"]
    if depth > 0:
        kinds += ["object", "array", "array"]
    kind = rng.choice(kinds)
    if kind == "string":
        lo = rng.randint(0, 2)
        return {"type": "string", "minLength": lo, "maxLength": lo + rng.randint(0, 6)}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice(_PATTERNS)}
    if kind == "integer":
        lo = rng.randint(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 200)}
    if kind == "number":
        lo = rng.randint(-10, 10)
        key = rng.choice([("minimum", "maximum"), ("exclusiveMinimum", "exclusiveMaximum")])
        return {"type": "number", key[0]: lo, key[1]: lo + rng.randint(1, 20)}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", "on", "off", "a b", "zero"], rng.randint(1, 4))}
    if kind == "int_enum":
        return {"type": "integer", "enum": rng.sample(range(-5, 100), rng.randint(1, 4))}
    if kind == "null":
        return {"type": "null"}
    if kind == "object":
        return _object(rng, depth, max_props=3)
    lo = rng.randint(0, 2)
    return {"type": "array", "items": _value(rng, depth - 1), "minItems": lo, "maxItems": lo + rng.randint(0, 2)}
