"""Hashing featurizer that turns text into bag-of-n-gram ids for the student.

Each document becomes a list of integer ids in ``[0, buckets)``: lowercased word unigrams,
word bigrams and fastText-style character n-grams of every word (``<word>`` with boundary
markers). Ids come from ``zlib.crc32``, so they are the same in every process and on every
machine; Python's ``hash()`` is salted per process and would silently break saved models.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain, islice
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["Bag", "Featurizer", "IdArray", "Packed", "WeightArray", "pack", "tokenize"]

IdArray = npt.NDArray[np.int64]
WeightArray = npt.NDArray[np.float32]
# A document as distinct ids and the share of its n-grams each one is: the weighted sum of
# their embeddings is the mean over all n-grams, at about half the work on long texts.
Bag = tuple[IdArray, WeightArray]
# Documents packed for an ``EmbeddingBag``: ids, the offset of each document, weights.
Packed = tuple[IdArray, IdArray, WeightArray]

_TOKEN = re.compile(r"\w+")
# Namespaces keep a word and a character n-gram with the same spelling apart.
_WORD, _CHAR = b"w\x00", b"c\x00"
# Words repeat (Zipf), so each word's hash and subword ids are kept; cleared when this large.
_CACHE_LIMIT = 500_000
# A token is rarely longer than this; the cap keeps a huge document from being lowercased
# and scanned in full when only its first `max_tokens` words are used.
_CHARS_PER_TOKEN = 32
_MIX = np.uint64(0x9E3779B97F4A7C15)
# Documents featurized together: big enough to amortize numpy's per-call cost.
_CHUNK = 512


def tokenize(text: str, max_tokens: int) -> list[str]:
    """Split ``text`` into lowercased word tokens, keeping at most ``max_tokens``."""
    head = text[: max_tokens * _CHARS_PER_TOKEN].lower()
    return _TOKEN.findall(head)[:max_tokens]


@dataclass
class Featurizer:
    """Stable hashing of words, word bigrams and character n-grams into ``buckets`` ids."""

    buckets: int = 262_144
    min_n: int = 3
    max_n: int = 5
    word_ngrams: int = 2
    max_tokens: int = 2_000
    _vocab: _Vocab = field(default_factory=lambda: _Vocab(), repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.buckets < 2:
            raise ValueError(f"buckets must be at least 2, got {self.buckets}")
        if not 1 <= self.min_n <= self.max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {self.min_n}..{self.max_n}")
        if self.word_ngrams not in (1, 2):
            raise ValueError(f"word_ngrams must be 1 or 2, got {self.word_ngrams}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be positive, got {self.max_tokens}")

    def settings(self) -> dict[str, int]:
        """The values needed to rebuild an identical featurizer (saved with the model)."""
        return {
            "buckets": self.buckets,
            "min_n": self.min_n,
            "max_n": self.max_n,
            "word_ngrams": self.word_ngrams,
            "max_tokens": self.max_tokens,
        }

    def ids(self, text: str) -> IdArray:
        """All n-gram ids of one document, repeats kept: words, bigrams, then subwords."""
        ids, _ = self._grams([tokenize(text, self.max_tokens)])
        return ids

    def packed(self, texts: Sequence[str], *, distinct: bool = True) -> Packed:
        """A batch of documents as ``EmbeddingBag`` input, featurized in one vectorized pass.

        Each document contributes its distinct ids, weighted by their share of its n-grams
        (half the rows for a training step to touch). With ``distinct=False`` it contributes
        every id, repeats kept, each weighted 1/its n-gram count: the same mean without the
        sort that finds the distinct ids, which is most of the featurizer's time on long
        documents, so prediction skips it.
        """
        segments = self._segments([tokenize(text, self.max_tokens) for text in texts])
        if not distinct:
            return _by_document(segments, len(texts))
        ids = np.concatenate([ids for ids, _ in segments])
        docs = np.concatenate([docs for _, docs in segments])
        keys, counts = np.unique(docs * self.buckets + ids, return_counts=True)
        key_docs = keys // self.buckets
        totals = np.bincount(docs, minlength=len(texts))
        weights = (counts / totals[key_docs]).astype(np.float32)
        offsets = np.searchsorted(key_docs, np.arange(len(texts))).astype(np.int64)
        return keys % self.buckets, offsets, weights

    def bags(self, texts: Iterable[str]) -> list[Bag]:
        """Each document as a :data:`Bag` (distinct ids and their weights)."""
        out: list[Bag] = []
        remaining = iter(texts)
        while chunk := list(islice(remaining, _CHUNK)):
            ids, offsets, weights = self.packed(chunk)
            out.extend(zip(np.split(ids, offsets[1:]), np.split(weights, offsets[1:]), strict=True))
        return out

    def bag(self, text: str) -> Bag:
        """One document as a :data:`Bag`."""
        return self.bags([text])[0]

    def _grams(self, docs: list[list[str]]) -> tuple[IdArray, IdArray]:
        """Every n-gram id of a batch of tokenized documents, and the document of each."""
        segments = self._segments(docs)
        return (
            np.concatenate([ids for ids, _ in segments]),
            np.concatenate([owners for _, owners in segments]),
        )

    def _segments(self, docs: list[list[str]]) -> list[tuple[IdArray, IdArray]]:
        """The ids of words, bigrams and subwords, each with the document of each id: within
        a segment the documents come in order."""
        flat = list(chain.from_iterable(docs))
        rows = self._vocab.rows(flat, self._subword_ids)
        hashes = self._vocab.hashes[rows]
        token_docs = np.repeat(np.arange(len(docs)), [len(doc) for doc in docs])
        ids = [(hashes % np.uint64(self.buckets)).astype(np.int64)]
        owners = [token_docs]
        if self.word_ngrams == 2:
            same = token_docs[:-1] == token_docs[1:]  # pairs that do not straddle two documents
            pairs = _mix(hashes[:-1][same] * _MIX + hashes[1:][same])
            ids.append((pairs % np.uint64(self.buckets)).astype(np.int64))
            owners.append(token_docs[:-1][same])
        ids.append(self._vocab.subwords(rows))
        owners.append(np.repeat(token_docs, self._vocab.lengths[rows]))
        return list(zip(ids, owners, strict=True))

    def _subword_ids(self, word: str) -> list[int]:
        marked = f"<{word}>"
        return [
            zlib.crc32(_CHAR + marked[start : start + n].encode()) % self.buckets
            for n in range(self.min_n, self.max_n + 1)
            for start in range(len(marked) - n + 1)
        ]


class _Vocab:
    """Each word seen, once: its hash and its subword ids, in flat arrays indexed by a row
    number, so a batch's tokens are gathered with a few numpy calls and not one per token.
    Words repeat (Zipf); the table is emptied when it holds :data:`_CACHE_LIMIT` words."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        self.hashes = np.zeros(1024, dtype=np.uint64)
        self.starts = np.zeros(1024, dtype=np.int64)
        self.lengths = np.zeros(1024, dtype=np.int64)
        self.pool = np.zeros(16_384, dtype=np.int64)
        self.used = 0  # of the pool

    def rows(self, tokens: list[str], subword_ids: Callable[[str], list[int]]) -> IdArray:
        """The row of every token, adding the words not seen before."""
        new = set(tokens).difference(self.index)
        if len(self.index) + len(new) > _CACHE_LIMIT:
            self.__init__()  # type: ignore[misc]
            new = set(tokens)
        if new:
            self._add(sorted(new), subword_ids)
        return np.fromiter(map(self.index.__getitem__, tokens), dtype=np.int64, count=len(tokens))

    def subwords(self, rows: IdArray) -> IdArray:
        """The subword ids of ``rows``, concatenated in order (a ragged gather)."""
        lengths = self.lengths[rows]
        ends = np.cumsum(lengths)
        shift = np.repeat(self.starts[rows] - (ends - lengths), lengths)
        gathered: IdArray = self.pool[np.arange(int(ends[-1]) if len(ends) else 0) + shift]
        return gathered

    def _add(self, words: list[str], subword_ids: Callable[[str], list[int]]) -> None:
        first = len(self.index)
        grams = [subword_ids(word) for word in words]
        lengths = np.fromiter(map(len, grams), dtype=np.int64, count=len(grams))
        flat = np.fromiter(chain.from_iterable(grams), dtype=np.int64, count=int(lengths.sum()))
        end = first + len(words)
        self.hashes = _room(self.hashes, end)
        self.starts = _room(self.starts, end)
        self.lengths = _room(self.lengths, end)
        self.pool = _room(self.pool, self.used + len(flat))
        self.hashes[first:end] = [zlib.crc32(_WORD + word.encode()) for word in words]
        self.lengths[first:end] = lengths
        self.starts[first:end] = self.used + np.cumsum(lengths) - lengths
        self.pool[self.used : self.used + len(flat)] = flat
        self.used += len(flat)
        self.index.update(zip(words, range(first, end), strict=True))


