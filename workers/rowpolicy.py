"""What a source row may contain: the one place that decides, for every reader and the API.

A row is stored as JSON on SQLite and as JSONB on Postgres, and serialized with orjson on the
way. Some values that a JSON parser (or a Parquet file, a SQL query, a Python caller) hands
over cannot go that way, and one such value would fail a whole chunk or a whole request. Each
has a fate decided here, and the row that holds it is refused with a reason that says what to
send instead; the other rows are kept:

- **Nesting deeper than** :data:`MAX_DEPTH` levels (objects and arrays): refused. orjson
  writes at most 254 levels and Python's parsers stop near 1,000 with a ``RecursionError``;
  no document needs more than a few dozen.
- **Integers beyond 64 bits** (outside ``-2**63 .. 2**63-1``): refused; send them as text.
  orjson cannot write them and SQLite's JSON functions read them as inexact floats. (A JSONL
  reader that parses with orjson reads such a literal as a float, like every parser that
  keeps numbers as doubles; an id read that way is refused for not being text or an integer.)
- **NaN and Infinity**: refused; JSON has no such numbers and Postgres's JSONB refuses them.
  Send ``null`` or text.
- **Lone surrogates** (``"\\ud800"`` without its pair, in a value or a key): refused; they are
  not Unicode text and no database stores them.
- **Keys that are not text** (a Python caller's dict): refused.

Text is otherwise kept as given, control and bidirectional characters included: it is data,
and every place that prints it escapes it (:mod:`stillhouse.output`). NUL characters are the
one exception, removed by the reader (Postgres cannot store them).
"""

from __future__ import annotations

import math
from typing import Any

from schemas.errors import PermanentError

__all__ = ["INT_MAX", "INT_MIN", "MAX_DEPTH", "check_row", "safe_text"]

MAX_DEPTH = 100
INT_MIN, INT_MAX = -(2**63), 2**63 - 1


def safe_text(value: str, limit: int = 80) -> str:
    """``value`` cut to ``limit`` characters, with lone surrogates written as escapes, so it
    can go into a message, a JSON answer or a log."""
    cut = value if len(value) <= limit else value[:limit] + "…"
    return cut.encode("utf-8", "backslashreplace").decode("utf-8")


def _where(path: list[str]) -> str:
    if not path:
        return "the row"
    shown = ".".join(safe_text(p, 40) for p in path)
    return "field " + repr(shown if len(shown) <= 60 else shown[:60] + "…")


def check_row(row: dict[str, Any], *, trusted_scalars: bool = False) -> None:
    """Raise :class:`PermanentError` naming the first value of ``row`` that cannot be stored.

    ``trusted_scalars``: the row was parsed by orjson, which reads no NaN, no Infinity, no
    lone surrogate and no integer beyond 64 bits; only the depth is left to check, and a flat
    row (the common case of a bulk load) costs one pass over its values.
    """
    if trusted_scalars:
        for value in row.values():
            if type(value) is dict or type(value) is list:
                break
        else:
            return
    # Iterative, not recursive: the check must not fail the way it guards against.
    stack: list[tuple[Any, list[str], int]] = [(row, [], 1)]
    while stack:
        value, path, depth = stack.pop()
        kind = type(value)
        if kind is dict:
            if depth > MAX_DEPTH:
                raise PermanentError(
                    f"{_where(path)} is nested over {MAX_DEPTH} levels deep (objects and "
                    f"arrays): flatten it or send it as text"
                )
            # Pushed last to first, so the first bad field in the row's order is the one named.
            for key, item in reversed(value.items()):
                if type(key) is not str:
                    raise PermanentError(f"{_where(path)} has a key that is not text: {key!r}")
                if not trusted_scalars and not _is_unicode(key):
                    raise PermanentError(
                        f"{_where([*path, key])}: the key holds a lone surrogate, not valid Unicode"
                    )
                stack.append((item, [*path, key], depth + 1))
        elif kind is list or kind is tuple:
            if depth > MAX_DEPTH:
                raise PermanentError(
                    f"{_where(path)} is nested over {MAX_DEPTH} levels deep (objects and "
                    f"arrays): flatten it or send it as text"
                )
            for index in range(len(value) - 1, -1, -1):
                stack.append((value[index], [*path, str(index)], depth + 1))
        elif trusted_scalars:
            continue
        elif kind is str:
            if not _is_unicode(value):
                raise PermanentError(
                    f"{_where(path)} holds a lone surrogate (an unpaired \\ud800-\\udfff "
                    f"escape), not valid Unicode text"
                )
        elif kind is int:
            if not INT_MIN <= value <= INT_MAX:
                raise PermanentError(
                    f"{_where(path)} holds an integer beyond 64 bits ({safe_text(str(value), 30)}"
                    f"): send it as text"
                )
        elif kind is float:
            if not math.isfinite(value):
                raise PermanentError(
                    f"{_where(path)} is {value!r}, which JSON cannot hold: send null or text"
                )
        elif value is None or kind is bool:
            continue
        elif isinstance(value, (str, int, float)):  # subclasses (an IntEnum, say)
            base = str if isinstance(value, str) else float if isinstance(value, float) else int
            stack.append((base(value), path, depth))
        else:
            raise PermanentError(
                f"{_where(path)} is a {kind.__name__}, not a JSON value (text, number, "
                f"boolean, null, object or array)"
            )


def _is_unicode(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
