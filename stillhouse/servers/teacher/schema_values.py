"""Answers made from a JSON schema alone: the smallest valid value, and a valid wrong one.

``example_value`` is what the ``fixed`` backend answers, and what a model backend puts in the
properties it has nothing for. ``wrong_answer`` is the ``wrong`` fault: an answer that still
validates against the schema but is not the one the backend gave (another ``enum`` value, a
reversed ``ranking``, an array that lost an item).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

__all__ = ["example_value", "fill_answer", "wrong_answer"]

_FORMATS = {
    "date": "2000-01-01",
    "date-time": "2000-01-01T00:00:00Z",
    "time": "00:00:00Z",
    "email": "teacher@example.com",
    "uri": "https://example.com/",
    "uuid": "00000000-0000-0000-0000-000000000000",
}


def example_value(schema: object) -> Any:
    """A small value that validates against ``schema`` (first enum value, 1.0, "", [] ...)."""
    if not isinstance(schema, Mapping):
        return {}
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    for key in ("anyOf", "oneOf", "allOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            return example_value(options[0])
    return _typed_value(schema, _type(schema))


def _type(schema: Mapping[str, Any]) -> str:
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if isinstance(kind, str):
        return kind
    return "object" if "properties" in schema else "array" if "items" in schema else "string"


def _typed_value(schema: Mapping[str, Any], kind: str) -> Any:
    if kind == "object":
        properties = schema.get("properties")
        if not isinstance(properties, Mapping):
            return {}
        return {name: example_value(sub) for name, sub in properties.items()}
    if kind == "array":
        return [example_value(schema.get("items"))] * int(schema.get("minItems", 0))
    if kind == "string":
        text = _FORMATS.get(str(schema.get("format")), "")
        return text or "x" * int(schema.get("minLength", 0))
    if kind in ("number", "integer"):
        return _number(schema, integer=kind == "integer")
    return {"boolean": True, "null": None}.get(kind)


def _number(schema: Mapping[str, Any], *, integer: bool) -> float | int:
    """1.0 (or 1) when the bounds allow it, else a value between them."""
    low = schema.get("minimum", schema.get("exclusiveMinimum"))
    high = schema.get("maximum", schema.get("exclusiveMaximum"))
    value: float = 1.0
    too_low = low is not None and (value < low or (value == low and "exclusiveMinimum" in schema))
    too_high = high is not None and (
        value > high or (value == high and "exclusiveMaximum" in schema)
    )
    if too_low or too_high:
        if low is not None and high is not None:
            value = (low + high) / 2
        else:
            value = low + 1 if low is not None else high - 1
    return round(value) if integer else float(value)


def wrong_answer(answer: object, schema: object, rng: random.Random) -> object:
    """A schema-valid answer that differs from ``answer``; unchanged when none can be made."""
    if not isinstance(answer, dict) or not isinstance(schema, Mapping):
        return answer
    properties = schema.get("properties")
    if not isinstance(properties, Mapping):
        return answer
    for change in (_other_enum_value, _reversed_ranking, _shorter_array):
        wrong = change(answer, properties, rng)
        if wrong is not None:
            return wrong
    return answer


def _other_enum_value(
    answer: dict[str, Any], properties: Mapping[str, Any], rng: random.Random
) -> dict[str, Any] | None:
    for name, value in answer.items():
        sub = properties.get(name)
        enum = sub.get("enum") if isinstance(sub, Mapping) else None
        if isinstance(enum, list):
            others = [option for option in enum if option != value]
            if others:
                return {**answer, name: rng.choice(others)}
    return None


def _reversed_ranking(
    answer: dict[str, Any], properties: Mapping[str, Any], rng: random.Random
) -> dict[str, Any] | None:
    ranking = answer.get("ranking")
    if not isinstance(ranking, list) or len(ranking) < 2:
        return None
    wrong = {**answer, "ranking": ranking[::-1]}
    scores = answer.get("scores")
    if isinstance(scores, dict):  # keep scores descending along the (wrong) order
        values = sorted(scores.values(), reverse=True)
        wrong["scores"] = dict(zip(ranking[::-1], values, strict=False))
    return wrong


def _shorter_array(
    answer: dict[str, Any], properties: Mapping[str, Any], rng: random.Random
) -> dict[str, Any] | None:
    for name, value in answer.items():
        sub = properties.get(name)
        least = int(sub.get("minItems", 0)) if isinstance(sub, Mapping) else 0
        if isinstance(value, list) and len(value) > least:
            return {**answer, name: value[1:]}
    return None


def fill_answer(schema: Mapping[str, Any] | None, answer: dict[str, Any]) -> dict[str, Any]:
    """``answer`` cut to the schema's properties, with example values where it has none."""
    properties = schema.get("properties") if schema is not None else None
    if not isinstance(properties, Mapping):
        return answer
    return {
        name: answer[name] if name in answer else example_value(sub)
        for name, sub in properties.items()
    }
