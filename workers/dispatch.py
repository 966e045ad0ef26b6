"""Hand claimable items to the broker as id batches, after the transaction that queued them."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from storage.items import dispatchable_item_ids, mark_queued
from workers.celery_app import send_label_batch

__all__ = ["dispatch_pending"]


def dispatch_pending(
    sessions: sessionmaker[Session],
    celery: Any,
    spec_id: int,
    *,
    batch_size: int,
    limit: int = 100_000,
) -> int:
    """Queue up to ``limit`` ready items in batches; returns how many ids were sent."""
    with sessions.begin() as session:
        ids = dispatchable_item_ids(session, spec_id, limit=limit)
        mark_queued(session, ids)
    # Enqueue after commit: a worker never receives an id it cannot see.
    for start in range(0, len(ids), batch_size):
        send_label_batch(celery, spec_id, ids[start : start + batch_size])
    return len(ids)
