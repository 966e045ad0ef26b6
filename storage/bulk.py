"""Bulk load: one chunk of items per call, COPY on Postgres, batched inserts on SQLite.

Both paths keep the rules of :func:`storage.items.upsert_items` (idempotent on spec name and
external id; a changed document is counted, not overwritten; an item of an older spec version
goes back to pending) and add one: a new id whose normalized text is already stored under
another id of the same spec is a duplicate, counted and not stored (unless asked to keep it).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import orjson
import psycopg
from sqlalchemy import Select, create_engine, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from schemas.errors import ConfigError
from storage.items import (
    IngestCounts,
    ItemIn,
    add_known_good,
    requeue_for_version,
    upsert_items,
)
from storage.models import CONTENT_KEY, CONTENT_KEY_CHARS, Item, SpecRow

__all__ = [
    "PROBE_CONTENT",
    "PROBE_IDS",
    "content_owners",
    "copy_lines",
    "load_items",
    "stream_query",
]

# The content probe goes through ix_items_spec_name_content_key: its expression must read
# exactly as the index's (16 = storage.models.CONTENT_KEY_CHARS).
# One round trip finds, for every row of a chunk, whether its id is stored (and under which
# item and content) and, unless duplicates are kept, whether its content is. The probes are
# per-row index lookups, written so that the planner cannot turn them into a scan of every
# item of the spec: during a bulk load the statistics of `items` lag far behind its size.
# The hot statements run on the driver's cursor (psycopg placeholders), without the ORM.
PROBE_IDS = """
SELECT 'id', x.external_id, i.id, i.content_hash
FROM jsonb_array_elements_text(%(ids)s::jsonb) AS x(external_id)
CROSS JOIN LATERAL (
  SELECT d.id, d.content_hash FROM items AS d
  WHERE d.spec_name = %(name)s AND d.external_id = x.external_id LIMIT 1) AS i
"""
PROBE_CONTENT = """
UNION ALL
SELECT 'content', x.content_hash, NULL, NULL
FROM jsonb_array_elements_text(%(hashes)s::jsonb) AS x(content_hash)
WHERE (SELECT 1 FROM items AS d
       WHERE d.spec_name = %(name)s
         AND substr(d.content_hash, 1, 16) = substr(x.content_hash, 1, 16)
         AND d.content_hash = x.content_hash LIMIT 1) IS NOT NULL
