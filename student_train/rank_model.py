"""The ranking student's model: a score for each (query, candidate) pair, and the wrapper that
turns a query's candidates into an ordering in the spec's answer shape.

A pair's score is the sum of two parts. A small MLP over the standardized lexical-overlap
features of :mod:`student_train.rank_features` finds the headline's own article (shared rare
words). The dot product of the candidate's encoding (mean of hashed word and bigram
embeddings, then a linear map) with the query's, expanded by the encoding of the candidate
that overlaps the query most (pseudo-relevance feedback), learns what overlap cannot: which
articles are on the headline's topic. On BBC the feedback raised tau-b against the records
from 0.55 to 0.60 and NDCG@5 from 0.944 to 0.952 (418 held-out queries). Only differences
of scores within a query mean anything: the model is trained on the teacher's orderings
(RankNet), never on its scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from student_train.bag import BagOfNgrams
from student_train.features import Bag, pack
from student_train.rank_features import (
    LEXICAL_FEATURES,
    BagHasher,
    FloatArray,
    RankingInput,
    TermStats,
    analyze,
    lexical_features,
    parse_ranking_text,
)

__all__ = ["PairBatch", "PairScorer", "Prepared", "RankingStudent", "order_probability"]


@dataclass(frozen=True, slots=True)
class Prepared:
    """One query featurized: its bag, its candidates' bags and their lexical features."""

    ids: tuple[str, ...]
    query: Bag
    candidates: tuple[Bag, ...]
    features: FloatArray
    top: int  # the candidate that matches the query best by overlap (pseudo-feedback)


@dataclass(frozen=True, slots=True)
class PairBatch:
    """Queries packed for one forward pass: the bags of the queries, then of every candidate
    (one encoder call for both); ``owner`` maps each candidate to its query's bag."""

    bags: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    owner: torch.Tensor
    top: torch.Tensor  # each candidate's query's top candidate, as a candidate index
    features: torch.Tensor

    @classmethod
    def of(cls, queries: Sequence[Prepared], where: torch.device) -> PairBatch:
        """Pack prepared queries onto a device."""
        bags = [q.query for q in queries] + [bag for q in queries for bag in q.candidates]
        counts = np.array([len(q.candidates) for q in queries])
        owner = np.repeat(np.arange(len(queries)), counts)
        starts = np.cumsum(counts) - counts
        top = np.repeat(starts + np.array([q.top for q in queries]), counts)
        features = np.concatenate([q.features for q in queries])
        ids, offsets, weights = (torch.from_numpy(array).to(where) for array in pack(bags))
        return cls(
            (ids, offsets, weights),
            torch.from_numpy(owner).to(where),
            torch.from_numpy(top).to(where),
            torch.from_numpy(features).to(where),
        )


class PairScorer(nn.Module):
    """A score per (query, candidate) pair: lexical MLP plus learned query-candidate match."""

    feature_mean: torch.Tensor
    feature_scale: torch.Tensor

    def __init__(self, buckets: int, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        n_features = len(LEXICAL_FEATURES)
        self.encoder = BagOfNgrams(buckets, dim, dim, dropout)
        # BagOfNgrams starts its output layer at zero, where a dot product of two encodings
        # has no gradient; the identity starts the match at the embeddings' own similarity.
        nn.init.eye_(self.encoder.linear.weight)
        layers: list[nn.Module] = (
            [nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, 1)]
            if hidden
            else [nn.Linear(n_features, 1)]
        )
        self.lexical = nn.Sequential(*layers)
        self.feedback = nn.Parameter(torch.ones(1))
        # Standardization of the lexical features, fitted on the training pairs and saved.
        self.register_buffer("feature_mean", torch.zeros(n_features))
        self.register_buffer("feature_scale", torch.ones(n_features))

    def fit_scaling(self, features: torch.Tensor) -> None:
        """Standardize the lexical features by their training mean and spread."""
        self.feature_mean.copy_(features.mean(dim=0))
        self.feature_scale.copy_(features.std(dim=0).clamp(min=1e-3))

    def forward(self, batch: PairBatch) -> torch.Tensor:
        """One score per candidate of the batch, in its order."""
        scaled = (batch.features - self.feature_mean) / self.feature_scale
        lexical = self.lexical(scaled).squeeze(1)
        encoded = self.encoder(*batch.bags)
        queries, candidates = encoded[: len(encoded) - len(scaled)], encoded[-len(scaled) :]
        # The query's encoding, expanded by its top candidate's: a five-word headline says
        # little of its topic, the article it most likely belongs to says much more.
        expanded = queries.index_select(0, batch.owner) + self.feedback * candidates.index_select(
            0, batch.top
        )
        match = (expanded * candidates).sum(dim=1)
        return lexical + match  # type: ignore[no-any-return]


