"""Normalize source rows into items and load them in chunks, streaming, resumably.

Loading is idempotent on (spec name, external id): re-running a backfill inserts nothing new,
so an interrupted load (even a killed process) resumes by running it again: every chunk is
its own committed transaction, and the rows of committed chunks are found and skipped.
A bad row never stops the good ones: it is counted, and written with its line (or row)
number, reason and raw text to the rejects file.

The policy, in the order it is applied to each row:

- **Bad rows**: not valid UTF-8 or JSON; not an object; a row whose JSON is over the size
  limit (``--max-doc-bytes``, default 1 MiB; a longer JSONL line is skipped unread); a value
  the store cannot hold (nesting over 100 levels, an integer beyond 64 bits, NaN or Infinity,
  a lone surrogate: :mod:`workers.rowpolicy` decides); an id that is missing, empty or only
  spaces, longer than 256 characters, or not text or an integer (ids are kept exactly as
  given, never trimmed, and escaped wherever they are printed); a field of the spec's
  ``input.text`` template that is missing, an object or a list; an empty rendered text.
- **Normalization**: NUL characters (U+0000) are removed from the whole row, since Postgres
  cannot store them. The rendered text is Unicode NFC, without BOM (U+FEFF), with ``\\n`` line
  endings (``\\r\\n`` and ``\\r`` become ``\\n``) and without leading or trailing whitespace. The
  content hash is the SHA-256 of that text; the stored payload is the row as read (less NULs).
- **Duplicate id** (later in the source, or already stored for the spec): the first row
  wins; the later one counts as ``existing``, and as ``changed`` if its text differs.
- **Duplicate content**: a new id whose normalized text is already stored (or earlier in the
  source) under another id of the same spec is not stored; it counts as ``duplicate_content``.
  ``keep_duplicate_content`` (``--keep-duplicate-content``) stores it as its own item; the
  teacher cache still answers it without a second paid call.
"""

from __future__ import annotations

import hashlib
import json
import sys
import unicodedata
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import orjson
from sqlalchemy.orm import Session, sessionmaker

from schemas.errors import ConfigError, PermanentError
from storage.bulk import copy_lines, load_items
from storage.items import IngestCounts, ItemIn, SpecSettings, ensure_spec, store_aliases
from storage.models import SpecRow
from workers.prompt import FIELD_PATTERN, render_input
from workers.rowpolicy import check_row
from workers.sources import (
    DEFAULT_MAX_DOC_BYTES,
    SourceRow,
    position_name,
    raw_text,
    read_source,
    read_sql,
)
from workers.spec import Spec

__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "DEFAULT_MAX_DOC_BYTES",
    "FIELD_CHECK_ROWS",
    "BadRow",
    "IngestSummary",
    "RejectsFile",
    "SourceRow",
    "check_fields",
    "load_source",
    "make_item",
    "normalize_text",
    "position_name",
    "read_source",
    "read_sql",
    "store_spec",
    "unmatched_known_good",
]

PARALLEL_WRITERS = 2  # chunks written at once on Postgres, each on its own connection
DEFAULT_CHUNK_ROWS = 5000  # one transaction each: large enough to amortize round trips
MAX_ID_CHARS = 256


@dataclass(frozen=True, slots=True)
class BadRow:
    line: int
    reason: str


@dataclass(slots=True)
class IngestSummary:
    rows: int = 0
    counts: IngestCounts = field(default_factory=IngestCounts)
    bad: list[BadRow] = field(default_factory=list)  # the first 100, for the terminal
    bad_count: int = 0
    # known-good rule name -> value -> rows, for the rules that compare against the labels
    known_good_values: dict[str, dict[str, int]] = field(default_factory=dict)


class RejectsFile:
    """Bad rows as JSON lines (position, reason, raw text); the file is made on the first."""

    def __init__(self, path: Path, *, position: str = "line") -> None:
        self.path = path
        self.position = position
        self.count = 0
        self._handle: IO[str] | None = None

    def write(self, number: int, reason: str, raw: str | None) -> None:
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # backslashreplace writes an undecodable byte (a lone surrogate) as a JSON escape.
            self._handle = self.path.open("w", encoding="utf-8", errors="backslashreplace")
        record = {self.position: number, "reason": reason, "raw": raw}
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.count += 1

    def flush(self) -> None:
        if self._handle is not None:
            self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> RejectsFile:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def normalize_text(text: str) -> str:
    """Unicode NFC, no BOM or NUL bytes, ``\\n`` line endings, no outer whitespace."""
    # `in` first: most documents hold none of these, and a scan is cheaper than a copy.
    if "\ufeff" in text:
        text = text.replace("\ufeff", "")
    if "\x00" in text:
        text = text.replace("\x00", "")
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return unicodedata.normalize("NFC", text).strip()