"""
# The ids come from the column's default: nothing needs them before the rows are stored.
_COPY_ITEMS = (
    "COPY items (spec_name, spec_id, external_id, content_hash, text, payload, slices, "
    "known_good, state, attempts) FROM STDIN"
)
# JIT would compile for ~50 ms per statement here and save nothing; lz4 TOAST compression
# is several times cheaper than pglz on the rows (text + payload) a long document makes.
_SETTINGS = "SELECT set_config('jit', 'off', true)"
_SETTINGS_LZ4 = (
    "SELECT set_config('jit', 'off', true), set_config('default_toast_compression', 'lz4', true)"
)


def load_items(
    session: Session,
    spec: SpecRow,
    items: Sequence[ItemIn],
    *,
    keep_duplicate_content: bool,
    lines: Sequence[str] | None = None,
) -> IngestCounts:
    """Load one chunk (distinct ids and contents) in the session's transaction; flush only.

    ``lines`` are the rows' COPY lines from :func:`copy_lines` when the caller built them
    already (a bulk load builds them on its reading thread, off the writer's path).
    """
    if not items:
        return IngestCounts()
    dbapi: Any = session.connection().connection.driver_connection
    if session.get_bind().dialect.name == "postgresql" and hasattr(dbapi, "pgconn"):
        try:
            with session.begin_nested():  # psycopg 3: COPY on the session's own transaction
                return _copy_load(session, dbapi, spec, items, keep_duplicate_content, lines)
        except (IntegrityError, psycopg.Error) as exc:  # COPY errors come from the driver
            if _sqlstate(exc) != "23505":  # unique_violation
                raise
            # Another load inserted one of these ids since the probe: the careful path.
    return _batched_load(session, spec, items, keep_duplicate_content)


def _sqlstate(exc: BaseException) -> str | None:
    return getattr(getattr(exc, "orig", exc), "sqlstate", None)


def _copy_load(
    session: Session,
    dbapi: Any,
    spec: SpecRow,
    items: Sequence[ItemIn],
    keep: bool,
    lines: Sequence[str] | None,
) -> IngestCounts:
    session.flush()
    _settings(session, dbapi)
    if lines is None:
        lines = copy_lines(spec.name, spec.id, items)
    # The lists travel as one JSON text each: adapting thousands of array elements one by one
    # costs the driver more than the probe costs Postgres.
    ids = orjson.dumps([item.external_id for item in items]).decode()
    params: dict[str, Any] = {"name": spec.name, "ids": ids}
    probe = PROBE_IDS
    if not keep:
        probe += PROBE_CONTENT
        params["hashes"] = orjson.dumps([item.content_hash for item in items]).decode()
    found = dbapi.execute(probe, params).fetchall()
    counts = IngestCounts()
    if not found:  # the common case of a backfill: every row is new
        counts.inserted = len(items)
        counts.known_good = sum(1 for item in items if item.known_good)
        _copy(dbapi, "".join(lines))
        return counts
    existing = [(row[1], row[2], row[3]) for row in found if row[0] == "id"]
    stored_content = {row[1] for row in found if row[0] == "content"}
    if existing:
        counts.existing = len(existing)
        counts.relabel = requeue_for_version(session, spec, [row[1] for row in existing])
        known = {item.external_id: item.known_good for item in items if item.known_good}
        counts.known_good = add_known_good(
            session, {row[1]: known[row[0]] for row in existing if row[0] in known}
        )
        by_id = {item.external_id: item for item in items}
        changed = [ext for ext, _, digest in existing if by_id[ext].content_hash != digest]
        counts.changed, counts.changed_ids = len(changed), changed[:20]
    seen = {row[0] for row in existing}
    kept = []
    for item, line in zip(items, lines, strict=True):
        if item.external_id in seen:
            continue
        if item.content_hash in stored_content:
            counts.duplicate_content += 1
            counts.duplicates.append((item.external_id, item.content_hash))
            continue
        kept.append(line)
        counts.inserted += 1
        counts.known_good += 1 if item.known_good else 0
    if kept:
        _copy(dbapi, "".join(kept))
    return counts


def _settings(session: Session, dbapi: Any) -> None:
    info = session.connection().info
    if "stillhouse_lz4" not in info:
        row = dbapi.execute(
            "SELECT 'lz4' = ANY(enumvals) FROM pg_settings WHERE name = 'default_toast_compression'"
        ).fetchone()
        info["stillhouse_lz4"] = bool(row and row[0])
    dbapi.execute(_SETTINGS_LZ4 if info["stillhouse_lz4"] else _SETTINGS)


def _copy(dbapi: Any, data: str) -> None:
    with dbapi.cursor() as cursor, cursor.copy(_COPY_ITEMS) as copy:
        copy.write(data.encode())


def copy_lines(spec_name: str, spec_id: int, items: Sequence[ItemIn]) -> list[str]:
    """Each item's row of ``COPY items`` in text format: tab-separated, backslash escapes."""
    prefix = f"{_escape(spec_name)}\t{spec_id}\t"
    lines = []
    for item in items:
        payload = item.payload_json or orjson.dumps(item.payload, default=str).decode()
        known = _escape(orjson.dumps(item.known_good).decode()) if item.known_good else "\\N"
        lines.append(
            f"{prefix}{_escape(item.external_id)}\t{item.content_hash}\t"
            f"{_escape(item.text)}\t{_escape(payload)}\t"
            f"{_escape(orjson.dumps(item.slices).decode())}\t{known}\tpending\t0\n"
        )
    return lines


def _escape(value: str) -> str:
    # Checks first: most values hold none of these, and `in` is much cheaper than replace.
    if "\\" in value:
        value = value.replace("\\", "\\\\")
    if "\n" in value:
        value = value.replace("\n", "\\n")
    if "\r" in value:
        value = value.replace("\r", "\\r")
    if "\t" in value:
        value = value.replace("\t", "\\t")
    return value


def _batched_load(
    session: Session, spec: SpecRow, items: Sequence[ItemIn], keep: bool
) -> IngestCounts:
    # SQLite (and other drivers): upsert_items' executemany, after the content check.
    duplicates: list[tuple[str, str]] = []
    if not keep:
        owners = {h: ext for h, ext in session.execute(content_owners(spec.name, items))}
        if owners:
            known_ids = set(
                session.scalars(
                    select(Item.external_id).where(
                        Item.spec_name == spec.name,
                        Item.external_id.in_([i.external_id for i in items]),
                    )
                )
            )
            kept = [i for i in items if i.external_id in known_ids or i.content_hash not in owners]
            kept_ids = {id(i) for i in kept}
            duplicates = [(i.external_id, i.content_hash) for i in items if id(i) not in kept_ids]
            items = kept
    counts = upsert_items(session, spec, items)
    counts.duplicate_content += len(duplicates)
    counts.duplicates.extend(duplicates)
    return counts


def content_owners(spec_name: str, items: Sequence[ItemIn]) -> Select[str, str]:
    """The stored items of ``spec_name`` holding any of these contents: (hash, external id).

    Found through ix_items_spec_name_content_key (the hash's first digits), then the full hash.
    """
    return select(Item.content_hash, Item.external_id).where(
        Item.spec_name == spec_name,
        CONTENT_KEY.in_({i.content_hash[:CONTENT_KEY_CHARS] for i in items}),
        Item.content_hash.in_({i.content_hash for i in items}),
    )


def stream_query(url: str, query: str, *, batch: int = 1000) -> Iterator[dict[str, Any]]:
    """Run a query on any SQLAlchemy URL now and stream its rows (server-side cursor)."""
    try:
        engine = create_engine(url)
        connection = engine.connect()
    except (SQLAlchemyError, ValueError, ImportError) as exc:
        raise ConfigError(f"--sql-url: cannot connect to {url.split('@')[-1]}: {exc}") from exc
    try:
        result = connection.execution_options(stream_results=True, yield_per=batch)
        rows = result.exec_driver_sql(query)
    except SQLAlchemyError as exc:
        connection.close()
        engine.dispose()
        raise ConfigError(f"--from-sql: the query failed: {getattr(exc, 'orig', exc)}") from exc

    def stream() -> Iterator[dict[str, Any]]:
        try:
            for row in rows:
                yield dict(row._mapping)
        finally:
            rows.close()
            connection.close()
            engine.dispose()

    return stream()
