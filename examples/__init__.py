"""Bundled example sources (real corpora read from installed packages) and specs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from importlib import import_module
from typing import Any

__all__ = ["SOURCES", "builtin_source"]

# Built-in source name -> "module:function"; each function takes ``limit`` and yields rows.
SOURCES = {
    "bbc": "examples.bbc:iter_bbc",
    "bbc-business": "examples.bbc:iter_bbc_business",
    "bbc-ranking": "examples.ranking:iter_ranking",
    "wnut": "examples.wnut:iter_wnut",
    "wnut-tweets": "examples.wnut:iter_tweets",
}


def builtin_source(name: str) -> Callable[[int | None], Iterator[dict[str, Any]]]:
    """The row generator of a built-in source (imported only when used)."""
    module, function = SOURCES[name].split(":")
    found: Callable[[int | None], Iterator[dict[str, Any]]] = getattr(
        import_module(module), function
    )
    return found
