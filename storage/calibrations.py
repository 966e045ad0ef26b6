"""Where a spec version's calibrations live: the thresholds labeling holds labels without a
record to (``checks.target_accuracy``), one row per fit, and what a refit needs to know."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from storage.models import Calibration as CalibrationRow
from storage.models import Item, ItemState, Label

__all__ = [
    "AWAITING_CALIBRATION",
    "awaiting",
    "latest_calibration",
    "outcome_count",
    "records_to_come",
    "save_calibration",
]

# The kind an item waiting for a calibration is released with (items.last_error_kind).
AWAITING_CALIBRATION = "awaiting_calibration"


def latest_calibration(session: Session, spec_id: int) -> CalibrationRow | None:
    """The newest calibration of a spec version, or None before its first."""
    stmt = (
        select(CalibrationRow)
        .where(CalibrationRow.spec_id == spec_id)
        .order_by(CalibrationRow.id.desc())
        .limit(1)
    )
    return session.scalars(stmt).first()


def save_calibration(session: Session, spec_id: int, fields: dict[str, Any]) -> int:
    """Store one fit (``workers.calibration.Calibration``'s fields); returns its id."""
    row = CalibrationRow(spec_id=spec_id, **fields)
    session.add(row)
    session.flush()
    return row.id


def outcome_count(session: Session, spec_id: int) -> int:
    """Labels a calibration could learn from: a confidence, and a record the checks saw
    (``known_good_match`` is set only then)."""
    stmt = select(func.count()).where(
        Label.spec_id == spec_id,
        Label.known_good_match.is_not(None),
        Label.confidence.is_not(None),
    )
    return int(session.scalar(stmt) or 0)


def records_to_come(session: Session, spec_id: int) -> int:
    """Items of the spec version with a known-good record still to be labeled. Items already
    waiting for a calibration are not counted: the checks do not see their record (it is
    withheld) or they have none, so they will not add to it."""
    stmt = select(func.count()).where(
        Item.spec_id == spec_id,
        Item.known_good.is_not(None),
        Item.state.in_((ItemState.PENDING, ItemState.QUEUED, ItemState.LEASED)),
        or_(Item.last_error_kind.is_(None), Item.last_error_kind != AWAITING_CALIBRATION),
    )
    return int(session.scalar(stmt) or 0)


def awaiting(session: Session, spec_id: int) -> int:
    """Items of the spec version released to wait for a calibration, not labeled yet."""
    stmt = select(func.count()).where(
        Item.spec_id == spec_id,
        Item.state.in_((ItemState.PENDING, ItemState.QUEUED, ItemState.LEASED)),
        Item.last_error_kind == AWAITING_CALIBRATION,
    )
    return int(session.scalar(stmt) or 0)
