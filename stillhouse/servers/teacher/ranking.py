"""The ranking convention the local teacher understands, shared by every backend.

A request asks for an *ordering* when its answer schema has a property ``ranking`` (an array
of strings: candidate ids). The prompt then holds one ``<query>…</query>`` block and the
candidates as ``<candidate id="ID">text</candidate>`` blocks::

    <query>Ad sales boost Time Warner profit</query>
    <candidate id="a">Quarterly profits at US media giant TimeWarner jumped…</candidate>
    <candidate id="b">The dollar has hit its highest level against the euro…</candidate>

The answer lists every candidate id, most relevant first, and, when the schema also has a
``scores`` property, maps each id to its score (cosine similarity rounded to 4 decimals for
the embedding backend)::

    {"ranking": ["a", "b"], "scores": {"a": 0.6121, "b": 0.1873}}
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from stillhouse.servers.teacher.protocol import ChatRequest, RequestError

__all__ = ["RankingTask", "parse_ranking", "render_ranking", "wants_ranking"]

_QUERY = re.compile(r"<query>(.*?)</query>", re.DOTALL)
_CANDIDATE = re.compile(
    r"""<candidate\s+id\s*=\s*(?:"([^"]*)"|'([^']*)')\s*>(.*?)</candidate>""", re.DOTALL
)


@dataclass(frozen=True)
class RankingTask:
    """One ranking request: the query, the ``(id, text)`` candidates, and whether to score."""

    query: str
    candidates: tuple[tuple[str, str], ...]
    with_scores: bool


def wants_ranking(schema: Mapping[str, Any] | None) -> bool:
    """Whether the answer schema asks for an ordering (it has a ``ranking`` property)."""
    properties = schema.get("properties") if schema is not None else None
    return isinstance(properties, Mapping) and "ranking" in properties


def parse_ranking(request: ChatRequest) -> RankingTask:
    """The query and candidates of a ranking prompt, or ``RequestError`` saying what lacks."""
    queries = _QUERY.findall(request.prompt)
    if not queries:
        raise RequestError("a ranking request needs a '<query>…</query>' block in the prompt")
    candidates: dict[str, str] = {}
    for double, single, text in _CANDIDATE.findall(request.prompt):
        candidates.setdefault(double or single, text.strip())
    if not candidates:
        raise RequestError(
            "a ranking request needs '<candidate id=\"ID\">text</candidate>' blocks in the prompt"
        )
    properties = request.schema.get("properties", {}) if request.schema else {}
    return RankingTask(
        query=str(queries[-1]).strip(),
        candidates=tuple(candidates.items()),
        with_scores="scores" in properties,
    )


def render_ranking(task: RankingTask, scores: Sequence[float]) -> str:
    """The answer JSON: ids by descending score (ties keep prompt order), scores if asked."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    ids = [task.candidates[i][0] for i in order]
    answer: dict[str, object] = {"ranking": ids}
    if task.with_scores:
        answer["scores"] = {task.candidates[i][0]: round(float(scores[i]), 4) for i in order}
    return json.dumps(answer)
