"""`stillhouse status`: counts by state and verdict, spend and rate."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from schemas.errors import ConfigError
from stillhouse.context import open_database
from stillhouse.settings import Settings
from storage.models import SpecRow
from storage.stats import status
from workers.spec import load_spec

__all__ = ["run_status"]


def run_status(settings: Settings, spec_name: str | None) -> dict[str, Any]:
    """Counts by state and verdict, spend and rate, for one spec or all (what `status
    --json` prints; ``stillhouse.output.show_status`` prints the table)."""
    with open_database(settings) as sessions, sessions() as session:
        spec_name = _stored_spec_name(session, spec_name)
        now = status(session, spec_name)
    return {"spec": spec_name, **now.as_dict()}


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
