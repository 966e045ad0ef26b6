"""JSON Schemas for spec files and teacher outputs, and the compiled-validator loader."""

from schemas.errors import ConfigError, SpecError, StillhouseError
from schemas.loader import compile_validator, error_path, load_schema, schema_problems

__all__ = [
    "ConfigError",
    "SpecError",
    "StillhouseError",
    "compile_validator",
    "error_path",
    "load_schema",
    "schema_problems",
]
