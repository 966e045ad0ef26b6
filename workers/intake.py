"""Live ingest: turn submitted rows into pending items, with sampling, dedupe and a daily cap.

Rows go through ``make_item`` like a backfill's, so both share one normalization. Each row
gets one outcome: ``invalid`` (with the reason), ``sampled_out``, ``duplicate`` (already
stored, or earlier in the same batch), ``capped`` (the spec's daily cap is reached) or
``inserted``. A bad row never costs the good ones. The caller owns the transaction: this
only flushes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from enum import StrEnum
from typing import Any

from sqlalchemy.orm import Session

from schemas.errors import PermanentError
from storage.intake import (
    add_daily_count,
    existing_external_ids,
    insert_new_items,
    lock_daily_count,
)
from storage.items import ItemIn
from workers.ingest import make_item
from workers.rowpolicy import safe_text
from workers.sampling import SamplingRules
from workers.spec import Spec

__all__ = ["IntakeResult", "Outcome", "RowOutcome", "ingest_live", "prepare_rows"]


class Outcome(StrEnum):
    INSERTED = "inserted"
    DUPLICATE = "duplicate"
    SAMPLED_OUT = "sampled_out"
    CAPPED = "capped"
    INVALID = "invalid"


@dataclass(frozen=True, slots=True)
class RowOutcome:
    """What became of the row at ``index`` in the submitted batch."""

    index: int
    outcome: Outcome
    id: str | None = None
    reason: str | None = None

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"index": self.index, "id": self.id, "outcome": self.outcome.value}
        if self.reason is not None:
            body["reason"] = self.reason
        return body


@dataclass(slots=True)
class IntakeResult:
    outcomes: list[RowOutcome] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        counts = {outcome.value: 0 for outcome in Outcome}
        for row in self.outcomes:
            counts[row.outcome.value] += 1
        return counts


@dataclass(frozen=True, slots=True)
class _Kept:
    index: int
    item: ItemIn


def prepare_rows(
    spec: Spec, rules: SamplingRules, rows: Sequence[Any]
) -> tuple[list[_Kept], list[RowOutcome]]:
    """Validate and sample rows (no database): the items to store, and the settled outcomes."""
    kept: list[_Kept] = []
    settled: list[RowOutcome] = []
    seen: set[str] = set()
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            reason = f"expected a JSON object, got {type(row).__name__}"
            settled.append(RowOutcome(index, Outcome.INVALID, reason=reason))
            continue
        try:
            item = make_item(spec, row)
        except PermanentError as exc:
            settled.append(RowOutcome(index, Outcome.INVALID, _raw_id(spec, row), str(exc)))
            continue
        ext = item.external_id
        if not rules.keeps(spec.name, ext, item.payload):
            settled.append(RowOutcome(index, Outcome.SAMPLED_OUT, ext))
        elif ext in seen:
            settled.append(RowOutcome(index, Outcome.DUPLICATE, ext, "repeated in this batch"))
        else:
            seen.add(ext)
            kept.append(_Kept(index, item))
    return kept, settled


def _raw_id(spec: Spec, row: dict[str, Any]) -> str | None:
    value = row.get(spec.id_field)
    if value is None or isinstance(value, (dict, list)):
        return None
    return safe_text(str(value)[:256], 256)


def ingest_live(
    session: Session,
    spec: Spec,
    spec_id: int,
    rows: Sequence[Any],
    *,
    day: date,
    rules: SamplingRules | None = None,
) -> IntakeResult:
    """Store the rows that pass validation, sampling, dedupe and the cap of ``day`` (UTC).

    The spec's counter for ``day`` is locked before anything is read, so concurrent requests
    for one spec are serialized from there to commit: an id is ``inserted`` for exactly one
    of them, and the cap counts it once.
    """
    rules = rules or SamplingRules.from_spec(spec)
    kept, outcomes = prepare_rows(spec, rules, rows)
    if kept:
        outcomes.extend(_store(session, spec, spec_id, kept, day, rules.daily_cap))
    return IntakeResult(sorted(outcomes, key=lambda row: row.index))


def _store(
    session: Session,
    spec: Spec,
    spec_id: int,
    kept: list[_Kept],
    day: date,
    cap: int | None,
) -> list[RowOutcome]:
    taken = lock_daily_count(session, spec.name, day)
    existing = existing_external_ids(session, spec.name, [k.item.external_id for k in kept])
    fresh = [k for k in kept if k.item.external_id not in existing]
    room = len(fresh) if cap is None else max(0, cap - taken)
    inserted = insert_new_items(session, spec_id, spec.name, [k.item for k in fresh[:room]])
    add_daily_count(session, spec.name, day, len(inserted))
    over = {k.index for k in fresh[room:]}
    outcomes = []
    for k in kept:
        ext = k.item.external_id
        if ext in inserted:
            outcomes.append(RowOutcome(k.index, Outcome.INSERTED, ext))
        elif k.index in over:
            outcomes.append(RowOutcome(k.index, Outcome.CAPPED, ext, "the daily cap is reached"))
        else:  # stored before, or by a concurrent backfill between our read and our insert
            outcomes.append(RowOutcome(k.index, Outcome.DUPLICATE, ext))
    return outcomes
