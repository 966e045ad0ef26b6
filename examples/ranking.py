"""Ranking queries built from the BBC News corpus: which article does a headline belong to?

Each BBC headline is a query; its candidates are the opening of its own article, two other
articles on the same topic and three on other topics, shuffled with a seeded RNG so the right
answer is not always first. The known-good record is graded relevance: 2 for the headline's
own article, 1 for the same topic, 0 for another topic.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from functools import cache
from typing import Any

from examples.bbc import iter_bbc

__all__ = ["CANDIDATE_WORDS", "iter_ranking", "render_candidates"]

CANDIDATE_WORDS = 60  # words of each candidate's body shown to the teacher
SAME_TOPIC = 2
OTHER_TOPIC = 3


@cache
def _corpus() -> dict[str, list[dict[str, Any]]]:
    """Every BBC article, grouped by topic, each list in file order."""
    by_topic: dict[str, list[dict[str, Any]]] = {}
    for row in iter_bbc(None):
        by_topic.setdefault(row["queue"], []).append(row)
    return by_topic


def _key(row: dict[str, Any]) -> str:
    """A candidate id: the article id without its ``bbc/`` prefix (``business/001``)."""
    return str(row["id"]).removeprefix("bbc/")


def _snippet(row: dict[str, Any]) -> str:
    """The first words of an article's body, with angle brackets kept out of the markup."""
    words = row["body"].replace("<", "(").replace(">", ")").split()
    return " ".join(words[:CANDIDATE_WORDS])


def render_candidates(candidates: list[dict[str, Any]]) -> str:
    """The ``<candidate id="ID">text</candidate>`` blocks of a ranking prompt, one a line."""
    return "\n".join(f'<candidate id="{_key(c)}">{_snippet(c)}</candidate>' for c in candidates)


def _candidates(query: dict[str, Any], rng: random.Random) -> list[dict[str, Any]]:
    """The query's own article, same-topic and other-topic articles, in a shuffled order."""
    corpus = _corpus()
    topic = query["queue"]
    same = rng.sample([r for r in corpus[topic] if r["id"] != query["id"]], SAME_TOPIC)
    others = rng.sample(sorted(t for t in corpus if t != topic), OTHER_TOPIC)
    picked = [query, *same, *(rng.choice(corpus[t]) for t in others)]
    rng.shuffle(picked)
    return picked


def iter_ranking(limit: int | None = None) -> Iterator[dict[str, Any]]:
    """Yield ranking rows: id, query, candidates (rendered), topic, relevance (known-good).

    Queries are BBC headlines interleaved across topics; every choice is seeded by the
    article id, so the same ``limit`` always gives the same rows.
    """
    for query in iter_bbc(limit):
        rng = random.Random(f"stillhouse-ranking/{query['id']}")
        candidates = _candidates(query, rng)
        grades = {
            _key(c): 2 if c["id"] == query["id"] else 1 if c["queue"] == query["queue"] else 0
            for c in candidates
        }
        # Listed best first (ties by id), so the reference order read from it is stable.
        relevance = dict(sorted(grades.items(), key=lambda kv: (-kv[1], kv[0])))
        yield {
            "id": f"rank/{_key(query)}",
            "query": query["headline"],
            "candidates": render_candidates(candidates),
            "topic": query["queue"],
            "relevance": relevance,
        }
