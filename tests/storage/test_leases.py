"""Leases, idempotent loads and the one-label rule, on SQLite and on real Postgres."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from storage.items import ItemIn, claim_items, ensure_spec, pending_item_ids, upsert_items
from storage.models import Item, ItemState, Label, SpecRow, Verdict
from storage.results import BatchResult, Fence, LabelRecord, Release, record_batch


def _spec(session: Session, version: int = 1) -> SpecRow:
    return ensure_spec(session, "t", version, "classification", {"v": version}, f"h{version}")


def _items(n: int) -> list[ItemIn]:
    return [
        ItemIn(
            f"e{i}",
            f"text {i}",
            {"id": f"e{i}"},
            {},
            hashlib.sha256(b"%d" % i).hexdigest(),
            {"label": "a"},
        )
        for i in range(n)
    ]


def _load(sessions: sessionmaker[Session], n: int, version: int = 1) -> SpecRow:
    with sessions.begin() as session:
        spec = _spec(session, version)
        upsert_items(session, spec, _items(n))
    return spec


def test_upsert_is_idempotent_and_loads_known_good(sessions: sessionmaker[Session]) -> None:
    _load(sessions, 5)
    with sessions.begin() as session:
        counts = upsert_items(session, _spec(session), _items(5))
        assert (counts.inserted, counts.existing, counts.relabel) == (0, 5, 0)
        assert session.scalar(select(func.count()).select_from(Item)) == 5
        assert session.scalar(select(func.count(Item.known_good))) == 5


def test_claim_leases_each_item_to_one_owner(sessions: sessionmaker[Session]) -> None:
    spec = _load(sessions, 10)
    with sessions.begin() as session:
        first = claim_items(session, spec.id, "w1", 600, limit=6)
    with sessions.begin() as session:
        second = claim_items(session, spec.id, "w2", 600, limit=6)
    assert len(first) == 6 and len(second) == 4
    assert not {c.id for c in first} & {c.id for c in second}
    with sessions.begin() as session:
        assert claim_items(session, spec.id, "w3", 600, item_ids=[c.id for c in first]) == []


def test_expired_lease_is_claimable_again(sessions: sessionmaker[Session]) -> None:
    spec = _load(sessions, 2)
    with sessions.begin() as session:
        claimed = claim_items(session, spec.id, "dead", 600, limit=2)
        session.execute(update(Item).values(lease_expires_at=datetime(2000, 1, 1, tzinfo=UTC)))
    with sessions.begin() as session:
        again = claim_items(session, spec.id, "alive", 600, limit=2)
    assert [c.id for c in again] == [c.id for c in claimed]
    assert all(c.attempts == 2 for c in again)


def test_one_label_per_item_and_version_even_when_written_twice(
    sessions: sessionmaker[Session],
) -> None:
    spec = _load(sessions, 1)
    with sessions.begin() as session:
        (item,) = claim_items(session, spec.id, "w1", 600)
    for verdict in (Verdict.ACCEPTED, Verdict.REJECTED):
        with sessions.begin() as session:
            label = LabelRecord(item.id, {"label": "a"}, verdict, [], 0.9, True, "h")
            record_batch(session, spec.id, BatchResult([], [], [label], []))
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Label)) == 1
        row = session.get(Item, item.id)
        assert row is not None and row.state == ItemState.ACCEPTED and row.lease_owner is None


def test_release_with_wait_hides_the_item_until_retry_at(sessions: sessionmaker[Session]) -> None:
    spec = _load(sessions, 1)
    with sessions.begin() as session:
        (item,) = claim_items(session, spec.id, "w1", 600)
    with sessions.begin() as session:
        record_batch(
            session,
            spec.id,
            BatchResult([], [], [], [Release(item.id, "rate_limited: 429", 3600, failed=False)]),
        )
    with sessions() as session:
        assert pending_item_ids(session, spec.id) == []
        row = session.get(Item, item.id)
        assert row is not None and row.state == ItemState.PENDING and row.retry_at is not None


def test_writes_are_fenced_by_owner_and_attempt(sessions: sessionmaker[Session]) -> None:
    """A claim's writes land only on the items it still holds: not on another owner's, and
    not on the same owner's later claim of the item (the attempt number tells them apart)."""
    spec = _load(sessions, 3)
    with sessions.begin() as session:
        old = claim_items(session, spec.id, "w1", 600, limit=3)
        # Item 0's lease expired and w1 itself claimed it again; w2 took item 1 over.
        session.execute(update(Item).values(lease_expires_at=datetime(2000, 1, 1, tzinfo=UTC)))
    with sessions.begin() as session:
        (again,) = claim_items(session, spec.id, "w1", 600, item_ids=[old[0].id])
        (taken,) = claim_items(session, spec.id, "w2", 600, item_ids=[old[1].id])
    labels = [LabelRecord(c.id, {"label": "a"}, Verdict.ACCEPTED, [], 0.9, True, "h") for c in old]
    fence = Fence("w1", {c.id: c.attempts for c in old})
    with sessions.begin() as session:
        lost = record_batch(session, spec.id, BatchResult([], [], labels, [], fence=fence))
    assert lost == 2
    with sessions() as session:
        rows = {i.id: i for i in session.scalars(select(Item))}
        assert session.scalars(select(Label.item_id)).all() == [old[2].id]
    assert (rows[again.id].state, rows[again.id].lease_owner) == (ItemState.LEASED, "w1")
    assert (rows[taken.id].state, rows[taken.id].lease_owner) == (ItemState.LEASED, "w2")
    # A late release moves nothing either.
    release = Release(taken.id, "timeout: slow", None, failed=False)
    with sessions.begin() as session:
        fence = Fence("w1", {taken.id: old[1].attempts})
        assert record_batch(session, spec.id, BatchResult([], [], [], [release], fence=fence)) == 1
    with sessions() as session:
        row = session.get(Item, taken.id)
        assert row is not None and (row.state, row.lease_owner) == (ItemState.LEASED, "w2")


def test_new_spec_version_relabels_on_purpose(sessions: sessionmaker[Session]) -> None:
    _load(sessions, 3)
    with sessions.begin() as session:
        session.execute(update(Item).values(state=ItemState.ACCEPTED))
    spec2 = _load(sessions, 3, version=2)
    with sessions() as session:
        assert len(pending_item_ids(session, spec2.id)) == 3
