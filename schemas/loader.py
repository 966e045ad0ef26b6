"""Load the bundled JSON Schemas and compile validators once, not per document."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, ValidationError

__all__ = ["compile_validator", "error_path", "load_schema", "schema_problems", "spec_validator"]


@lru_cache(maxsize=16)
def load_schema(name: str) -> dict[str, Any]:
    """Return a bundled schema by file stem, e.g. ``load_schema("spec")``."""
    text = (resources.files("schemas") / f"{name}.schema.json").read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


@lru_cache(maxsize=1)
def spec_validator() -> Draft202012Validator:
    """The compiled validator for spec files."""
    return Draft202012Validator(load_schema("spec"))


def compile_validator(schema: dict[str, Any]) -> Draft202012Validator:
    """Compile a Draft 2020-12 validator with format checks; raises SchemaError if invalid."""
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def error_path(error: ValidationError | SchemaError) -> str:
    """Render a validation error's location as a JSON path such as ``$.teacher.model``."""
    path = "$"
    for part in error.absolute_path:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def schema_problems(validator: Draft202012Validator, instance: Any) -> list[tuple[str, str]]:
    """All violations of ``instance`` as (json path, message), sorted by path."""
    found = [(error_path(e), e.message) for e in validator.iter_errors(instance)]
    return sorted(found)