@dataclass(frozen=True, slots=True)
class _RowPlan:
    """What make_item needs from a spec, computed once per spec (the per-row path is hot)."""

    id_field: str
    template_fields: tuple[str, ...]
    known_good: tuple[tuple[str, str], ...]
    slice_fields: tuple[str, ...]
    rendered_only: frozenset[str]  # rendered into `text` and needed nowhere else


_plans: dict[int, tuple[Spec, _RowPlan]] = {}


def _plan(spec: Spec) -> _RowPlan:
    cached = _plans.get(id(spec))
    if cached is not None and cached[0] is spec:
        return cached[1]
    template_fields = tuple(FIELD_PATTERN.findall(str(spec.body["input"]["text"])))
    known_good = tuple((name, rule["source"]) for name, rule in spec.known_good.items())
    kept = {
        spec.id_field,
        *spec.slice_fields,
        *(source for _, source in known_good),
        *spec.sampling.get("slices", {}),  # what live-sample rates are decided on
    }
    plan = _RowPlan(
        id_field=spec.id_field,
        template_fields=template_fields,
        known_good=known_good,
        slice_fields=tuple(spec.slice_fields),
        rendered_only=frozenset(template_fields) - kept,
    )
    if len(_plans) >= 64:  # long-lived processes may parse many specs: stay small
        _plans.clear()
    _plans[id(spec)] = (spec, plan)
    return plan


def make_item(
    spec: Spec,
    row: dict[str, Any],
    *,
    max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES,
    json_line: bytes | None = None,
) -> ItemIn:
    """Turn one source row into an item: id, rendered text, slices, known-good record.

    ``json_line``: the JSON text the row was parsed from, when the reader has already held it
    to ``max_doc_bytes``; the row is then neither measured nor serialized again to check it.
    """
    plan = _plan(spec)
    check_row(row, trusted_scalars=json_line is not None)
    measured = json_line if json_line is not None else _checked_size(row, max_doc_bytes)
    # JSON always escapes U+0000 as \u0000. Postgres text and JSONB cannot hold it: one such
    # row would fail its whole chunk.
    if b"\\u0000" in measured if measured is not None else _flat_with_nul(row):
        row = _without_nul(row)
    external_id = _external_id(row, plan.id_field)
    _check_template_fields(row, plan.template_fields)
    text = normalize_text(render_input(spec, row))
    if not text:
        raise PermanentError("the rendered input text is empty")
    known = {
        name: row[source] for name, source in plan.known_good if row.get(source) not in (None, "")
    }
    rendered = plan.rendered_only
    if rendered and any(name in row for name in rendered):
        # The fields the template renders live in `text` already: storing them twice doubles
        # every row, and a bulk load is bound by the bytes Postgres writes.
        row = {key: value for key, value in row.items() if key not in rendered}
    payload = _json_bytes(row)
    return ItemIn(
        external_id=external_id,
        text=text,
        payload=row,
        slices={name: row.get(name) for name in plan.slice_fields},
        content_hash=hashlib.sha256(text.encode()).hexdigest(),
        known_good=known or None,
        payload_json=payload.decode(),
    )


def _checked_size(row: dict[str, Any], max_doc_bytes: int) -> bytes | None:
    """Refuse a row over the size limit; the row's JSON when it had to be made to know.

    A flat row of short strings is measured without serializing it (UTF-8 takes at most 4
    bytes a character): the per-row path of a bulk load is hot.
    """
    flat = all(isinstance(v, (str, int, float, bool)) or v is None for v in row.values())
    if flat and sum(len(v) for v in row.values() if isinstance(v, str)) * 4 < max_doc_bytes // 2:
        return None
    payload = _json_bytes(row)
    if len(payload) > max_doc_bytes:
        raise PermanentError(
            f"row is {len(payload):,} bytes of JSON, over the {max_doc_bytes:,}-byte limit "
            f"(--max-doc-bytes)"
        )
    return payload


def _flat_with_nul(row: dict[str, Any]) -> bool:
    return any(isinstance(v, str) and "\x00" in v for v in row.values()) or any(
        "\x00" in k for k in row
    )


