"""The extraction student's network: text split into fine tokens with their character offsets,
each token hashed into four embedding tables (its lowercase form, prefix, suffix and shape,
as spaCy's ``MultiHashEmbed``), a window of residual maxout convolutions over them (spaCy's
``MaxoutWindowEncoder``), and a BIO tag per token decoded by a constrained Viterbi pass.

Tokens are finer than words (letters, digit runs and each punctuation mark apart), so the
teacher's spans land on token boundaries nearly always; a decoded span is the document's own
characters from its first token's start to its last token's end, so every value the student
answers occurs in the document exactly as written (it passes the grounding check).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.nn import functional

__all__ = [
    "ATTRIBUTES",
    "Doc",
    "Featurizer",
    "TagScorer",
    "TagSet",
    "allowed_transitions",
    "features",
    "pad_rows",
    "token_spans",
    "viterbi",
]

# A decimal number, a run of letters, a run of digits, or one other non-space character.
_TOKEN = re.compile(r"\d+(?:[.,]\d+)+|[^\W\d_]+|\d+|\S")
ATTRIBUTES = ("lower", "prefix", "suffix", "shape")
_SALTS = tuple(f"{name}\x00".encode() for name in ATTRIBUTES)
# Rows of each table a token's attribute is hashed into (summed: a clash on one row rarely
# clashes on the other, as in spaCy's hash embeddings).
_HASHES = 2
_CACHE_LIMIT = 500_000
_SHAPE = str.maketrans(
    {
        **{c: "X" for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"},
        **{c: "x" for c in "abcdefghijklmnopqrstuvwxyz"},
        **{c: "d" for c in "0123456789"},
    }
)


def token_spans(text: str, max_tokens: int) -> list[tuple[int, int]]:
    """``(start, end)`` character offsets of ``text``'s first ``max_tokens`` tokens."""
    spans = []
    for match in _TOKEN.finditer(text):
        spans.append(match.span())
        if len(spans) == max_tokens:
            break
    return spans


def _shape(token: str) -> str:
    # spaCy's shape: X, x, d for letters and digits, runs cut at four; other letters as x/X.
    mapped = token.translate(_SHAPE)
    if not mapped.isascii():
        mapped = "".join(("X" if c.isupper() else "x") if c.isalpha() else c for c in mapped)
    out: list[str] = []
    for char in mapped:
        if len(out) >= 4 and out[-1] == out[-2] == out[-3] == out[-4] == char:
            continue
        out.append(char)
    return "".join(out)


@dataclass(frozen=True, slots=True)
class Doc:
    """One document as the tagger sees it: its text, token offsets and hashed features
    (``tokens x attributes x hashes`` rows of each attribute's table)."""

    text: str
    spans: tuple[tuple[int, int], ...]
    rows: npt.NDArray[np.int64]


class Featurizer:
    """Token attributes hashed with ``zlib.crc32`` (the same in every process), cached."""

    def __init__(self, rows: int, max_tokens: int) -> None:
        self.table_rows = rows
        self.max_tokens = max_tokens
        self._cache: dict[str, tuple[int, ...]] = {}

    def _token(self, token: str) -> tuple[int, ...]:
        cached = self._cache.get(token)
        if cached is not None:
            return cached
        lower = token.lower()
        values = (lower, lower[:3], lower[-3:], _shape(token))
        rows = []
        for salt, value in zip(_SALTS, values, strict=True):
            seed = zlib.crc32(salt + value.encode("utf-8", "surrogatepass"))
            rows.append(seed % self.table_rows)
            rows.append(zlib.crc32(b"\x01", seed) % self.table_rows)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        found = self._cache[token] = tuple(rows)
        return found

    def doc(self, text: str) -> Doc:
        spans = token_spans(text, self.max_tokens)
        rows = np.array([self._token(text[s:e]) for s, e in spans], dtype=np.int64).reshape(
            len(spans), len(ATTRIBUTES), _HASHES
        )
        return Doc(text, tuple(spans), rows)


def features(featurizer: Featurizer, texts: Sequence[str]) -> list[Doc]:
    """The documents of ``texts``, featurized."""
    return [featurizer.doc(text) for text in texts]


class TagSet:
    """The BIO tags over some fields: ``O``, then ``B-field`` and ``I-field`` per field."""

    def __init__(self, fields: Sequence[str]) -> None:
        self.fields = tuple(fields)
        self.names = ["O"] + [f"{p}-{f}" for f in self.fields for p in ("B", "I")]

    def begin(self, field: int) -> int:
        """The ``B-`` tag of field number ``field``."""
        return 1 + 2 * field

    def inside(self, field: int) -> int:
        """The ``I-`` tag of field number ``field``."""
        return 2 + 2 * field

    def __len__(self) -> int:
        return len(self.names)


