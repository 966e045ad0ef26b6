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
from sqlalchemy import create_engine, select, text
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from schemas.errors import ConfigError
from storage.items import IngestCounts, ItemIn, upsert_items
from storage.models import Item, SpecRow

__all__ = ["load_items", "stream_query"]

# Per-row index probes, written so that the planner cannot turn them into a scan of every
# item of the spec: during a bulk load the statistics of `items` lag far behind its size.
# The hot statements run on the driver's cursor (psycopg placeholders), without the ORM.
_EXISTING_IDS = """
SELECT x.external_id, i.id, i.content_hash
FROM unnest(%(ids)s::text[]) AS x(external_id)
CROSS JOIN LATERAL (
  SELECT d.id, d.content_hash FROM items AS d
  WHERE d.spec_name = %(name)s AND d.external_id = x.external_id LIMIT 1) AS i
"""
_EXISTING_CONTENT = """
SELECT x.content_hash
FROM unnest(%(hashes)s::text[]) AS x(content_hash)
WHERE (SELECT 1 FROM items AS d
       WHERE d.spec_name = %(name)s AND d.content_hash = x.content_hash LIMIT 1) IS NOT NULL
"""
_REQUEUE = """
UPDATE items SET spec_id = :spec_id, state = 'pending', attempts = 0, retry_at = NULL,
  last_error = NULL, lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
WHERE id = ANY(CAST(:ids AS bigint[])) AND spec_id <> :spec_id
"""
_KNOWN_GOOD_FOR_EXISTING = """
INSERT INTO known_good (item_id, fields)
SELECT x.id, x.fields::jsonb
FROM unnest(CAST(:ids AS bigint[]), CAST(:fields AS text[])) AS x(id, fields)
ON CONFLICT DO NOTHING
"""
_NEW_IDS = "SELECT nextval(pg_get_serial_sequence('items', 'id')) FROM generate_series(1, %s)"
_COPY_ITEMS = (
    "COPY items (id, spec_name, spec_id, external_id, content_hash, text, payload, slices, "
    "state, attempts) FROM STDIN"
)
_COPY_KNOWN_GOOD = "COPY known_good (item_id, fields) FROM STDIN"
# JIT would compile for ~50 ms per statement here and save nothing; lz4 TOAST compression
# is several times cheaper than pglz on the ~2 KB rows (text + payload) a document makes.
_SETTINGS = ("SET LOCAL jit = off", "SET LOCAL default_toast_compression = lz4")


def load_items(
    session: Session, spec: SpecRow, items: Sequence[ItemIn], *, keep_duplicate_content: bool
) -> IngestCounts:
    """Load one chunk (distinct ids and contents) in the session's transaction; flush only."""
    if not items:
        return IngestCounts()
    dbapi: Any = session.connection().connection.driver_connection
    if session.get_bind().dialect.name == "postgresql" and hasattr(dbapi, "pgconn"):
        try:
            with session.begin_nested():  # psycopg 3: COPY on the session's own transaction
                return _copy_load(session, dbapi, spec, items, keep_duplicate_content)
        except (IntegrityError, psycopg.Error) as exc:  # COPY errors come from the driver
            if _sqlstate(exc) != "23505":  # unique_violation
                raise
            # Another load inserted one of these ids since the probe: the careful path.
    return _batched_load(session, spec, items, keep_duplicate_content)


def _sqlstate(exc: BaseException) -> str | None:
    return getattr(getattr(exc, "orig", exc), "sqlstate", None)


