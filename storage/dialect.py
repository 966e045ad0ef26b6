"""The few SQL spellings that differ between Postgres and SQLite, in one place."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, func, literal_column, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from sqlalchemy.sql.expression import ColumnElement

__all__ = ["db_now", "db_now_plus", "insert_for", "picked_ids"]


def insert_for(session: Session, table: Any) -> Any:
    """An INSERT that supports ``on_conflict_do_nothing`` on the session's dialect."""
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def db_now(session: Session) -> ColumnElement[Any]:
    """The database clock (leases and waits never trust a worker's clock)."""
    if session.get_bind().dialect.name == "postgresql":
        return func.now()
    return func.datetime("now")


def db_now_plus(session: Session, seconds: float) -> ColumnElement[Any]:
    """The database clock plus ``seconds``."""
    if session.get_bind().dialect.name == "postgresql":
        return func.now() + text(f"interval '{float(seconds)} seconds'")
    return func.datetime("now", literal_column(f"'{float(seconds):+f} seconds'"))


def picked_ids(session: Session, pick: Select[Any], name: str = "picked") -> Any:
    """``SELECT id FROM (pick)`` evaluated exactly once, for ``UPDATE … WHERE id IN (…)``.

    A bare ``IN (SELECT … LIMIT n FOR UPDATE SKIP LOCKED)`` may be re-run by Postgres's
    planner for a semi-join and update more than ``n`` rows; a materialized CTE cannot.
    """
    if session.get_bind().dialect.name != "postgresql":
        # SQLite has one writer and no row locks; its driver counts no rows after a WITH.
        return pick.scalar_subquery()
    cte = pick.cte(name).prefix_with("MATERIALIZED")
    return select(cte.c[0])