def order_probability(scores: Sequence[float]) -> float:
    """Plackett-Luce probability of the order of ``scores`` (best first) under a softmax of
    them: RankNet's P(i above j) = sigmoid(s_i - s_j) extended to a whole order."""
    ordered = sorted(scores, reverse=True)
    probability = 1.0
    for k in range(len(ordered) - 1):
        rest = ordered[k:]
        top = rest[0]
        probability /= sum(math.exp(s - top) for s in rest)
    return probability


class RankingStudent:
    """A trained ranker: the model, the term weights, and the settings of its bags (the
    encoder's hashed rows and the words of a text it reads)."""

    def __init__(
        self, model: PairScorer, stats: TermStats, *, buckets: int, max_tokens: int
    ) -> None:
        self.model = model.eval()
        self.stats = stats
        self.buckets = buckets
        self.max_tokens = max_tokens
        self._hasher = BagHasher(buckets)

    def prepare(self, item: RankingInput | str) -> Prepared:
        """Featurize one query (a :class:`RankingInput` or a rendered item text)."""
        parsed = parse_ranking_text(item) if isinstance(item, str) else item
        if parsed is None:
            raise ValueError(
                "a ranking input needs a '<query>…</query>' block and "
                "'<candidate id=\"ID\">text</candidate>' blocks"
            )
        query = analyze(parsed.query)
        candidates = [analyze(text) for _, text in parsed.candidates]
        features = lexical_features(query, candidates, self.stats)
        return Prepared(
            ids=tuple(i for i, _ in parsed.candidates),
            query=self._bag(query.tokens),
            candidates=tuple(self._bag(c.tokens) for c in candidates),
            features=features,
            top=int(np.argmax(features[:, 0])),
        )

    def _bag(self, tokens: Sequence[str]) -> Bag:
        return self._hasher(tokens[: self.max_tokens])

    def scores_of(self, prepared: Sequence[Prepared]) -> list[FloatArray]:
        """Each query's candidate scores, in its candidates' order."""
        if not prepared:
            return []
        where = next(self.model.parameters()).device
        with torch.inference_mode():
            flat = self.model(PairBatch.of(prepared, where)).cpu().numpy()
        bounds = np.cumsum([len(p.candidates) for p in prepared])[:-1]
        return list(np.split(flat.astype(np.float32), bounds))

    def predict(self, inputs: Sequence[RankingInput | str]) -> list[dict[str, Any]]:
        """The answer for each query in the spec's shape: ``ranking`` (ids, best first; ties
        keep the candidates' order), ``scores`` and ``confidence`` (the order's
        Plackett-Luce probability under the student's scores)."""
        prepared = [self.prepare(item) for item in inputs]
        answers: list[dict[str, Any]] = []
        for item, scores in zip(prepared, self.scores_of(prepared), strict=True):
            values = [float(s) for s in scores]
            order = sorted(range(len(values)), key=lambda i: -values[i])
            answers.append(
                {
                    "ranking": [item.ids[i] for i in order],
                    "scores": {item.ids[i]: round(values[i], 4) for i in order},
                    "confidence": round(order_probability(values), 4),
                }
            )
        return answers
