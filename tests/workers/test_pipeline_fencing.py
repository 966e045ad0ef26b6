"""A worker whose lease ran out must not pay again for, or write over, another worker's items.

The pipeline is driven directly (``LabelRuntime.label_batch``) against real local teachers
on loopback (the `fixed` backend, in a thread), on both databases:

- a batch still waiting to send when its lease runs out sends nothing more: the rest of its
  items go back with their attempt, and the teacher never sees those calls;
- a batch whose answers come back after another worker took its items over keeps only what
  costs nothing to keep (the answers, in the cache, and their ledger rows: real spend) and
  writes no label and no item state: the new owner's lease, write-ahead rows and labels
  stand.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker
from support import triage_body
from support.servers import serve_in_thread

from stillhouse.servers.teacher.app import create_app
from stillhouse.servers.teacher.backends import make_backend
from storage.dialect import db_now_plus
from storage.leases import expire_leases
from storage.models import CallStatus, Item, ItemState, Label, SpecRow, TeacherCall
from workers.ingest import SourceRow, load_source
from workers.pipeline import LabelRuntime
from workers.spec import parse_spec

ITEMS = 4


@contextmanager
def fixed_teacher(latency_ms: float) -> Iterator[str]:
    """The local teacher's `fixed` backend (a schema-valid answer after ``latency_ms``)."""
    app = create_app(make_backend("fixed", latency_ms=latency_ms))
    with serve_in_thread(app) as root:
        yield f"{root}/v1"


def received(url: str) -> int:
    return int(httpx.get(f"{url}/stats", timeout=5).json()["requests"])


