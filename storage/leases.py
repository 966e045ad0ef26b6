"""Dispatch and sweep queries: hand ready items to the broker, take back what got lost.

Postgres is the source of truth, so nothing the broker loses is lost: an expired lease goes
back to pending (or to failed after ``labeling.max_attempts`` claims, so a poison document
cannot loop), and an item marked queued whose message vanished (a Redis flush or restart) goes
back to pending. Every time comes from the database clock, never a worker's.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, case, func, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from storage.dialect import db_now, db_now_plus, picked_ids
from storage.models import Item, ItemState, SpecRow

__all__ = [
    "LEASE_EXPIRED",
    "SweepCounts",
    "batch_sizes",
    "claim_ready",
    "expire_leases",
    "extend_leases",
    "held_by",
    "hold_back",
    "next_retry_in",
    "queued_counts",
    "ready_now",
    "reclaim_dead_owners",
    "release_owner",
    "requeue_lost",
    "return_to_pending",
]


LEASE_EXPIRED = "lease_expired"  # the error kind of an item whose lease ran out


@dataclass(slots=True)
class SweepCounts:
    """What one sweep changed."""

    expired: int = 0  # leases that ran out: back to pending
    failed: int = 0  # leases that ran out on the last allowed attempt
    requeued: int = 0  # queued items whose broker message was lost


def batch_sizes(session: Session) -> dict[int, int]:
    """Each spec version's ``labeling.batch_size``."""
    return {
        spec_id: size for spec_id, size in session.execute(select(SpecRow.id, SpecRow.batch_size))
    }


def expire_leases(session: Session, *, limit: int = 5000) -> SweepCounts:
    """Return expired leases to pending; fail the items that used their last attempt.

    A claim counts an attempt, so an item whose worker dies every time (a document that
    crashes the parser, runs out of memory, hangs past the time limit) ends ``failed``.
    """
    now = db_now(session)
    rows = session.execute(
        select(Item.id, Item.attempts, SpecRow.max_attempts)
        .join(SpecRow, SpecRow.id == Item.spec_id)
        .where(Item.state == ItemState.LEASED, Item.lease_expires_at < now)
        .limit(limit)
        .with_for_update(of=Item, skip_locked=True)
    ).all()
    counts = SweepCounts()
    if not rows:
        return counts
    failed: list[int] = []
    back: list[int] = []
    for row in rows:
        (failed if row.attempts >= row.max_attempts else back).append(row.id)
    counts.failed = _set_state(
        session,
        failed,
        ItemState.FAILED,
        "lease_expired: the lease ran out on the last allowed attempt (labeling.max_attempts): "
        "the worker died or ran past its lease on every try",
    )
    counts.expired = _set_state(
        session,
        back,
        ItemState.PENDING,
        "lease_expired: the worker died or ran past its lease; the item was returned to pending",
    )
    return counts


