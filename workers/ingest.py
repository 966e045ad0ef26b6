"""Read sources (JSONL, CSV, the bundled BBC corpus), normalize rows and load them as items.

Loading is idempotent on (spec name, external id): re-running a backfill inserts nothing new.
A bad row never stops the good ones: it is reported with its line number and reason.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from schemas.errors import ConfigError, PermanentError
from storage.items import IngestCounts, ItemIn, ensure_spec, upsert_items
from storage.models import SpecRow
from workers.prompt import render_input
from workers.spec import Spec

__all__ = [
    "BadRow",
    "IngestSummary",
    "SourceRow",
    "load_source",
    "make_item",
    "normalize_text",
    "read_source",
    "store_spec",
]


def _builtin_names() -> tuple[str, ...]:
    from examples import SOURCES

    return tuple(SOURCES)


BUILTIN_SOURCES = _builtin_names()


@dataclass(frozen=True, slots=True)
class SourceRow:
    line: int
    row: dict[str, Any] | None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class BadRow:
    line: int
    reason: str


@dataclass(slots=True)
class IngestSummary:
    rows: int = 0
    counts: IngestCounts = field(default_factory=IngestCounts)
    bad: list[BadRow] = field(default_factory=list)
    bad_count: int = 0


def normalize_text(text: str) -> str:
    """Unicode NFC, no BOM or NUL bytes, ``\\n`` line endings, no trailing whitespace."""
    text = text.replace("\ufeff", "").replace("\x00", "")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return unicodedata.normalize("NFC", text).strip()


def read_source(source: str, *, limit: int | None = None) -> Iterator[SourceRow]:
    """Stream rows from a file or a built-in source name, with line numbers.

    A missing file or an unsupported type fails here, before anything is read or written.
    """
    if source in BUILTIN_SOURCES:
        from examples import builtin_source

        rows = builtin_source(source)(limit)
        return (SourceRow(n, row) for n, row in enumerate(rows, start=1))
    path = Path(source)
    if not path.is_file():
        raise ConfigError(
            f"source not found: {path} (give a .jsonl or .csv file, or a "
            f"built-in source: {', '.join(BUILTIN_SOURCES)})"
        )
    readers: dict[str, Callable[[Path], Iterator[SourceRow]]] = {
        ".jsonl": _read_jsonl,
        ".ndjson": _read_jsonl,
        ".csv": _read_csv,
    }
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise ConfigError(
            f"{path}: unsupported source type {path.suffix!r}; use .jsonl, .ndjson or .csv"
        )
    return itertools.islice(reader(path), limit)


def _read_jsonl(path: Path) -> Iterator[SourceRow]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                value = json.loads(raw.decode("utf-8-sig" if number == 1 else "utf-8"))
            except UnicodeDecodeError as exc:
                yield SourceRow(number, None, f"not valid UTF-8 ({exc.reason} at byte {exc.start})")
                continue
            except ValueError as exc:
                yield SourceRow(number, None, f"not valid JSON: {exc}")
                continue
            if not isinstance(value, dict):
                yield SourceRow(number, None, f"expected a JSON object, got {type(value).__name__}")
                continue
            yield SourceRow(number, value)


def _read_csv(path: Path) -> Iterator[SourceRow]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        try:
            for row in reader:
                if None in row:
                    yield SourceRow(reader.line_num, None, "more values than header columns")
                    continue
                yield SourceRow(reader.line_num, dict(row))
        except (UnicodeDecodeError, csv.Error) as exc:
            raise ConfigError(
                f"{path}: cannot read CSV near line {reader.line_num}: {exc}"
            ) from exc


def make_item(spec: Spec, row: dict[str, Any]) -> ItemIn:
    """Turn one source row into an item: id, rendered text, slices, known-good record."""
    row = _without_nul(row)
    raw_id = row.get(spec.id_field)
    if raw_id is None or isinstance(raw_id, (dict, list, bool)) or str(raw_id).strip() == "":
        raise PermanentError(f"missing or invalid id field {spec.id_field!r}")
    text = normalize_text(render_input(spec, row))
    if not text:
        raise PermanentError("the rendered input text is empty")
    known = {
        name: row[rule["source"]]
        for name, rule in spec.known_good.items()
        if row.get(rule["source"]) not in (None, "")
    }
    return ItemIn(
        external_id=str(raw_id).strip()[:256],
        text=text,
        payload=row,
        slices={name: row.get(name) for name in spec.slice_fields},
        content_hash=hashlib.sha256(text.encode()).hexdigest(),
        known_good=known or None,
    )


def _without_nul(value: Any) -> Any:
    # Postgres text and JSONB cannot hold U+0000: one such row would fail its whole chunk.
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nul(v) for v in value]
    return value


def store_spec(session: Session, spec: Spec) -> SpecRow:
    return ensure_spec(session, spec.name, spec.version, spec.kind, spec.body, spec.content_hash)


def load_source(
    sessions: sessionmaker[Session],
    spec: Spec,
    rows: Iterable[SourceRow],
    *,
    chunk_size: int = 1000,
    on_chunk: Callable[[IngestSummary], None] | None = None,
) -> IngestSummary:
    """Load rows in chunks, one committed transaction per chunk (so an interrupted load resumes)."""
    summary = IngestSummary()
    with sessions.begin() as session:
        spec_id = store_spec(session, spec).id
    chunk: list[ItemIn] = []
    for source_row in rows:
        summary.rows += 1
        item = _to_item(spec, source_row, summary)
        if item is not None:
            chunk.append(item)
        if len(chunk) >= chunk_size:
            _flush(sessions, spec_id, chunk, summary, on_chunk)
            chunk = []
    _flush(sessions, spec_id, chunk, summary, on_chunk)
    return summary


def _to_item(spec: Spec, source_row: SourceRow, summary: IngestSummary) -> ItemIn | None:
    error = source_row.error
    item = None
    if source_row.row is not None:
        try:
            item = make_item(spec, source_row.row)
        except PermanentError as exc:
            error = str(exc)
    if error is not None:
        summary.bad_count += 1
        if len(summary.bad) < 100:
            summary.bad.append(BadRow(source_row.line, error))
    return item


def _flush(
    sessions: sessionmaker[Session],
    spec_id: int,
    chunk: list[ItemIn],
    summary: IngestSummary,
    on_chunk: Callable[[IngestSummary], None] | None,
) -> None:
    if not chunk:
        return
    with sessions.begin() as session:
        spec_row = session.get(SpecRow, spec_id)
        assert spec_row is not None
        summary.counts.add(upsert_items(session, spec_row, _dedupe(chunk)))
    if on_chunk is not None:
        on_chunk(summary)


def _dedupe(chunk: list[ItemIn]) -> list[ItemIn]:
    # The first row with a given id wins, within a chunk as across chunks.
    seen: dict[str, ItemIn] = {}
    for item in chunk:
        seen.setdefault(item.external_id, item)
    return list(seen.values())