def wait_until(check: Any, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def load_items(sessions: sessionmaker[Session], concurrency: int) -> int:
    """The triage spec on ITEMS tickets, with the given teacher concurrency; its spec id."""
    body = triage_body()
    body["name"] = "fencing"
    body["teacher"].update(concurrency=concurrency, timeout_s=5, max_retries=0)
    body["labeling"] = {"batch_size": ITEMS, "lease_s": 10, "max_attempts": 5}
    body["checks"]["require_known_good_match"] = False
    spec = parse_spec(body, source="fencing.yaml")
    rows = [
        SourceRow(i + 1, {"id": f"t{i}", "headline": f"ticket {i}", "body": f"printer {i} jams"})
        for i in range(ITEMS)
    ]
    load_source(sessions, spec, rows)
    with sessions() as session:
        spec_id = session.scalar(select(SpecRow.id).where(SpecRow.name == "fencing"))
    assert spec_id is not None
    return int(spec_id)


class StoppedClock:
    """time.monotonic, plus whatever the test says the process lost while it was stopped."""

    def __init__(self) -> None:
        self.lost = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.lost


def test_calls_not_sent_before_the_lease_ran_out_are_never_sent(
    sessions: sessionmaker[Session],
) -> None:
    spec_id = load_items(sessions, concurrency=1)  # one call at a time: a queue to stop in
    clock = StoppedClock()
    with fixed_teacher(latency_ms=300) as url:
        runtime = LabelRuntime(sessions, teacher_base_url=url, owner="a:1", clock=clock)
        with runtime:
            done: dict[str, Any] = {}
            batch = threading.Thread(
                target=lambda: done.update(summary=runtime.label_batch(spec_id)), daemon=True
            )
            batch.start()
            # The second call is at the teacher (300 ms to go): the process "stops" for 20 s.
            wait_until(lambda: received(url) >= 2, "two calls at the teacher")
            clock.lost = 20.0
            batch.join(timeout=30)
            assert received(url) == 2  # the two calls still queued were never sent
    summary = done["summary"]
    assert (summary.labeled, summary.teacher_calls, summary.released) == (2, 2, 2)
    with sessions() as session:
        items = session.scalars(select(Item).order_by(Item.id)).all()
        calls = session.scalars(select(TeacherCall)).all()
    assert [i.state for i in items].count(ItemState.ACCEPTED) == 2
    back = [i for i in items if i.state == ItemState.PENDING]
    assert len(back) == 2
    for item in back:
        assert item.attempts == 0  # nothing was sent: the claim's attempt is refunded
        assert item.lease_owner is None
        assert "lease on the item ran out before the call was sent" in (item.last_error or "")
    assert len(calls) == 2 and all(c.status == CallStatus.OK for c in calls)


def test_a_batch_that_comes_back_after_a_takeover_writes_over_nothing(
    sessions: sessionmaker[Session], database_url: str
) -> None:
    spec_id = load_items(sessions, concurrency=ITEMS)
    late_done: dict[str, Any] = {}
    new_done: dict[str, Any] = {}
    # The late worker's answers come back at 1 s, while the new owner's calls (3 s) are out.
    with fixed_teacher(latency_ms=1000) as slow, fixed_teacher(latency_ms=3000) as slower:
        late = LabelRuntime(sessions, teacher_base_url=slow, owner="late:1")
        new = LabelRuntime(sessions, teacher_base_url=slower, owner="new:2")
        with late, new:
            first = threading.Thread(
                target=lambda: late_done.update(summary=late.label_batch(spec_id)), daemon=True
            )
            first.start()
            wait_until(lambda: received(slow) == ITEMS, "the late worker's calls")
            # Its lease runs out (it was stopped, say); the sweeper takes the items back.
            with sessions.begin() as session:
                session.execute(update(Item).values(lease_expires_at=db_now_plus(session, -1)))
                swept = expire_leases(session)
            assert swept.expired == ITEMS
            second = threading.Thread(
                target=lambda: new_done.update(summary=new.label_batch(spec_id)), daemon=True
            )
            second.start()
            wait_until(lambda: received(slower) == ITEMS, "the new owner's calls")
            first.join(timeout=30)
            assert late_done["summary"].lost_leases == ITEMS
            with sessions() as session:
                items = session.scalars(select(Item)).all()
                assert session.scalars(select(Label)).all() == []
                calls = session.scalars(select(TeacherCall)).all()
            # The new owner's leases stand: nothing went back to pending, nothing was labeled.
            assert {(i.state, i.lease_owner, i.attempts) for i in items} == {
                (ItemState.LEASED, "new:2", 2)
            }
            # The late answers are real spend: on the ledger. The new owner's write-ahead
            # rows are still there (SQLite keeps them in the run's journal instead).
            statuses = sorted(c.status.value for c in calls)
            if database_url.startswith("postgresql"):
                assert statuses == sorted(["ok"] * ITEMS + ["in_flight"] * ITEMS)
            else:
                assert statuses == ["ok"] * ITEMS
            second.join(timeout=30)
    assert new_done["summary"].lost_leases == 0
    assert new_done["summary"].labeled == ITEMS
    with sessions() as session:
        labels = session.scalars(select(Label)).all()
        items = session.scalars(select(Item)).all()
        calls = session.scalars(select(TeacherCall)).all()
    assert len(labels) == ITEMS and {i.state for i in items} == {ItemState.ACCEPTED}
    # The ledger holds every request both teachers received, no more.
    assert sorted(c.status.value for c in calls) == ["ok"] * (2 * ITEMS)


@pytest.mark.slow
def test_a_live_batch_keeps_its_lease_past_lease_s(sessions: sessionmaker[Session]) -> None:
    """A batch still working when lease_s runs out (one call at a time, 2.6 s each, 4 items:
    10.4 s against a 10 s lease) renews its leases: every call goes out, the sweeper takes
    nothing back at 10.2 s, and every item is labeled. Without the heartbeat the third call
    (past half the lease) would not be sent and the sweep would take the items back."""
    spec_id = load_items(sessions, concurrency=1)
    done: dict[str, Any] = {}
    with fixed_teacher(latency_ms=2600) as url:
        runtime = LabelRuntime(sessions, teacher_base_url=url, owner="live:1")
        with runtime:
            started = time.monotonic()
            batch = threading.Thread(
                target=lambda: done.update(summary=runtime.label_batch(spec_id)), daemon=True
            )
            batch.start()
            wait_until(lambda: received(url) == ITEMS, "the last call", timeout=30)
            time.sleep(max(0.0, 10.2 - (time.monotonic() - started)))
            with sessions.begin() as session:
                swept = expire_leases(session)
            batch.join(timeout=30)
    assert swept.expired == 0
    assert (done["summary"].labeled, done["summary"].lost_leases) == (ITEMS, 0)
    with sessions() as session:
        assert {i.state for i in session.scalars(select(Item))} == {ItemState.ACCEPTED}
