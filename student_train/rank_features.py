"""What the ranking student reads of a query and its candidates: the markup parsed back from
the item's text, and lexical-overlap features of each (query, candidate) pair.

The item text is what the teacher saw: one ``<query>…</query>`` block and the candidates as
``<candidate id="ID">text</candidate>`` blocks (the convention of the local teacher's
ranking; this package may not import it, so the markup is parsed here the same way).

Overlap features are cheap and carry most of "which article does this headline belong to":
a headline's rare words (names, places) reappear in its own article's opening. Term weights
are BM25 inverse document frequencies counted over the training candidates, hashed into a
fixed table (``zlib.crc32``, stable across processes) so they save as one tensor.
"""

from __future__ import annotations

import math
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import numpy.typing as npt

from schemas.markup import read_ranking
from student_train.features import Bag, tokenize

__all__ = [
    "LEXICAL_FEATURES",
    "Analyzed",
    "BagHasher",
    "RankingInput",
    "TermStats",
    "analyze",
    "lexical_features",
    "parse_ranking_text",
]

# Each pair's overlap, then the same value minus the best among the query's other
# candidates: whether this candidate is the clear lexical winner, which a per-pair score
# cannot see (only differences within a query matter to the ranking).
_BASE_FEATURES = (
    "bm25_share",
    "idf_coverage",
    "word_coverage",
    "bigram_coverage",
    "stem_coverage",
    "char4_coverage",
    "lead_idf_coverage",
    "log_bm25",
)
LEXICAL_FEATURES = (*_BASE_FEATURES, *(f"{name}_margin" for name in _BASE_FEATURES))
_WORD, _STEM, _PAIR = b"w\x00", b"s\x00", b"b\x00"
_STEM_CHARS = 5  # a crude stem: "profits" and "profit" share "profi"
_LEAD_WORDS = 25  # a news article's opening sentence restates its headline
_BM25_K1, _BM25_B = 1.2, 0.75
_MIX = np.uint64(0x9E3779B97F4A7C15)
_CACHE_LIMIT = 200_000  # cached word hashes (and idf weights) before a cache starts over
_MAX_TOKENS = 512  # a candidate longer than this is truncated (the spec shows 60 words)

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class RankingInput:
    """One query and its candidates as ``(id, text)``, in the order the item lists them."""

    query: str
    candidates: tuple[tuple[str, str], ...]


def parse_ranking_text(text: str) -> RankingInput | None:
    """The query and candidates of a rendered ranking item, or None when it has no query or
    no candidate; a repeated id keeps its first text, as the teacher reads it."""
    query, candidates = read_ranking(text)
    if query is None or not candidates:
        return None
    return RankingInput(query, candidates)


@dataclass(frozen=True, slots=True)
class Analyzed:
    """A text's tokens and the sets the overlap features count."""

    tokens: tuple[str, ...]
    counts: Mapping[str, int]
    bigrams: frozenset[tuple[str, str]]
    stems: frozenset[str]
    spaced: str  # the tokens joined by single spaces, a space at each end
    lead: frozenset[str]


def analyze(text: str) -> Analyzed:
    """Tokenize a text once for every overlap feature."""
    tokens = tuple(tokenize(text, _MAX_TOKENS))
    return Analyzed(
        tokens=tokens,
        counts=Counter(tokens),
        bigrams=frozenset(pairwise(tokens)),
        stems=frozenset(token[:_STEM_CHARS] for token in tokens),
        spaced=f" {' '.join(tokens)} ",
        lead=frozenset(tokens[:_LEAD_WORDS]),
    )


def _char4(tokens: Iterable[str]) -> frozenset[str]:
    """Each token's character 4-grams, a space marking its ends (" ab", "abc ")."""
    grams: set[str] = set()
    for token in tokens:
        marked = f" {token} "
        grams.update(marked[i : i + 4] for i in range(len(marked) - 3))
    return frozenset(grams)


class BagHasher:
    """A text's word and word-bigram ids in ``[0, buckets)``, each distinct id weighted by
    its share of them: the encoder's input, the mean of their embeddings.

    Words repeat (Zipf), so each word's hash is cached; a bigram's id mixes its two words'
    hashes (a murmur finalizer), so it costs no string work.
    """

    def __init__(self, buckets: int) -> None:
        self.buckets = buckets
        self._cache: dict[str, int] = {}

    def __call__(self, tokens: Sequence[str]) -> Bag:
        """The bag of one tokenized text."""
        if len(self._cache) > _CACHE_LIMIT:
            self._cache.clear()
        cache = self._cache
        # Cached hashes are shifted by one so that a cached 0 never reads as missing.
        hashes = np.array(
            [
                cache.get(t) or cache.setdefault(t, zlib.crc32(_WORD + t.encode()) + 1)
                for t in tokens
            ],
            dtype=np.uint64,
        )
        pairs = _mix(hashes[:-1] * _MIX + hashes[1:])
        buckets = np.uint64(self.buckets)
        grams = np.concatenate([hashes % buckets, pairs % buckets]).astype(np.int64)
        ids, counts = np.unique(grams, return_counts=True)
        return ids, (counts / max(len(grams), 1)).astype(np.float32)