def _set_state(session: Session, ids: list[int], state: ItemState, error: str) -> int:
    if not ids:
        return 0
    result = session.execute(
        update(Item)
        .where(
            Item.id.in_(ids),
            Item.state == ItemState.LEASED,
            Item.lease_expires_at < db_now(session),
        )
        .values(
            state=state,
            lease_owner=None,
            lease_expires_at=None,
            last_error=error,
            last_error_kind=LEASE_EXPIRED,
        )
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def requeue_lost(session: Session, *, older_than_s: float, limit: int = 50_000) -> int:
    """Queued items not picked up for ``older_than_s``: their message is presumed lost.

    Safe even when the message still exists: a second delivery finds the item leased or done
    and skips it (claims are leases, labels are ``ON CONFLICT DO NOTHING``).
    """
    stale = (
        select(Item.id)
        .where(
            Item.state == ItemState.QUEUED,
            Item.updated_at < db_now_plus(session, -older_than_s),
        )
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    result = session.execute(
        update(Item)
        .where(Item.id.in_(picked_ids(session, stale)), Item.state == ItemState.QUEUED)
        .values(state=ItemState.PENDING)
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def held_by(owner: str, item_ids: Sequence[int]) -> ColumnElement[bool]:
    """Those of these items that ``owner`` still leases: what a claim may renew or write."""
    return and_(
        Item.id.in_(list(item_ids)), Item.state == ItemState.LEASED, Item.lease_owner == owner
    )


def extend_leases(session: Session, owner: str, item_ids: Sequence[int], lease_s: float) -> int:
    """A live worker's heartbeat for a batch it is still working on: its leases on these
    items run ``lease_s`` from now again. Items it no longer holds are left alone (the
    sweeper or another worker has them); returns how many it still holds."""
    if not item_ids:
        return 0
    result = session.execute(
        update(Item)
        .where(held_by(owner, item_ids))
        .values(lease_expires_at=db_now_plus(session, lease_s))
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def release_owner(session: Session, owner: str, *, refund: bool = True) -> int:
    """Give back every lease ``owner`` holds: its items go back to ``pending`` at once, with
    the claim's attempt refunded (a run that stops, by Ctrl-C or an error, did not fail them)."""
    values: dict[str, Any] = {
        "state": ItemState.PENDING,
        "lease_owner": None,
        "lease_expires_at": None,
    }
    if refund:
        values["attempts"] = case((Item.attempts > 0, Item.attempts - 1), else_=0)
    result = session.execute(
        update(Item)
        .where(Item.state == ItemState.LEASED, Item.lease_owner == owner)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def reclaim_dead_owners(
    session: Session,
    spec_id: int,
    host: str,
    alive: Callable[[int], bool],
) -> int:
    """The leases of processes on ``host`` that are gone (a ``kill -9`` of an embedded run):
    expired now, then swept by the sweeper's rules (back to pending, or failed on the last
    allowed attempt). Owners are ``HOST:PID:…`` (``workers.pipeline.worker_id``)."""
    owners = session.scalars(
        select(Item.lease_owner)
        .where(
            Item.spec_id == spec_id,
            Item.state == ItemState.LEASED,
            Item.lease_owner.startswith(f"{host}:", autoescape=True),
        )
        .distinct()
    ).all()
    dead = [o for o in owners if o is not None and not _alive(o, alive)]
    if not dead:
        return 0
    session.execute(
        update(Item)
        .where(Item.state == ItemState.LEASED, Item.lease_owner.in_(dead))
        .values(lease_expires_at=db_now_plus(session, -1))
        .execution_options(synchronize_session=False)
    )
    swept = expire_leases(session)
    return swept.expired + swept.failed


def _alive(owner: str, alive: Callable[[int], bool]) -> bool:
    parts = owner.split(":")
    try:
        return alive(int(parts[1]))
    except (IndexError, ValueError):
        return True  # not ours to judge


def hold_back(
    session: Session, item_ids: Sequence[int], kind: str, error: str, wait_s: float
) -> int:
    """Items a worker cannot label now (its configuration is wrong): back to ``pending`` with
    the error on them and a wait before they are queued again, attempts untouched; items
    another worker holds or finished are left alone."""
    if not item_ids:
        return 0
    result = session.execute(
        update(Item)
        .where(Item.id.in_(list(item_ids)), Item.state.in_([ItemState.QUEUED, ItemState.PENDING]))
        .values(
            state=ItemState.PENDING,
            last_error=error,
            last_error_kind=kind,
            retry_at=db_now_plus(session, wait_s),
        )
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def ready_now(session: Session, spec_id: int) -> int:
    """Pending items of ``spec_id`` that wait for a ``retry_at``: ready at once (an embedded
    run starts with a fresh view of the teacher; the waits were an earlier run's)."""
    result = session.execute(
        update(Item)
        .where(
            Item.spec_id == spec_id,
            Item.state == ItemState.PENDING,
            Item.retry_at.is_not(None),
        )
        .values(retry_at=None)
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def next_retry_in(session: Session, spec_id: int) -> float | None:
    """Seconds until the soonest ``retry_at`` among ``spec_id``'s pending items that wait
    (a backoff after a failed call, a 429's wait; negative once due), or None if none waits."""
    soonest = func.min(Item.retry_at)
    if session.get_bind().dialect.name == "postgresql":
        ahead: Any = func.extract("epoch", soonest - func.now())
    else:
        ahead = (func.julianday(soonest) - func.julianday("now")) * 86400.0
    seconds = session.scalar(
        select(ahead).where(
            Item.spec_id == spec_id,
            Item.state == ItemState.PENDING,
            Item.retry_at.is_not(None),
        )
    )
    return None if seconds is None else float(seconds)


def queued_counts(session: Session) -> dict[int, int]:
    """Items handed to the broker and not yet claimed, per spec version."""
    rows = session.execute(
        select(Item.spec_id, func.count())
        .where(Item.state == ItemState.QUEUED)
        .group_by(Item.spec_id)
    )
    return {spec_id: int(n) for spec_id, n in rows}


def claim_ready(
    session: Session, *, limits: dict[int, int] | None = None, spec_ids: Sequence[int] = ()
) -> dict[int, list[int]]:
    """Mark ready items queued and return their ids per spec version.

    Ready means pending with no wait (or a ``retry_at`` in the past). ``FOR UPDATE SKIP LOCKED``
    lets several dispatchers run at once without handing out an item twice. ``limits`` caps
    how many items of each spec version are taken in this pass.
    """
    ids = list(spec_ids) or _specs_with_ready_items(session)
    claimed: dict[int, list[int]] = defaultdict(list)
    for spec_id in ids:
        limit = (limits or {}).get(spec_id, 10_000)
        if limit <= 0:
            continue
        pick = (
            select(Item.id)
            .where(Item.spec_id == spec_id, _ready(session))
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        rows = session.execute(
            update(Item)
            .where(Item.id.in_(picked_ids(session, pick)), Item.state == ItemState.PENDING)
            .values(state=ItemState.QUEUED)
            .returning(Item.id)
            .execution_options(synchronize_session=False)
        )
        claimed[spec_id] = sorted(row[0] for row in rows)
    return {spec_id: got for spec_id, got in claimed.items() if got}


def _ready(session: Session) -> Any:
    now = db_now(session)
    return and_(Item.state == ItemState.PENDING, or_(Item.retry_at.is_(None), Item.retry_at <= now))


def _specs_with_ready_items(session: Session) -> list[int]:
    # Per spec version through the (spec_id, state, retry_at) index, not one scan of items.
    # A spec in batch mode is the batch submitter's (workers.batches), not the dispatcher's.
    spec_ids = session.scalars(
        select(SpecRow.id).where(SpecRow.labeling_mode != "batch").order_by(SpecRow.id)
    ).all()
    return [
        spec_id
        for spec_id in spec_ids
        if session.scalar(select(Item.id).where(Item.spec_id == spec_id, _ready(session)).limit(1))
    ]


def return_to_pending(session: Session, item_ids: Sequence[int]) -> int:
    """Undo a dispatch whose publish failed (the broker is down): the items are ready again."""
    if not item_ids:
        return 0
    result = session.execute(
        update(Item)
        .where(Item.id.in_(list(item_ids)), Item.state == ItemState.QUEUED)
        .values(state=ItemState.PENDING)
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)
