"""The markup a ranking item carries: a ``<query>…</query>`` block and
``<candidate id="ID">text</candidate>`` blocks (the spec's ``markup_fields`` keep them intact).
One reader, for the local teacher and the ranking student, so both see the same candidates."""

from __future__ import annotations

import re

__all__ = ["read_ranking"]

_QUERY = re.compile(r"<query>(.*?)</query>", re.DOTALL)
_CANDIDATE = re.compile(
    r"""<candidate\s+id\s*=\s*(?:"([^"]*)"|'([^']*)')\s*>(.*?)</candidate>""", re.DOTALL
)


def read_ranking(text: str) -> tuple[str | None, tuple[tuple[str, str], ...]]:
    """The query (the last block's, stripped; None without one) and the candidates as
    ``(id, text)`` in order, a repeated id keeping its first text."""
    queries = _QUERY.findall(text)
    candidates: dict[str, str] = {}
    for double, single, body in _CANDIDATE.findall(text):
        candidates.setdefault(double or single, body.strip())
    query = str(queries[-1]).strip() if queries else None
    return query, tuple(candidates.items())