def _json_bytes(row: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(row)
    except TypeError:  # a >64-bit integer, a non-text key, an unusual type
        try:
            return json.dumps(row, ensure_ascii=False, default=str).encode()
        except UnicodeEncodeError:
            raise PermanentError("not valid Unicode (a lone surrogate)") from None


def _external_id(row: dict[str, Any], id_field: str) -> str:
    raw_id = row.get(id_field)
    if not isinstance(raw_id, (str, int)) or isinstance(raw_id, bool):
        kind = "missing" if raw_id is None else type(raw_id).__name__
        raise PermanentError(
            f"missing or invalid id field {id_field!r} (expected text or an integer, got {kind})"
        )
    # An id is kept exactly as given: " a " and "a" are two ids, not one silently merged.
    external_id = str(raw_id)
    if not external_id.strip():
        raise PermanentError(f"missing or invalid id field {id_field!r} (empty or only spaces)")
    if len(external_id) > MAX_ID_CHARS:
        raise PermanentError(
            f"id field {id_field!r} is {len(external_id):,} characters, over {MAX_ID_CHARS}"
        )
    return external_id


def _check_template_fields(row: dict[str, Any], fields: tuple[str, ...]) -> None:
    for name in fields:
        value = row.get(name)
        if isinstance(value, (dict, list)):
            kind = "an object" if isinstance(value, dict) else "a list"
            raise PermanentError(
                f"field {name!r} used by the spec's input.text is {kind}, not text or a number"
            )


def _without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nul(v) for v in value]
    return value


FIELD_CHECK_ROWS = 1000  # the rows a backfill looks at before it writes anything


def check_fields(spec: Spec, rows: Sequence[SourceRow], source: str = "the source") -> list[str]:
    """Look at ``rows`` (the start of a source) for the fields the spec reads, before anything
    is written; a typo such as ``queu`` must not pass in silence.

    Refused (``ConfigError``): a template or id field no row has (every row would be bad), and
    a known-good field no row has while ``checks.require_known_good_match`` is on (it would
    turn the known-good check off in silence). Returned as warnings: a slice field no row has
    (one slice of ``None``), and a known-good field when the match is not required.

    A field counts as there when a row has the key, even with null or an empty value (a row
    without a known-good record has it empty). Rows that could not be read are left out.
    """
    read = [r.row for r in rows if r.row is not None]
    if not read:
        return []
    seen: set[str] = set()
    for row in read:
        seen.update(row)
    required = bool(spec.checks["require_known_good_match"])
    wanted: list[tuple[str, str, bool]] = [
        *(
            (f"known_good.{name}.source", rule["source"], required)
            for name, rule in spec.known_good.items()
        ),
        *(("slices", name, False) for name in spec.slice_fields),
        *(
            ("input.text", name, True)
            for name in FIELD_PATTERN.findall(str(spec.body["input"]["text"]))
        ),
        ("input.id_field", spec.id_field, True),
    ]
    missing = [(where, name, fatal) for where, name, fatal in wanted if name not in seen]
    shown = ", ".join(sorted(seen)[:30]) + (" …" if len(seen) > 30 else "")
    where_seen = f"none of the first {len(read):,} rows of {source} has"
    errors = [f"{where} reads field {name!r}" for where, name, fatal in missing if fatal]
    if errors:
        hint = ""
        if any(e.startswith("known_good") for e in errors):
            hint = (
                " (with checks.require_known_good_match, a known-good field that no row has "
                "would turn the known-good check off in silence)"
            )
        raise ConfigError(
            f"spec {spec.name!r}: {'; '.join(errors)}, which {where_seen}{hint}. The rows "
            f"have: {shown}. Fix the field name in the spec; a row without a value has the "
            f"field, null or empty"
        )
    return [
        f"{where} reads field {name!r}, which {where_seen} (they have: {shown}): "
        + ("every item gets this slice as null" if where == "slices" else "no record is checked")
        for where, name, _ in missing
    ]


