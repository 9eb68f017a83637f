"""Test cases for constrained decoding: 50 JSON schemas built from a seeded mix of the features
schemas use (nested objects, arrays, enums, bounded numbers, required and optional fields,
anyOf, formats of strings), plus regexes and choices. Strings, arrays and decimals (multipleOf)
are bounded, as strict schemas usually are, so that every valid output fits the token budget the
tests give: an unbounded decimal lets a small greedy model write 0.000... until max_tokens."""

from __future__ import annotations

import random

NAMES = ["name", "city", "title", "color", "code", "label", "kind", "owner", "status", "note", "tag", "unit"]


def _leaf(rng: random.Random) -> dict:
    pick = rng.randrange(7)
    if pick == 0:
        return {"type": "string", "maxLength": rng.randint(1, 16)}
    if pick == 1:
        lo = rng.randint(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(1, 500)}
    if pick == 2:
        return {"type": "number", "minimum": 0, "maximum": rng.choice([1, 10, 100]), "multipleOf": 0.01}
    if pick == 3:
        return {"type": "boolean"}
    if pick == 4:
        return {"enum": rng.sample(["red", "green", "blue", "small", "large", "yes", "no", "maybe"], rng.randint(2, 4))}
    if pick == 5:
        return {"type": "string", "pattern": rng.choice(["^[A-Z]{2}[0-9]{3}$", "^[a-z]+$", "^#[0-9a-f]{6}$"]),
                "maxLength": 8}  # fmt: skip
    return {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "string", "maxLength": 5}]}


def _node(rng: random.Random, depth: int) -> dict:
    roll = rng.random()
    if depth < 2 and roll < 0.25:
        return _object(rng, depth + 1)
    if depth < 2 and roll < 0.45:
        return {"type": "array", "items": _node(rng, depth + 1), "minItems": rng.randint(0, 1),
                "maxItems": rng.randint(1, 3)}  # fmt: skip
    return _leaf(rng)


def _object(rng: random.Random, depth: int) -> dict:
    keys = rng.sample(NAMES, rng.randint(1, 4 if depth else 5))
    props = {k: _node(rng, depth) for k in keys}
    required = [k for k in keys if rng.random() < 0.6] or keys[:1]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def json_schemas(count: int = 50) -> list[dict]:
    rng = random.Random(16)
    schemas = [_object(rng, 0) for _ in range(count - 5)]
    schemas += [  # a few by hand: the shapes applications send most
        {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "confidence": {"type": "number",
         "minimum": 0, "maximum": 1, "multipleOf": 0.05}}, "required": ["answer", "confidence"],
         "additionalProperties": False},
        {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 99}, "minItems": 2, "maxItems": 4},
        {"type": "object", "properties": {"person": {"type": "object", "properties": {
            "first": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
            "required": ["first", "age"], "additionalProperties": False}, "emails": {"type": "array", "items": {
            "type": "string", "maxLength": 20}, "maxItems": 2}}, "required": ["person"], "additionalProperties": False},
        {"anyOf": [{"type": "object", "properties": {"ok": {"const": True}}, "required": ["ok"],
                    "additionalProperties": False},
                   {"type": "object", "properties": {"error": {"type": "string", "maxLength": 10}},
                    "required": ["error"], "additionalProperties": False}]},
        {"type": "object", "properties": {"date": {"type": "string", "format": "date"},
         "count": {"type": "integer", "minimum": 0, "maximum": 5}}, "required": ["date", "count"],
         "additionalProperties": False},
    ]  # fmt: skip
    return schemas


REGEXES = [r"\d{4}-\d{2}-\d{2}", r"[A-Z][a-z]{2,8}", r"(yes|no|maybe)", r"#[0-9a-f]{6}", r"\(\d{3}\) \d{3}-\d{4}",
           r"[a-z]{3,8}@[a-z]{3,8}\.(com|org)"]  # fmt: skip
CHOICES = [["positive", "negative", "neutral"], ["Paris", "London", "Rome", "Berlin"], ["A", "B", "C", "D"]]