def allowed_transitions(tags: TagSet) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """Which tag may follow which (``I-f`` only after ``B-f`` or ``I-f``) and which may
    start a document (not an ``I-``): the constraint Viterbi decodes under."""
    n = len(tags)
    follow = np.ones((n, n), dtype=bool)
    start = np.ones(n, dtype=bool)
    for field in range(len(tags.fields)):
        inside = tags.inside(field)
        follow[:, inside] = False
        follow[tags.begin(field), inside] = True
        follow[inside, inside] = True
        start[inside] = False
    return follow, start


def viterbi(
    log_probs: npt.NDArray[np.float32],
    follow: npt.NDArray[np.bool_],
    start: npt.NDArray[np.bool_],
) -> list[int]:
    """The most likely tag sequence under the transition constraint (``tokens x tags``
    log-probabilities in; one tag per token out)."""
    steps = len(log_probs)
    if steps == 0:
        return []
    penalty = np.where(follow, 0.0, -np.inf)
    score = np.where(start, log_probs[0], -np.inf)
    back = np.zeros((steps, log_probs.shape[1]), dtype=np.int64)
    for t in range(1, steps):
        candidates = score[:, None] + penalty
        back[t] = candidates.argmax(axis=0)
        score = candidates.max(axis=0) + log_probs[t]
    path = [int(score.argmax())]
    for t in range(steps - 1, 0, -1):
        path.append(int(back[t, path[-1]]))
    return path[::-1]


class _Maxout(nn.Module):
    """A linear layer with ``pieces`` outputs per unit, the largest kept, then LayerNorm."""

    def __init__(self, width_in: int, width_out: int, pieces: int) -> None:
        super().__init__()
        self.pieces = pieces
        self.linear = nn.Linear(width_in, width_out * pieces)
        self.norm = nn.LayerNorm(width_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        out = out.view(*out.shape[:-1], -1, self.pieces).amax(dim=-1)
        return self.norm(out)  # type: ignore[no-any-return]


class TagScorer(nn.Module):
    """Hash embeddings, ``depth`` residual window convolutions, one score per tag."""

    def __init__(
        self,
        rows: int,
        dim: int,
        width: int,
        depth: int,
        window: int,
        tags: int,
        dropout: float,
        pieces: int = 3,
    ) -> None:
        super().__init__()
        tables = [nn.Embedding(rows, dim) for _ in ATTRIBUTES]
        for table in tables:
            nn.init.normal_(table.weight, std=0.1)
        self.tables = nn.ModuleList(tables)
        self.mix = _Maxout(dim * len(ATTRIBUTES), width, pieces)
        self.window = window
        self.blocks = nn.ModuleList(
            _Maxout(width * (2 * window + 1), width, pieces) for _ in range(depth)
        )
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(width, tags)

    def forward(self, rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Tag scores (``batch x tokens x tags``) of padded ``batch x tokens x attributes x
        hashes`` rows; ``mask`` marks the real tokens (padding is zeroed between layers)."""
        embedded = torch.cat(
            [table(rows[:, :, k]).sum(dim=2) for k, table in enumerate(self.tables)], dim=-1
        )
        keep = mask.unsqueeze(-1).to(embedded.dtype)
        x = self.mix(self.dropout(embedded)) * keep
        for block in self.blocks:
            x = x + block(self.dropout(self._windows(x))) * keep
        return self.out(self.dropout(x))  # type: ignore[no-any-return]

    def _windows(self, x: torch.Tensor) -> torch.Tensor:
        # Each token beside its ``window`` neighbours on both sides (zeros past the ends).
        padded = functional.pad(x, (0, 0, self.window, self.window))
        length = x.shape[1]
        return torch.cat([padded[:, k : k + length] for k in range(2 * self.window + 1)], dim=-1)


def pad_rows(docs: Sequence[Doc], where: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Docs' feature rows padded to the longest, and the mask of real tokens."""
    longest = max((len(d.spans) for d in docs), default=0) or 1
    shape = (len(docs), longest, len(ATTRIBUTES), _HASHES)
    rows = np.zeros(shape, dtype=np.int64)
    mask = np.zeros((len(docs), longest), dtype=bool)
    for k, doc in enumerate(docs):
        rows[k, : len(doc.spans)] = doc.rows
        mask[k, : len(doc.spans)] = True
    return torch.from_numpy(rows).to(where), torch.from_numpy(mask).to(where)
