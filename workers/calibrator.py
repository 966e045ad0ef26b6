"""The calibration labeling applies under ``checks.target_accuracy``, kept fresh per process.

Labels whose record the checks see are the calibration set; every batch with items that have
no such record asks :class:`Calibrator` for the current thresholds. It refits (and stores the
fit, so each label can name the one it was held to) when the calibration set has grown by a
tenth since the last fit, or when the last item with a record has been labeled, and otherwise
answers from memory, looking at the database at most every ``refresh_s`` seconds.

Until ``checks.calibration_min_items`` labels with a record exist, there is nothing to apply:
the pipeline lets the items without a record wait (their answers are cached, so the wait costs
no second call). Once no item with a record is left to label, the calibration is final: a
target it cannot reach then rejects the labels it cannot vouch for, and every label held to an
earlier calibration is held again to the final one (:func:`rehold`). A source in some order
(a backfill folder by folder, a day of tickets) fits its first thresholds on what came first;
the verdicts they gave are only provisional.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from storage.calibrations import (
    latest_calibration,
    outcome_count,
    records_to_come,
    save_calibration,
)
from storage.models import Calibration as CalibrationRow
from storage.models import Item, ItemState, Label, Verdict
from storage.training import calibration_rows
from workers.calibration import CLASS_MIN_ITEMS, Calibration, fit_calibration, outcomes
from workers.outcomes import BELOW_CALIBRATED_THRESHOLD, below_threshold
from workers.spec import Spec

__all__ = ["FIT_ON_LATEST", "Calibrator", "from_row", "rehold"]

# A refit learns from at most this many of the newest labels with a record.
FIT_ON_LATEST = 50_000
# Refit once the calibration set has grown by this share (and by at least GROWTH_MIN).
GROWTH = 0.1
GROWTH_MIN = 20


def from_row(row: CalibrationRow) -> Calibration:
    """A stored calibration as labeling applies it."""
    fit = row.fit or {}
    return Calibration(
        target=row.target,
        items=row.items,
        accuracy=row.accuracy,
        threshold=row.threshold,
        point=fit.get("point"),
        classes=dict(fit.get("classes") or {}),
        final=row.final,
        signal=row.signal,
        id=row.id,
    )


class Calibrator:
    """One process's view of each spec version's calibration (thread-safe)."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        refresh_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sessions = sessions
        self.refresh_s = refresh_s
        self.clock = clock
        self._lock = threading.Lock()
        self._known: dict[int, tuple[Calibration | None, float]] = {}

    def current(self, spec_id: int, spec: Spec) -> Calibration | None:
        """The calibration to apply now; None while there is too little to calibrate on."""
        with self._lock:
            known = self._known.get(spec_id)
            if known is not None and self.clock() - known[1] < self.refresh_s:
                return known[0]
            calibration = self._refresh(spec_id, spec, known[0] if known else None)
            self._known[spec_id] = (calibration, self.clock())
            return calibration

    def _refresh(self, spec_id: int, spec: Spec, held: Calibration | None) -> Calibration | None:
        checks = spec.checks
        with self.sessions.begin() as session:
            stored = latest_calibration(session, spec_id)
            latest = from_row(stored) if stored is not None else held
            count = outcome_count(session, spec_id)
            final = records_to_come(session, spec_id) == 0
            if latest is not None and latest.final == final and not _grown(latest.items, count):
                return latest
            if count < int(checks["calibration_min_items"]) and not final:
                return None
            rows = calibration_rows(session, spec_id, latest=FIT_ON_LATEST)
            seen, _ = outcomes(spec, rows)
            fitted = fit_calibration(
                seen,
                float(checks["target_accuracy"]),
                class_min_items=CLASS_MIN_ITEMS if checks["calibration_per_class"] else None,
                final=final,
            )
            stored_fields = {
                "signal": fitted.signal,
                "target": fitted.target,
                "items": fitted.items,
                "accuracy": fitted.accuracy,
                "threshold": fitted.threshold,
                "final": fitted.final,
                "fit": fitted.fit_json(),
            }
            calibration_id = save_calibration(session, spec_id, stored_fields)
            fitted = replace(fitted, id=calibration_id)
            if fitted.final:
                rehold(session, spec, spec_id, fitted)
        return fitted

    def settle(self, spec_id: int, spec: Spec) -> int:
        """Once the calibration is final, holds every label held to an earlier one to it
        (also those labeled from a cached calibration while the final one was being fitted);
        returns how many verdicts changed. Embedded labeling calls it when it is done."""
        with self._lock:
            self._known.pop(spec_id, None)
        calibration = self.current(spec_id, spec)
        if calibration is None or not calibration.final:
            return 0
        with self.sessions.begin() as session:
            return rehold(session, spec, spec_id, calibration)


def _grown(fitted_on: int, count: int) -> bool:
    return count - fitted_on >= max(GROWTH_MIN, GROWTH * fitted_on)


def rehold(session: Session, spec: Spec, spec_id: int, calibration: Calibration) -> int:
    """Holds the labels held to another calibration than ``calibration`` to it: only the
    threshold's part of each verdict moves (a label rejected for another reason stays
    rejected; one a person decided is left alone). Returns how many verdicts changed."""
    rows = session.execute(
        select(Label, Item)
        .join(Item, Item.id == Label.item_id)
        .where(
            Label.spec_id == spec_id,
            Label.calibration_id.is_not(None),
            Label.calibration_id != calibration.id,
            Label.verdict.in_((Verdict.ACCEPTED, Verdict.REJECTED)),
        )
    ).all()
    field = spec.class_field
    changed = 0
    for label, item in rows:
        if any(str(r).startswith("reviewed:") for r in label.reasons):
            continue
        said = (label.output or {}).get(field) if field and isinstance(label.output, dict) else None
        cls = said if isinstance(said, str) else None
        message = below_threshold(calibration, cls, label.confidence)
        reasons = [r for r in label.reasons if r != BELOW_CALIBRATED_THRESHOLD]
        problems = [
            p for p in label.problems or [] if p.get("reason") != BELOW_CALIBRATED_THRESHOLD
        ]
        if message is not None:
            reasons.append(BELOW_CALIBRATED_THRESHOLD)
            problems.append({"reason": BELOW_CALIBRATED_THRESHOLD, "message": message[:500]})
        verdict = Verdict.REJECTED if reasons else Verdict.ACCEPTED
        label.threshold, label.calibration_id = calibration.threshold_of(cls), calibration.id
        label.reasons, label.problems = reasons, problems
        if verdict != label.verdict:
            changed += 1
            label.verdict = verdict
            item.state = ItemState.ACCEPTED if verdict == Verdict.ACCEPTED else ItemState.REJECTED
    session.flush()
    return changed