def _copy_load(
    session: Session, dbapi: Any, spec: SpecRow, items: Sequence[ItemIn], keep: bool
) -> IngestCounts:
    session.flush()
    _settings(session, dbapi)
    params = {"name": spec.name, "spec_id": spec.id}
    ids = [item.external_id for item in items]
    existing = dbapi.execute(_EXISTING_IDS, {**params, "ids": ids}).fetchall()
    counts = IngestCounts(existing=len(existing))
    if existing:
        counts.relabel = _requeue(session, spec, [row[1] for row in existing])
        counts.known_good = _known_good_for_existing(session, items, existing)
        by_id = {item.external_id: item for item in items}
        changed = [ext for ext, _, digest in existing if by_id[ext].content_hash != digest]
        counts.changed, counts.changed_ids = len(changed), changed[:20]
        seen = {row[0] for row in existing}
        items = [item for item in items if item.external_id not in seen]
    if items and not keep:
        hashes = [item.content_hash for item in items]
        found = dbapi.execute(_EXISTING_CONTENT, {**params, "hashes": hashes}).fetchall()
        stored = {row[0] for row in found}
        if stored:
            kept = [item for item in items if item.content_hash not in stored]
            counts.duplicate_content, items = len(items) - len(kept), kept
    if items:
        counts.inserted = len(items)
        counts.known_good += _copy_new(dbapi, spec, items)
    return counts


def _settings(session: Session, dbapi: Any) -> None:
    info = session.connection().info
    if "stillhouse_lz4" not in info:
        row = dbapi.execute(
            "SELECT 'lz4' = ANY(enumvals) FROM pg_settings WHERE name = 'default_toast_compression'"
        ).fetchone()
        info["stillhouse_lz4"] = bool(row and row[0])
    for statement in _SETTINGS if info["stillhouse_lz4"] else _SETTINGS[:1]:
        dbapi.execute(statement)


def _copy_new(dbapi: Any, spec: SpecRow, items: Sequence[ItemIn]) -> int:
    new_ids = [row[0] for row in dbapi.execute(_NEW_IDS, (len(items),)).fetchall()]
    with dbapi.cursor() as cursor:
        with cursor.copy(_COPY_ITEMS) as copy:
            copy.write(_copy_data(spec, new_ids, items))
        known = [
            f"{item_id}\t{_escape(orjson.dumps(item.known_good).decode())}\n"
            for item_id, item in zip(new_ids, items, strict=True)
            if item.known_good
        ]
        if known:
            with cursor.copy(_COPY_KNOWN_GOOD) as copy:
                copy.write("".join(known).encode())
    return len(known)


def _requeue(session: Session, spec: SpecRow, item_ids: list[int]) -> int:
    result = session.execute(text(_REQUEUE), {"spec_id": spec.id, "ids": item_ids})
    return int(getattr(result, "rowcount", 0) or 0)


def _known_good_for_existing(
    session: Session, items: Sequence[ItemIn], existing: Sequence[Any]
) -> int:
    known = {item.external_id: item.known_good for item in items if item.known_good}
    pairs = [(row[1], orjson.dumps(known[row[0]]).decode()) for row in existing if row[0] in known]
    if pairs:
        ids, fields = zip(*pairs, strict=True)
        session.execute(text(_KNOWN_GOOD_FOR_EXISTING), {"ids": list(ids), "fields": list(fields)})
    return len(pairs)


def _copy_data(spec: SpecRow, item_ids: Sequence[int], items: Sequence[ItemIn]) -> bytes:
    """COPY text format: tab-separated, backslash escapes."""
    prefix = f"\t{_escape(spec.name)}\t{spec.id}\t"
    lines = []
    for item_id, item in zip(item_ids, items, strict=True):
        payload = item.payload_json or orjson.dumps(item.payload, default=str).decode()
        lines.append(
            f"{item_id}{prefix}{_escape(item.external_id)}\t{item.content_hash}\t"
            f"{_escape(item.text)}\t{_escape(payload)}\t"
            f"{_escape(orjson.dumps(item.slices).decode())}\tpending\t0\n"
        )
    return "".join(lines).encode()


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
    duplicates = 0
    if not keep:
        owners = dict(
            session.execute(
                select(Item.content_hash, Item.external_id).where(
                    Item.spec_name == spec.name,
                    Item.content_hash.in_({i.content_hash for i in items}),
                )
            ).all()
        )
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
            duplicates, items = len(items) - len(kept), kept
    counts = upsert_items(session, spec, items)
    counts.duplicate_content += duplicates
    return counts


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
