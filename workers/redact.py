"""The one place that keeps a teacher's API key out of everything but its Authorization header.

A server may echo the key anywhere: in an error body (which is cut to a few hundred
characters for a message, so a cut key would slip past an exact-match replace), in a ``200``
answer's metadata (``system_fingerprint``), or in the answer's content (which would become a
label, and be quoted back to the teacher by a repair re-ask). So the teacher client redacts
what it *receives*, the whole body before anything parses or cuts it, and every error message
it makes; nothing downstream (the response cache, labels, ``items.last_error``, the console,
``--json``, logs) ever sees more of a key than a short run of its characters.

Any run of :data:`SHOWN_AT_MOST` + 1 or more consecutive characters of a key is replaced by
``***``. Keys shorter than :data:`MIN_KEY_CHARS` are replaced only whole.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["MASK", "MIN_KEY_CHARS", "SHOWN_AT_MOST", "Redactor"]

MASK = "***"
_GRAM = 6  # pieces of the key that are looked for; a run of 2 * _GRAM - 1 holds one whole
SHOWN_AT_MOST = 2 * _GRAM - 2  # the longest run of a key's characters that can remain
MIN_KEY_CHARS = 12


class Redactor:
    """Masks every long enough run of a secret's characters in text or bytes."""

    def __init__(self, secrets: Iterable[str | None]) -> None:
        keys = sorted({s for s in secrets if s}, key=len, reverse=True)
        self._whole = [k for k in keys if len(k) < MIN_KEY_CHARS]
        long_keys = [k for k in keys if len(k) >= MIN_KEY_CHARS]
        # The probe: pieces at a stride of _GRAM, so that any run of 2 * _GRAM - 1 characters
        # of a key holds one whole (a cheap test on every answer, which rarely finds one).
        probes = {k[i : i + _GRAM] for k in long_keys for i in range(0, len(k) - _GRAM + 1, _GRAM)}
        probes |= {k[-_GRAM:] for k in long_keys}
        self._probe = _alternation(probes | set(self._whole))
        # The mask: every piece, so that the whole run around a probe hit is covered.
        grams = {k[i : i + _GRAM] for k in long_keys for i in range(len(k) - _GRAM + 1)}
        self._grams = _alternation(grams)
        self._probe_bytes = _alternation_bytes(probes | set(self._whole))

    def __bool__(self) -> bool:
        return self._probe is not None

    def text(self, value: str) -> str:
        """``value`` with every run of a key's characters (long enough to matter) masked."""
        if self._probe is None or not self._probe.search(value):
            return value
        for key in self._whole:
            value = value.replace(key, MASK)
        if self._grams is None:
            return value
        spans: list[list[int]] = []
        start = 0
        while True:  # overlapping matches: advance one character past each match's start
            match = self._grams.search(value, start)
            if match is None:
                break
            a, b = match.span()
            if spans and a <= spans[-1][1]:
                spans[-1][1] = max(spans[-1][1], b)
            else:
                spans.append([a, b])
            start = a + 1
        if not spans:
            return value
        pieces, last = [], 0
        for a, b in spans:
            if b - a > SHOWN_AT_MOST:
                pieces += [value[last:a], MASK]
                last = b
        pieces.append(value[last:])
        return "".join(pieces)

    def found_in(self, data: bytes) -> bool:
        """Whether ``data`` may hold a run of a key (the cheap test, before decoding)."""
        return self._probe_bytes is not None and self._probe_bytes.search(data) is not None

    def bytes(self, data: bytes) -> bytes:
        """``data`` (UTF-8 text, as an HTTP body) with the runs masked."""
        if not self.found_in(data):
            return data
        return self.text(data.decode("utf-8", "surrogateescape")).encode("utf-8", "surrogateescape")


def _alternation(pieces: set[str]) -> re.Pattern[str] | None:
    if not pieces:
        return None
    return re.compile("|".join(re.escape(p) for p in sorted(pieces, key=len, reverse=True)))


def _alternation_bytes(pieces: set[str]) -> re.Pattern[bytes] | None:
    if not pieces:
        return None
    ordered = sorted(pieces, key=len, reverse=True)
    return re.compile(b"|".join(re.escape(p.encode()) for p in ordered))
