"""`stillhouse estimate` (and `backfill --dry-run`): calls, tokens, cost and time, before
anything is spent."""

from __future__ import annotations

from typing import Any

from stillhouse.context import open_database
from stillhouse.settings import Settings
from workers.ingest import read_source
from workers.spec import load_spec

__all__ = ["run_estimate"]


def run_estimate(
    settings: Settings, source: str, spec_ref: str, *, limit: int | None, sample: int
) -> dict[str, Any]:
    """What labeling ``source`` would cost; loads nothing, calls nothing
    (``stillhouse.output.show_estimate`` prints it)."""

    from workers.estimate import estimate_source

    spec = load_spec(spec_ref)
    rows = read_source(source, limit=limit)
    with open_database(settings) as sessions, sessions() as session:
        return estimate_source(
            session,
            spec,
            rows,
            sample_size=sample,
            workers=settings.worker_concurrency if settings.distributed else 1,
        ).as_dict()
