"""Hashing featurizer that turns text into bag-of-n-gram ids for the student.

Each document becomes a list of integer ids in ``[0, buckets)``: lowercased word unigrams,
word bigrams and fastText-style character n-grams of every word (``<word>`` with boundary
markers). Ids come from ``zlib.crc32``, so they are the same in every process and on every
machine; Python's ``hash()`` is salted per process and would silently break saved models.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain, islice

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
# Words repeat (Zipf), so each word's hash and subword ids are cached; cleared when this large.
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
    _cache: dict[str, tuple[int, IdArray]] = field(default_factory=dict, repr=False, compare=False)

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

    def packed(self, texts: Sequence[str]) -> Packed:
        """A batch of documents as ``EmbeddingBag`` input, featurized in one vectorized pass.

        Each document contributes its distinct ids, weighted by their share of its n-grams.
        """
        ids, docs = self._grams([tokenize(text, self.max_tokens) for text in texts])
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
        flat = list(chain.from_iterable(docs))
        self._learn(flat)
        words = list(map(self._cache.__getitem__, flat))
        hashes = np.array([h for h, _ in words], dtype=np.uint64)
        token_docs = np.repeat(np.arange(len(docs)), [len(doc) for doc in docs])
        subwords = [sub for _, sub in words]
        ids = [(hashes % np.uint64(self.buckets)).astype(np.int64)]
        owners = [token_docs]
        if self.word_ngrams == 2:
            same = token_docs[:-1] == token_docs[1:]  # pairs that do not straddle two documents
            pairs = _mix(hashes[:-1][same] * _MIX + hashes[1:][same])
            ids.append((pairs % np.uint64(self.buckets)).astype(np.int64))
            owners.append(token_docs[:-1][same])
        ids.append(np.concatenate(subwords) if subwords else np.zeros(0, dtype=np.int64))
        owners.append(np.repeat(token_docs, [len(sub) for sub in subwords]))
        return np.concatenate(ids), np.concatenate(owners)

    def _learn(self, tokens: list[str]) -> None:
        """Cache the hash and subword ids of every token not seen before."""
        new = set(tokens).difference(self._cache)
        if len(self._cache) + len(new) > _CACHE_LIMIT:
            self._cache.clear()
            new = set(tokens)
        for word in new:
            self._cache[word] = (zlib.crc32(_WORD + word.encode()), self._subword_ids(word))

    def _subword_ids(self, word: str) -> IdArray:
        marked = f"<{word}>"
        grams = [
            zlib.crc32(_CHAR + marked[start : start + n].encode()) % self.buckets
            for n in range(self.min_n, self.max_n + 1)
            for start in range(len(marked) - n + 1)
        ]
        return np.array(grams, dtype=np.int64)


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