def unmatched_known_good(spec: Spec, counts: dict[str, dict[str, int]]) -> list[str]:
    """Known-good values that no label of the spec can match, with their counts, worst first:
    a spec label ``sport`` against records that say ``sports`` rejects every such item."""
    labels = spec.label_names
    if not labels:
        return []
    problems = []
    for name, values in counts.items():
        rule = spec.known_good.get(name, {})
        fold = rule.get("compare") in ("casefold", "fuzzy")
        known = {label.casefold() if fold else label for label in labels}
        unmatched = {
            value: n
            for value, n in values.items()
            if (value.casefold() if fold else value) not in known
        }
        if unmatched:
            top = sorted(unmatched.items(), key=lambda kv: -kv[1])[:5]
            listed = ", ".join(f"{v!r} ({n:,} rows)" for v, n in top)
            problems.append(
                f"known_good.{name}: {sum(unmatched.values()):,} rows have a value no label "
                f"of the spec matches: {listed}; those items will be rejected as "
                f"known_good_mismatch (the spec's labels: {', '.join(labels)}): rename the "
                f"label, or map the values in the source"
            )
    return problems


def store_spec(session: Session, spec: Spec) -> SpecRow:
    """Store this spec version (or find it), with the operational settings the store's
    queries read as columns."""
    labeling = spec.labeling
    settings = SpecSettings(
        batch_size=labeling["batch_size"],
        max_attempts=labeling["max_attempts"],
        lease_s=labeling["lease_s"],
        budget_usd=spec.budget_usd,
        labeling_mode=spec.labeling_mode,
    )
    return ensure_spec(
        session, spec.name, spec.version, spec.kind, spec.body, spec.content_hash, settings
    )


def load_source(
    sessions: sessionmaker[Session],
    spec: Spec,
    rows: Iterable[SourceRow],
    *,
    chunk_size: int = DEFAULT_CHUNK_ROWS,
    on_chunk: Callable[[IngestSummary], None] | None = None,
    rejects: RejectsFile | None = None,
    max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES,
    keep_duplicate_content: bool = False,
) -> IngestSummary:
    """Load rows in chunks, one committed transaction per chunk (so an interrupted load resumes).

    One writer thread stores chunk N while this thread reads and normalizes chunk N+1: the
    database's work overlaps the parsing. ``on_chunk`` runs here after each commit.
    """
    summary = IngestSummary()
    with sessions.begin() as session:
        spec_row = store_spec(session, spec)
        target = _Target(spec_row.id, spec_row.name, session.get_bind().dialect.name)
    with (
        _short_switch_interval(),
        _ChunkWriter(sessions, target, summary, on_chunk, rejects, keep_duplicate_content) as w,
    ):
        chunk: list[ItemIn] = []
        label_rules = [name for name in spec.known_good if name == "label"] if spec.labels else []
        tally = {name: summary.known_good_values.setdefault(name, {}) for name in label_rules}
        for source_row in rows:
            summary.rows += 1
            item = _to_item(spec, source_row, summary, rejects, max_doc_bytes)
            if item is not None:
                if tally and item.known_good:
                    for name, values in tally.items():
                        value = item.known_good.get(name)
                        if isinstance(value, str):
                            values[value] = values.get(value, 0) + 1
                chunk.append(item)
                if len(chunk) >= chunk_size:
                    w.submit(chunk)
                    chunk = []
        w.submit(chunk)
    return summary


@contextmanager
def _short_switch_interval() -> Iterator[None]:
    # The reading thread is busy in Python: each time a writer's database call returns, the
    # writer waits up to the interpreter's switch interval (5 ms) for the GIL, several times
    # a chunk. 1 ms lets the writers get back to Postgres sooner (about 10 % more rows/s).
    previous = sys.getswitchinterval()
    sys.setswitchinterval(min(previous, 0.001))
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def _to_item(
    spec: Spec,
    source_row: SourceRow,
    summary: IngestSummary,
    rejects: RejectsFile | None,
    max_doc_bytes: int,
) -> ItemIn | None:
    error, raw = source_row.error, source_row.raw
    if source_row.row is not None:
        try:
            return make_item(
                spec, source_row.row, max_doc_bytes=max_doc_bytes, json_line=source_row.json_line
            )
        except PermanentError as exc:
            error, raw = str(exc), raw_text(source_row.row)
    reason = error or "unreadable row"
    summary.bad_count += 1
    if len(summary.bad) < 100:
        summary.bad.append(BadRow(source_row.line, reason))
    if rejects is not None:
        rejects.write(source_row.line, reason, raw)
    return None


@dataclass(frozen=True, slots=True)
class _Target:
    spec_id: int
    spec_name: str
    dialect: str


