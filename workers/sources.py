"""Streaming source readers: JSONL, CSV, Parquet, a SQL query, and the bundled corpora.

Every reader yields :class:`SourceRow` values one at a time with the row's position (the line
number for JSONL and CSV, the row number for Parquet, SQL and built-in sources), so memory
stays bounded whatever the size of the source. A row that cannot be read becomes a row with an
``error`` (and the start of its raw text, for the rejects file); reading goes on.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, time
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from schemas.errors import ConfigError
from storage.bulk import stream_query

__all__ = [
    "DEFAULT_MAX_DOC_BYTES",
    "FILE_TYPES",
    "SourceRow",
    "position_name",
    "raw_text",
    "read_source",
    "read_sql",
]

# A row (its JSON, as stored) larger than this is a bad row; `--max-doc-bytes` changes it.
DEFAULT_MAX_DOC_BYTES = 1 << 20
RAW_KEEP_CHARS = 2000  # how much of a bad row's raw text the rejects file keeps
FILE_TYPES = (".jsonl", ".ndjson", ".csv", ".parquet")
_BOM = b"\xef\xbb\xbf"
_TOO_DEEP = "the row is nested over 1,024 levels deep (objects and arrays): flatten it"


def _builtin_names() -> tuple[str, ...]:
    from examples import SOURCES

    return tuple(SOURCES)


BUILTIN_SOURCES = _builtin_names()


@dataclass(frozen=True, slots=True)
class SourceRow:
    """One row read from a source, or the reason it could not be read."""

    line: int
    row: dict[str, Any] | None
    error: str | None = None
    raw: str | None = field(default=None, compare=False, repr=False)
    # The JSON line the row was parsed from, already held to the size limit by the reader.
    json_line: bytes | None = field(default=None, compare=False, repr=False)


def position_name(source: str | None) -> str:
    """What a row's number counts in this source: ``line`` (JSONL, CSV) or ``row``."""
    if source is not None and Path(source).suffix.lower() in (".jsonl", ".ndjson", ".csv"):
        return "line"
    return "row"


def read_source(
    source: str, *, limit: int | None = None, max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES
) -> Iterator[SourceRow]:
    """Stream rows from a file or a built-in source name, with line (or row) numbers.

    A missing file or an unsupported type fails here, before anything is read or written.
    """
    if source in BUILTIN_SOURCES:
        from examples import builtin_source

        rows = builtin_source(source)(limit)
        return (SourceRow(n, row) for n, row in enumerate(rows, start=1))
    path = Path(source)
    if not path.is_file():
        raise ConfigError(
            f"source not found: {path} (give a .jsonl, .csv or .parquet file, or a "
            f"built-in source: {', '.join(BUILTIN_SOURCES)})"
        )
    readers: dict[str, Callable[[Path, int], Iterator[SourceRow]]] = {
        ".jsonl": _read_jsonl,
        ".ndjson": _read_jsonl,
        ".csv": _read_csv,
        ".parquet": _read_parquet,
    }
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise ConfigError(
            f"{path}: unsupported source type {path.suffix!r}; use "
            f"{', '.join(FILE_TYPES)}, or --from-sql for a query"
        )
    return itertools.islice(reader(path, max_doc_bytes), limit)


def read_sql(query: str, url: str, *, limit: int | None = None) -> Iterator[SourceRow]:
    """Stream the rows of a SQL query on any SQLAlchemy URL (server-side cursor), numbered."""
    rows = stream_query(url, query)  # connects and runs the query now: errors surface here
    numbered = (_plain_row(n, row) for n, row in enumerate(rows, start=1))
    return itertools.islice(numbered, limit)


def _read_jsonl(path: Path, max_bytes: int) -> Iterator[SourceRow]:
    with path.open("rb") as handle:
        for number in itertools.count(1):
            raw = handle.readline(max_bytes + 2)
            if not raw:
                return
            if len(raw) > max_bytes and len(raw.rstrip(b"\r\n")) > max_bytes:
                yield _oversized(number, raw, handle, max_bytes)
                continue
            if number == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            if raw.isspace():
                continue
            yield _parse_json_line(number, raw)


def _oversized(number: int, head: bytes, handle: Any, max_bytes: int) -> SourceRow:
    # Skip the rest of the line without holding it: memory stays bounded by the limit.
    size, tail = len(head), head
    while tail and not tail.endswith(b"\n"):
        tail = handle.readline(1 << 20)
        size += len(tail)
    return SourceRow(
        number,
        None,
        f"row is {size:,} bytes, over the {max_bytes:,}-byte limit (--max-doc-bytes)",
        raw=head[:RAW_KEEP_CHARS].decode("utf-8", "replace"),
    )


