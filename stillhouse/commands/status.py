"""`stillhouse status`: counts by state and verdict, spend and rate."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from sqlalchemy import select
from sqlalchemy.orm import Session

from schemas.errors import ConfigError
from stillhouse.context import open_database
from stillhouse.output import cell, plain, table_console
from stillhouse.settings import Settings
from storage.models import SpecRow
from storage.stats import status
from workers.spec import load_spec

__all__ = ["run_status"]


def run_status(
    settings: Settings, spec_name: str | None, *, as_json: bool, console: Console
) -> dict[str, Any]:
    """Counts by state and verdict, spend and rate (what `status --json` prints); the table
    unless ``as_json``."""
    with open_database(settings) as sessions:
        with sessions() as session:
            spec_name = _stored_spec_name(session, spec_name)
            now = status(session, spec_name)
        result = now.as_dict()
        if as_json:
            return result
        table = Table(title=f"stillhouse status{f' — {spec_name}' if spec_name else ''}")
        table.add_column("what")
        table.add_column("count", justify="right")
        for name, count in {
            **now.by_state,
            **{f"verdict {k}": v for k, v in now.by_verdict.items()},
        }.items():
            table.add_row(cell(name), str(count))
        table.add_row("items", str(now.items))
        for name, count in now.calls.items():
            table.add_row(f"calls {name}", str(count))
        table.add_row("spend (USD)", f"{now.spend_usd:.4f}")
        table.add_row("labeled / s", "n/a" if now.labeled_per_s is None else str(now.labeled_per_s))
        table_console().print(table)
        if now.last_error:
            console.print(
                f"last error on an unfinished item: {plain(now.last_error)}",
                markup=False,
                highlight=False,
            )
        return result


def _stored_spec_name(session: Session, given: str | None) -> str | None:
    """The spec name ``status --spec`` means: a stored name, or the name in a spec file (a
    path or a bundled name); a name the store does not know is an error, not a table of
    zeros."""
    if given is None:
        return None
    names = sorted(set(session.scalars(select(SpecRow.name))))
    if given in names:
        return given
    try:
        name = load_spec(given).name
    except ConfigError:
        name = None
    if name in names:
        return name
    known = ", ".join(names) if names else "none yet: run `stillhouse backfill` first"
    raise ConfigError(f"no spec named {given!r} in the store (specs stored: {known})")
