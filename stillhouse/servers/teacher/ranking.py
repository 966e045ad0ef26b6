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

With a ``confidence`` property as well, the answer states the probability of its whole order
under a Plackett-Luce model of the scores at the backend's temperature (the same one its
classification confidences use): the product, down the order, of each candidate's softmax
share among those not yet placed. An order with clear gaps gets near 1; every near-tie in it
(the first place or any later one) halves it. On BBC ranking this predicts which orderings
pass the NDCG check better than the first candidate's share alone (AUC 0.66 against 0.47).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from schemas.markup import read_ranking
from stillhouse.servers.teacher.protocol import ChatRequest, RequestError

__all__ = [
    "RankingTask",
    "order_probability",
    "parse_ranking",
    "render_ranking",
    "wants_ranking",
]


@dataclass(frozen=True)
class RankingTask:
    """One ranking request: the query, the ``(id, text)`` candidates, and whether to score."""

    query: str
    candidates: tuple[tuple[str, str], ...]
    with_scores: bool
    with_confidence: bool = False


def wants_ranking(schema: Mapping[str, Any] | None) -> bool:
    """Whether the answer schema asks for an ordering (it has a ``ranking`` property)."""
    properties = schema.get("properties") if schema is not None else None
    return isinstance(properties, Mapping) and "ranking" in properties


def parse_ranking(request: ChatRequest) -> RankingTask:
    """The query and candidates of a ranking prompt, or ``RequestError`` saying what lacks."""
    query, candidates = read_ranking(request.prompt)
    if query is None:
        raise RequestError("a ranking request needs a '<query>…</query>' block in the prompt")
    if not candidates:
        raise RequestError(
            "a ranking request needs '<candidate id=\"ID\">text</candidate>' blocks in the prompt"
        )
    properties = request.schema.get("properties", {}) if request.schema else {}
    return RankingTask(
        query=query,
        candidates=candidates,
        with_scores="scores" in properties,
        with_confidence="confidence" in properties,
    )


def order_probability(ordered: Sequence[float], temperature: float) -> float:
    """Plackett-Luce: the probability of drawing ``ordered`` (scores, best first) one by one,
    each in proportion to ``exp(score / temperature)`` among those left."""
    probability = 1.0
    for k in range(len(ordered) - 1):
        rest = ordered[k:]
        top = max(rest)
        mass = sum(math.exp((float(s) - top) / temperature) for s in rest)
        probability *= math.exp((float(ordered[k]) - top) / temperature) / mass
    return probability


def render_ranking(task: RankingTask, scores: Sequence[float], temperature: float = 0.05) -> str:
    """The answer JSON: ids by descending score (ties keep prompt order), scores and the
    first candidate's softmax probability at ``temperature`` if asked."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    ids = [task.candidates[i][0] for i in order]
    answer: dict[str, object] = {"ranking": ids}
    if task.with_scores:
        answer["scores"] = {task.candidates[i][0]: round(float(scores[i]), 4) for i in order}
    if task.with_confidence:
        answer["confidence"] = round(order_probability([scores[i] for i in order], temperature), 4)
    return json.dumps(answer)
