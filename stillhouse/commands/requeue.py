"""`stillhouse requeue`: failed (or earlier versions' rejected) items back to pending."""

from __future__ import annotations

from typing import Any

from stillhouse.context import open_database
from stillhouse.settings import Settings
from workers.spec import load_spec

__all__ = ["run_requeue"]


def run_requeue(
    settings: Settings,
    spec_ref: str,
    *,
    failed: bool,
    rejected: bool,
    error_contains: str | None,
    external_ids: list[str] | None,
) -> dict[str, Any]:
    """Put failed (and, for a new spec version, earlier rejected) items back to pending
    (``stillhouse.output.show_requeue`` prints what it did)."""
    from storage.items import requeue_items
    from workers.ingest import store_spec

    spec = load_spec(spec_ref)
    with open_database(settings) as sessions, sessions.begin() as session:
        spec_row = store_spec(session, spec)  # a new version is stored here, ready to label
        done = requeue_items(
            session,
            spec_row,
            failed=failed,
            rejected=rejected,
            error_contains=error_contains,
            external_ids=external_ids,
        )
    result = {"spec": spec.name, "version": spec.version, "failed": done.failed}
    if rejected:
        result["rejected"] = done.rejected
    return result