def _parse_json_line(number: int, raw: bytes) -> SourceRow:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc):  # orjson stops at 1,024 levels
            return SourceRow(number, None, _TOO_DEEP, raw=_head(raw))
        return _json_line_error(number, raw)
    if not isinstance(value, dict):
        return SourceRow(
            number, None, f"expected a JSON object, got {type(value).__name__}", raw=_head(raw)
        )
    return SourceRow(number, value, json_line=raw)


def _json_line_error(number: int, raw: bytes) -> SourceRow:
    # Only the failure path pays for a second parse, to give the standard library's message.
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        reason = f"not valid UTF-8 ({exc.reason} at byte {exc.start})"
        return SourceRow(number, None, reason, raw=_head(raw))
    try:
        json.loads(text)
    except RecursionError:
        return SourceRow(number, None, _TOO_DEEP, raw=_head(raw))
    except ValueError as exc:
        return SourceRow(number, None, f"not valid JSON: {exc}", raw=_head(raw))
    # The standard library accepts what JSONB refuses (NaN, Infinity, lone surrogates).
    return SourceRow(number, None, "not valid JSON: NaN, Infinity or a lone surrogate", _head(raw))


def _head(raw: bytes) -> str:
    return raw[:RAW_KEEP_CHARS].decode("utf-8", "replace").rstrip("\r\n")


def _read_csv(path: Path, max_bytes: int) -> Iterator[SourceRow]:
    csv.field_size_limit(max(max_bytes, 131072))
    # surrogateescape keeps reading past invalid UTF-8; the row that holds it is bad, not the file.
    with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as handle:
        reader = csv.DictReader(handle)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield SourceRow(reader.line_num, None, f"cannot read CSV: {exc}")
                continue
            yield _csv_row(reader.line_num, row)


def _csv_row(number: int, row: dict[str | Any, Any]) -> SourceRow:
    if None in row:
        return SourceRow(number, None, "more values than header columns", raw=raw_text(row))
    try:
        "".join(filter(None, row.values())).encode("utf-8")
    except UnicodeEncodeError:
        bad = next(k for k, v in row.items() if v and not _is_utf8(v))
        reason = f"not valid UTF-8 (in column {bad!r})"
        return SourceRow(number, None, reason, raw=raw_text(row))
    return SourceRow(number, dict(row))


def _is_utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _read_parquet(path: Path, _max_bytes: int) -> Iterator[SourceRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # buffer_size streams each column chunk page by page instead of reading it whole.
        parquet = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
    except (pa.ArrowException, OSError) as exc:
        raise ConfigError(f"{path}: cannot read Parquet: {exc}") from exc
    numbered = enumerate(
        itertools.chain.from_iterable(map(_batch_rows, parquet.iter_batches(batch_size=1024))),
        start=1,
    )
    for number, row in numbered:
        yield _plain_row(number, row)


def _batch_rows(batch: Any) -> list[dict[str, Any] | SourceRow]:
    try:
        return list(batch.to_pylist())
    except UnicodeDecodeError:
        # One bad string spoils the batch: go row by row to find it, keep the others.
        out: list[dict[str, Any] | SourceRow] = []
        for i in range(batch.num_rows):
            try:
                out.extend(batch.slice(i, 1).to_pylist())
            except UnicodeDecodeError:
                out.append(SourceRow(0, None, "not valid UTF-8 (a string column)"))
        return out


def _plain_row(number: int, row: dict[str, Any] | SourceRow) -> SourceRow:
    if isinstance(row, SourceRow):
        return SourceRow(number, None, row.error)
    try:
        return SourceRow(number, {str(k): _plain(v, str(k)) for k, v in row.items()})
    except _NotUtf8 as exc:
        return SourceRow(number, None, f"not valid UTF-8 (in column {exc.args[0]!r})")


class _NotUtf8(ValueError):
    pass


def _plain(value: Any, column: str = "") -> Any:
    """A JSON value for a Parquet or SQL value: dates as ISO text, decimals as numbers."""
    kind = type(value)
    if value is None or kind is str or kind is int or kind is bool:
        return value
    if kind is float:
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _plain(v, column) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, column) for v in value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise _NotUtf8(column) from None
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    return str(value)


def raw_text(row: dict[Any, Any]) -> str:
    """A bad row's raw text for the rejects file, cut to RAW_KEEP_CHARS."""
    # The standard library escapes the lone surrogates that stand for invalid UTF-8 bytes.
    try:
        return json.dumps(row, default=str)[:RAW_KEEP_CHARS]
    except (RecursionError, ValueError):
        return "(the row is nested too deep to write out)"[:RAW_KEEP_CHARS]