class _ChunkWriter:
    """Writes chunks on background threads, each chunk its own transaction.

    The writer threads only talk to the database: the reading thread dedupes each chunk and
    builds its COPY lines before handing it over, so Python work overlaps the database's.
    On Postgres two chunks are written at once, on two connections, so that Postgres works on
    both cores while one chunk's probes or commit wait. Each chunk is deduped here against
    the chunks still in flight (which its probes may not see yet); every older chunk has
    committed before a new one is handed over, so the database's probes cover those.
    Results are counted in chunk order.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        target: _Target,
        summary: IngestSummary,
        on_chunk: Callable[[IngestSummary], None] | None,
        rejects: RejectsFile | None,
        keep_duplicate_content: bool,
    ) -> None:
        self._sessions, self._target, self._summary = sessions, target, summary
        self._on_chunk, self._rejects, self._keep = on_chunk, rejects, keep_duplicate_content
        # SQLite takes one writer at a time: a second would only wait for its lock.
        self._writers = PARALLEL_WRITERS if target.dialect == "postgresql" else 1
        self._pool = ThreadPoolExecutor(self._writers, thread_name_prefix="stillhouse-load")
        self._in_flight: deque[tuple[Future[IngestCounts], _Seen]] = deque()

    def submit(self, chunk: list[ItemIn]) -> None:
        """Hand over one chunk; an empty one waits for every chunk in flight."""
        while self._in_flight and (not chunk or len(self._in_flight) >= self._writers):
            self._finish_oldest()
        if not chunk:
            return
        earlier = [seen for _, seen in self._in_flight]
        unique, counts, seen = _dedupe(chunk, keep_duplicate_content=self._keep, earlier=earlier)
        target = self._target
        lines = None
        if target.dialect == "postgresql":
            lines = copy_lines(target.spec_name, target.spec_id, unique)
        self._in_flight.append((self._pool.submit(self._write, unique, counts, lines), seen))

    def _finish_oldest(self) -> None:
        future, _ = self._in_flight.popleft()
        counts = future.result()
        if counts.duplicates:
            # After this chunk and every one before it committed: the items the duplicates
            # point at are all stored now.
            with self._sessions.begin() as session:
                store_aliases(session, self._target.spec_name, counts.duplicates)
            counts.duplicates = []
        self._summary.counts.add(counts)
        if self._rejects is not None:
            self._rejects.flush()
        if self._on_chunk is not None:
            self._on_chunk(self._summary)

    def _write(
        self, unique: list[ItemIn], counts: IngestCounts, lines: list[str] | None
    ) -> IngestCounts:
        with self._sessions.begin() as session:
            spec_row = session.get(SpecRow, self._target.spec_id)
            assert spec_row is not None
            loaded = load_items(
                session, spec_row, unique, keep_duplicate_content=self._keep, lines=lines
            )
        counts.add(loaded)
        return counts

    def __enter__(self) -> _ChunkWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        _exc: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None:
                self.submit([])
        finally:
            self._pool.shutdown(wait=True)  # chunks in flight commit, even on Ctrl-C


@dataclass(slots=True)
class _Seen:
    """The ids (with their content hashes) and the contents of one chunk."""

    ids: dict[str, str] = field(default_factory=dict)
    hashes: set[str] = field(default_factory=set)


def _dedupe(
    chunk: list[ItemIn], *, keep_duplicate_content: bool, earlier: Sequence[_Seen] = ()
) -> tuple[list[ItemIn], IngestCounts, _Seen]:
    # The first row with a given id (or, unless kept, a given content) wins within a chunk
    # and against the chunks still being written; the database applies the same rule across
    # committed chunks and runs.
    counts = IngestCounts()
    seen = _Seen()
    by_id: dict[str, ItemIn] = {}
    for item in chunk:
        first = by_id.get(item.external_id)
        first_hash = first.content_hash if first is not None else _earlier_id(earlier, item)
        if first_hash is not None:
            counts.existing += 1
            if first_hash != item.content_hash:
                counts.changed += 1
                counts.changed_ids.append(item.external_id)
        elif not keep_duplicate_content and (
            item.content_hash in seen.hashes or any(item.content_hash in e.hashes for e in earlier)
        ):
            counts.duplicate_content += 1
            counts.duplicates.append((item.external_id, item.content_hash))
        else:
            by_id[item.external_id] = item
            seen.ids[item.external_id] = item.content_hash
            seen.hashes.add(item.content_hash)
    counts.changed_ids = counts.changed_ids[:20]
    return list(by_id.values()), counts, seen


def _earlier_id(earlier: Sequence[_Seen], item: ItemIn) -> str | None:
    for other in earlier:
        digest = other.ids.get(item.external_id)
        if digest is not None:
            return digest
    return None