def _mix(values: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    values = values ^ (values >> np.uint64(33))
    values = values * np.uint64(0xFF51AFD7ED558CCD)
    return values ^ (values >> np.uint64(33))


def _bucket(prefix: bytes, term: str, buckets: int) -> int:
    return zlib.crc32(prefix + term.encode()) % buckets


class TermStats:
    """Document frequencies of hashed words and stems over a set of texts, for BM25 weights.

    ``df`` has one count per bucket; a term never seen counts 0, the rarest possible, which is
    what an unseen name in a headline should weigh.
    """

    def __init__(self, df: FloatArray, n_docs: int, avg_len: float) -> None:
        self.df = df
        self.n_docs = n_docs
        self.avg_len = avg_len
        self._idf_cache: dict[tuple[bytes, str], float] = {}

    @classmethod
    def fit(cls, texts: Iterable[str], buckets: int) -> TermStats:
        """Count each distinct text once (a candidate seen in many queries is one document)."""
        df = np.zeros(buckets, dtype=np.float32)
        n_docs, total_len = 0, 0
        for text in dict.fromkeys(texts):
            analyzed = analyze(text)
            n_docs += 1
            total_len += len(analyzed.tokens)
            words = {_bucket(_WORD, t, buckets) for t in analyzed.counts}
            stems = {_bucket(_STEM, t, buckets) for t in analyzed.stems}
            df[list(words | stems)] += 1.0
        return cls(df, n_docs, total_len / n_docs if n_docs else 1.0)

    def idf(self, prefix: bytes, term: str) -> float:
        """BM25's inverse document frequency of a word (``_WORD``) or stem (``_STEM``)."""
        key = (prefix, term)
        cached = self._idf_cache.get(key)
        if cached is None:
            if len(self._idf_cache) > _CACHE_LIMIT:  # bounds a long-lived router's memory
                self._idf_cache.clear()
            df = float(self.df[_bucket(prefix, term, len(self.df))])
            cached = math.log(1.0 + (self.n_docs - df + 0.5) / (df + 0.5))
            self._idf_cache[key] = cached
        return cached


def lexical_features(
    query: Analyzed, candidates: Sequence[Analyzed], stats: TermStats
) -> FloatArray:
    """One row of :data:`LEXICAL_FEATURES` per candidate, for one query."""
    grams = _char4(query.tokens)
    base = np.array([_pair(query, grams, c, stats) for c in candidates], dtype=np.float32)
    base = base.reshape(len(candidates), len(_BASE_FEATURES))
    if len(candidates) < 2:
        return np.concatenate([base, np.zeros_like(base)], axis=1)
    # The best of the others: the top value, or the runner-up for the candidate holding it.
    order = np.sort(base, axis=0)
    best, second = order[-1], order[-2]
    others = np.where(base >= best, second, best)
    return np.concatenate([base, base - others], axis=1)


def _pair(
    query: Analyzed, grams: frozenset[str], candidate: Analyzed, stats: TermStats
) -> list[float]:
    words = list(query.counts)
    weights = [stats.idf(_WORD, w) for w in words]
    total = sum(weights) or 1.0
    norm = _BM25_K1 * (1 - _BM25_B + _BM25_B * len(candidate.tokens) / (stats.avg_len or 1.0))
    bm25 = idf_hit = lead_hit = 0.0
    for word, weight in zip(words, weights, strict=True):
        tf = candidate.counts.get(word, 0)
        if tf:
            bm25 += weight * tf * (_BM25_K1 + 1) / (tf + norm)
            idf_hit += weight
            lead_hit += weight if word in candidate.lead else 0.0
    stems = [stats.idf(_STEM, s) for s in query.stems]
    stem_hit = sum(w for s, w in zip(query.stems, stems, strict=True) if s in candidate.stems)
    return [
        bm25 / (total * (_BM25_K1 + 1)),
        idf_hit / total,
        sum(w in candidate.counts for w in words) / max(len(words), 1),
        len(query.bigrams & candidate.bigrams) / max(len(query.bigrams), 1),
        stem_hit / (sum(stems) or 1.0),
        # A substring test per query 4-gram: far cheaper than the candidate's gram set.
        sum(g in candidate.spaced for g in grams) / max(len(grams), 1),
        lead_hit / total,
        math.log1p(bm25),
    ]
