"""Budget reservations: reserve under a row lock, settle with real spend, expire with the lease.

Runs on SQLite and on real Postgres; the concurrency test is Postgres only, where the row lock
is what keeps eight workers together under the limit.
"""

from __future__ import annotations

import hashlib
import threading
from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from storage.budget import budget_state, reserve, settle
from storage.items import ItemIn, ensure_spec, upsert_items
from storage.models import BudgetReservation, CallStatus, Item, SpecRow, TeacherCall
from storage.session import make_engine, make_sessionmaker

TTL_S = 600.0


def _spec(session: Session, name: str = "b", version: int = 1) -> SpecRow:
    return ensure_spec(session, name, version, "classification", {"v": version}, f"h{version}")


def _charge(session: Session, spec: SpecRow, *costs: float) -> None:
    """Ledger rows for one item of ``spec``, one per cost."""
    digest = hashlib.sha256(f"{spec.name}{spec.version}".encode()).hexdigest()
    upsert_items(session, spec, [ItemIn(f"e-{spec.version}", "text", {}, {}, digest)])
    item_id = session.scalar(
        select(Item.id).where(Item.spec_name == spec.name, Item.external_id == f"e-{spec.version}")
    )
    assert item_id is not None
    for attempt, cost in enumerate(costs, start=1):
        session.add(
            TeacherCall(
                item_id=item_id,
                spec_id=spec.id,
                request_hash=digest,
                attempt=attempt,
                status=CallStatus.OK,
                cost_usd=cost,
            )
        )
    session.flush()


def test_unknown_spec_has_no_budget(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        state = budget_state(session, "nobody")

    assert (state.limit_usd, state.spent_usd, state.reserved_usd) == (None, 0.0, 0.0)
    assert state.left_usd is None


def test_reserve_within_limit_grants_every_call(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        allowed, reservation = reserve(session, "b", 1.0, 0.01, 10, TTL_S)
    with sessions() as session:
        state = budget_state(session, "b")

    assert allowed == 10
    assert isinstance(reservation, int)
    assert state.limit_usd == 1.0
    assert state.spent_usd == 0.0
    assert state.reserved_usd == pytest.approx(0.10)
    assert state.left_usd == pytest.approx(0.90)


def test_reserve_beyond_limit_grants_what_fits(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        first = reserve(session, "b", 0.10, 0.03, 10, TTL_S)
    with sessions.begin() as session:
        second = reserve(session, "b", 0.10, 0.03, 1, TTL_S)
        rows = session.scalar(select(func.count()).select_from(BudgetReservation))

    assert first[0] == 3  # floor(0.10 / 0.03)
    assert first[1] is not None
    assert second == (0, None)
    assert rows == 1  # a refusal reserves nothing


def test_reservations_add_up(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        a = reserve(session, "b", 1.0, 0.1, 4, TTL_S)
    with sessions.begin() as session:
        b = reserve(session, "b", 1.0, 0.1, 4, TTL_S)
    with sessions.begin() as session:
        c = reserve(session, "b", 1.0, 0.1, 4, TTL_S)
        state = budget_state(session, "b")

    assert [a[0], b[0], c[0]] == [4, 4, 2]
    assert len({a[1], b[1], c[1]}) == 3
    assert state.reserved_usd == pytest.approx(1.0)
    assert state.left_usd == pytest.approx(0.0)


def test_settle_replaces_the_reservation_by_real_spend(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        _, reservation = reserve(session, "b", 1.0, 0.05, 10, TTL_S)
    with sessions.begin() as session:
        before = budget_state(session, "b")
        settle(session, "b", reservation, 0.12)
    with sessions.begin() as session:
        after = budget_state(session, "b")
        settle(session, "b", None, 0.03)  # spend without a reservation (nothing was reserved)
    with sessions() as session:
        last = budget_state(session, "b")
        rows = session.scalar(select(func.count()).select_from(BudgetReservation))

    assert (before.spent_usd, before.reserved_usd) == (0.0, pytest.approx(0.5))
    assert (after.spent_usd, after.reserved_usd) == (pytest.approx(0.12), 0.0)
    assert after.left_usd == pytest.approx(0.88)
    assert last.spent_usd == pytest.approx(0.15)
    assert rows == 0


def test_expired_reservation_no_longer_counts(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        assert reserve(session, "b", 1.0, 0.1, 10, TTL_S)[0] == 10
    with sessions.begin() as session:
        assert reserve(session, "b", 1.0, 0.1, 1, TTL_S) == (0, None)
        session.execute(
            update(BudgetReservation).values(expires_at=datetime(2000, 1, 1, tzinfo=UTC))
        )
    with sessions.begin() as session:
        expired = budget_state(session, "b")
        again = reserve(session, "b", 1.0, 0.1, 10, TTL_S)

    assert expired.reserved_usd == 0.0
    assert expired.left_usd == pytest.approx(1.0)
    assert again[0] == 10


def test_first_use_seeds_spend_from_the_ledger(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        _charge(session, _spec(session, "b", 1), 0.2, 0.1)
        _charge(session, _spec(session, "b", 2), 0.2)  # every version of the spec counts
        _charge(session, _spec(session, "other", 1), 5.0)  # another spec does not
    with sessions.begin() as session:
        allowed, _ = reserve(session, "b", 1.0, 0.1, 10, TTL_S)
        seeded = budget_state(session, "b")
    with sessions.begin() as session:
        # Later spend arrives through settle, not by re-reading the ledger.
        _charge(session, _spec(session, "b", 3), 0.3)
        reserve(session, "b", 1.0, 0.1, 1, TTL_S)
        later = budget_state(session, "b")

    assert seeded.spent_usd == pytest.approx(0.5)
    assert allowed == 5
    assert later.spent_usd == pytest.approx(0.5)


def test_limit_follows_the_latest_call(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        assert reserve(session, "b", 0.5, 0.1, 10, TTL_S)[0] == 5
    with sessions.begin() as session:
        raised = reserve(session, "b", 2.0, 0.1, 10, TTL_S)
        limit_raised = budget_state(session, "b").limit_usd
    with sessions.begin() as session:
        lowered = reserve(session, "b", 1.0, 0.1, 10, TTL_S)
        limit_lowered = budget_state(session, "b").limit_usd

    assert raised[0] == 10
    assert limit_raised == 2.0
    assert lowered == (0, None)  # 1.5 already reserved against the new 1.0
    assert limit_lowered == 1.0


def test_free_calls_are_always_granted(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        settle(session, "b", None, 0.0)
        reserve(session, "b", 0.0, 0.0, 1, TTL_S)
    with sessions.begin() as session:
        allowed, _ = reserve(session, "b", 0.0, 0.0, 7, TTL_S)

    assert allowed == 7


@pytest.mark.postgres
def test_concurrent_workers_stay_under_the_limit(postgres_url: str) -> None:
    engine = make_engine(postgres_url, pool_size=8)
    sessions = make_sessionmaker(engine)
    granted: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker() -> None:
        try:
            start.wait()
            while True:
                with sessions.begin() as session:
                    allowed, reservation = reserve(session, "b", 0.50, 0.01, 1, TTL_S)
                if not allowed:
                    return
                granted.append(allowed)
                with sessions.begin() as session:
                    settle(session, "b", reservation, 0.01)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    with sessions() as session:
        state = budget_state(session, "b")
    engine.dispose()

    assert not errors, errors
    assert sum(granted) == 50
    assert state.spent_usd <= 0.50 + 1e-9
    assert state.spent_usd == pytest.approx(0.50)
    assert state.reserved_usd == 0.0
