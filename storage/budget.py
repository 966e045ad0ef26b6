"""Budgets: reserve money atomically before calls, settle it with the ledger after.

A worker reserves ``calls * estimated cost`` under a row lock on the spec's budget, so any
number of workers together cannot commit to more than the limit; the overshoot is bounded by
how far real costs exceed the (deliberately conservative) estimates of the calls in flight.
Reservations expire with the lease, so a killed worker's money comes back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from storage.dialect import db_now, db_now_plus, insert_for
from storage.models import Budget, BudgetReservation, SpecRow, TeacherCall

__all__ = ["BudgetState", "budget_state", "current_budget", "reserve", "settle"]


@dataclass(frozen=True, slots=True)
class BudgetState:
    limit_usd: float | None
    spent_usd: float
    reserved_usd: float

    @property
    def left_usd(self) -> float | None:
        if self.limit_usd is None:
            return None
        return max(0.0, self.limit_usd - self.spent_usd - self.reserved_usd)


def _ensure(session: Session, spec_name: str, limit_usd: float | None) -> Budget:
    # First use: the settled spend starts from whatever the ledger already holds.
    spent = session.scalar(
        select(func.coalesce(func.sum(TeacherCall.cost_usd), 0.0))
        .join(SpecRow, SpecRow.id == TeacherCall.spec_id)
        .where(SpecRow.name == spec_name)
    )
    session.execute(
        insert_for(session, Budget.__table__).on_conflict_do_nothing(),
        [{"spec_name": spec_name, "limit_usd": limit_usd, "spent_usd": float(spent or 0.0)}],
    )
    row = session.scalar(select(Budget).where(Budget.spec_name == spec_name).with_for_update())
    assert row is not None
    if row.limit_usd != limit_usd:
        row.limit_usd = limit_usd
    return row


def _reserved(session: Session, spec_name: str) -> float:
    total = session.scalar(
        select(func.coalesce(func.sum(BudgetReservation.amount_usd), 0.0)).where(
            BudgetReservation.spec_name == spec_name, BudgetReservation.expires_at > db_now(session)
        )
    )
    return float(total or 0.0)


def reserve(
    session: Session,
    spec_name: str,
    limit_usd: float,
    cost_per_call: float,
    calls: int,
    ttl_s: float,
) -> tuple[int, int | None]:
    """Reserve money for up to ``calls`` calls; returns (calls allowed, reservation id)."""
    budget = _ensure(session, spec_name, limit_usd)
    left = limit_usd - budget.spent_usd - _reserved(session, spec_name)
    # The epsilon absorbs float rounding in sums of cents ($0.50 - 49 * $0.01 is 0.00999...).
    fits = math.floor(left / cost_per_call + 1e-9) if cost_per_call > 0 else calls
    allowed = max(0, min(calls, fits))
    if allowed == 0:
        return 0, None
    stmt = (
        insert_for(session, BudgetReservation.__table__)
        .values(
            spec_name=spec_name,
            amount_usd=allowed * cost_per_call,
            expires_at=db_now_plus(session, ttl_s),
        )
        .returning(BudgetReservation.id)
    )
    reservation = session.execute(stmt).scalar_one()
    return allowed, int(reservation)


def settle(session: Session, spec_name: str, reservation_id: int | None, spent_usd: float) -> None:
    """Replace a reservation by what the calls really cost (same transaction as the ledger)."""
    if reservation_id is not None:
        session.execute(delete(BudgetReservation).where(BudgetReservation.id == reservation_id))
    if spent_usd:
        session.execute(
            update(Budget)
            .where(Budget.spec_name == spec_name)
            .values(spent_usd=Budget.spent_usd + spent_usd)
        )


def current_budget(session: Session, spec_id: int) -> float | None:
    """The spec's budget_usd as stored now (a re-run with a raised budget updates it)."""
    value = session.scalar(select(SpecRow.budget_usd).where(SpecRow.id == spec_id))
    return None if value is None else float(value)


def budget_state(session: Session, spec_name: str) -> BudgetState:
    row = session.get(Budget, spec_name)
    if row is None:
        return BudgetState(None, 0.0, 0.0)
    return BudgetState(row.limit_usd, row.spent_usd, _reserved(session, spec_name))