def _room(array: npt.NDArray[Any], size: int) -> npt.NDArray[Any]:
    """``array`` with room for ``size`` entries (capacity doubles, so appends stay linear)."""
    if size <= len(array):
        return array
    grown = np.zeros(max(size, 2 * len(array)), dtype=array.dtype)
    grown[: len(array)] = array
    return grown


def _by_document(segments: list[tuple[IdArray, IdArray]], n_docs: int) -> Packed:
    """Every id of ``segments`` regrouped document by document (a linear scatter, not a
    sort: each segment is in document order), each weighted 1/its document's id count."""
    if n_docs == 1:  # a served request: the segments in order, no scatter
        out = np.concatenate([ids for ids, _ in segments]) if segments else np.zeros(0, np.int64)
        share = np.float32(1.0 / max(len(out), 1))
        return out, np.zeros(1, dtype=np.int64), np.full(len(out), share, dtype=np.float32)
    counts = [np.bincount(owners, minlength=n_docs) for _, owners in segments]
    totals = np.sum(counts, axis=0) if counts else np.zeros(n_docs, dtype=np.int64)
    offsets = np.zeros(n_docs, dtype=np.int64)
    np.cumsum(totals[:-1], out=offsets[1:])
    out = np.empty(int(totals.sum()), dtype=np.int64)
    before = offsets.copy()  # where each document's next segment starts
    for (ids, owners), count in zip(segments, counts, strict=True):
        starts = np.cumsum(count) - count  # where each document starts in this segment
        out[before[owners] + np.arange(len(ids)) - starts[owners]] = ids
        before += count
    weights = np.repeat((1.0 / np.maximum(totals, 1)).astype(np.float32), totals)
    return out, offsets, weights


def _mix(values: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """Scramble 64-bit values so their low bits depend on all input bits (a murmur finalizer)."""
    values = values ^ (values >> np.uint64(33))
    values = values * np.uint64(0xFF51AFD7ED558CCD)
    return values ^ (values >> np.uint64(33))


def pack(bags: Sequence[Bag]) -> Packed:
    """Concatenate bags into the ``(ids, offsets, weights)`` an ``EmbeddingBag`` takes."""
    lengths = np.fromiter((len(ids) for ids, _ in bags), dtype=np.int64, count=len(bags))
    offsets = np.zeros(len(bags), dtype=np.int64)
    np.cumsum(lengths[:-1], out=offsets[1:])
    if not bags:
        return np.zeros(0, dtype=np.int64), offsets, np.zeros(0, dtype=np.float32)
    ids = np.concatenate([ids for ids, _ in bags])
    weights = np.concatenate([weights for _, weights in bags])
    return ids, offsets, weights
