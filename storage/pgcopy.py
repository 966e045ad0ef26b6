"""Postgres COPY for the rows a labeled batch writes (ledger, cached answers, labels).

``executemany`` costs the driver tens of microseconds of Python per row and per statement;
COPY streams the rows in one round trip. Tables with a unique key are copied into a temporary
table first and moved with ``INSERT … ON CONFLICT DO NOTHING``, which keeps the idempotence the
pipeline relies on (a redelivered batch never writes a second label or answer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from psycopg.types.json import Jsonb
from sqlalchemy import JSON, Table
from sqlalchemy.orm import Session

from storage.session import json_dumps

__all__ = ["copy_rows"]


def copy_rows(
    session: Session,
    table: Table,
    rows: Sequence[dict[str, Any]],
    *,
    on_conflict_do_nothing: bool = False,
) -> None:
    """Write ``rows`` (dicts with the same keys) into ``table`` with COPY (flush only)."""
    if not rows:
        return
    # Python-side column defaults (``default=0``) are applied by INSERT, not by COPY.
    defaults = {
        c.name: getattr(c.default, "arg", None)
        for c in table.columns
        if c.name not in rows[0] and c.default is not None and c.default.is_scalar
    }
    if defaults:
        rows = [{**defaults, **row} for row in rows]
    columns = list(rows[0])
    json_columns = {c for c in columns if _is_json(table, c)}
    dbapi = session.connection().connection.driver_connection
    assert dbapi is not None
    target = table.name
    if on_conflict_do_nothing:
        target = _staging(dbapi, table)
    names = ", ".join(columns)
    with dbapi.cursor() as cursor:
        with cursor.copy(f"COPY {target} ({names}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(
                    [
                        Jsonb(row[c], dumps=json_dumps)
                        if c in json_columns and row[c] is not None
                        else row[c]
                        for c in columns
                    ]
                )
        if on_conflict_do_nothing:
            cursor.execute(
                f"INSERT INTO {table.name} ({names}) SELECT {names} FROM {target} "
                f"ON CONFLICT DO NOTHING"
            )
            cursor.execute(f"DELETE FROM {target}")


def _staging(dbapi: Any, table: Table) -> str:
    # Per connection, emptied at each commit; IF NOT EXISTS costs one catalog lookup.
    name = f"_stage_{table.name}"
    with dbapi.cursor() as cursor:
        cursor.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS {name} "
            f"(LIKE {table.name} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )
    return name


def _is_json(table: Table, column: str) -> bool:
    return isinstance(table.c[column].type, JSON)
