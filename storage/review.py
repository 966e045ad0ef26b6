"""The review queue: labels a person must decide (the teacher may be right, the record wrong)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from schemas.errors import ConfigError
from storage.models import Item, ItemState, Label, Verdict

__all__ = ["ReviewEntry", "ReviewFilter", "resolve_review", "resolve_reviews", "review_queue"]


@dataclass(frozen=True, slots=True)
class ReviewFilter:
    """Which waiting labels a bulk decision covers (every given condition must hold)."""

    label: str | None = None  # the teacher's output label
    reason: str | None = None  # a reason code of the label holds this text
    min_confidence: float | None = None
    max_confidence: float | None = None

    def matches(self, label: Label) -> bool:
        output = label.output if isinstance(label.output, dict) else {}
        if self.label is not None and output.get("label") != self.label:
            return False
        if self.reason is not None and not any(self.reason in str(r) for r in label.reasons):
            return False
        confidence = label.confidence
        if self.min_confidence is not None and (
            confidence is None or confidence < self.min_confidence
        ):
            return False
        return not (
            self.max_confidence is not None
            and (confidence is None or confidence > self.max_confidence)
        )


@dataclass(frozen=True, slots=True)
class ReviewEntry:
    external_id: str
    output: dict[str, Any] | None
    known_good: dict[str, Any] | None
    confidence: float | None
    reasons: list[Any]
    text: str


def review_queue(session: Session, spec_id: int, *, limit: int = 50) -> list[ReviewEntry]:
    """Labels waiting for review, oldest first."""
    stmt = (
        select(
            Item.external_id,
            Label.output,
            Item.known_good,
            Label.confidence,
            Label.reasons,
            Item.text,
        )
        .join(Label, Label.item_id == Item.id)
        .where(Label.spec_id == spec_id, Label.verdict == Verdict.NEEDS_REVIEW)
        .order_by(Label.id)
        .limit(limit)
    )
    return [ReviewEntry(*row) for row in session.execute(stmt)]


def resolve_review(
    session: Session, spec_id: int, external_id: str, *, accept: bool, note: str | None = None
) -> Verdict:
    """Accept (the teacher was right) or reject one waiting label; keeps the reasons and adds
    ``reviewed:accepted`` or ``reviewed:rejected`` (with the note) to them."""
    row = session.execute(
        select(Label, Item)
        .join(Item, Item.id == Label.item_id)
        .where(Label.spec_id == spec_id, Item.external_id == external_id)
    ).one_or_none()
    if row is None:
        raise ConfigError(f"no label for item {external_id!r} under this spec version")
    label, item = row
    if label.verdict != Verdict.NEEDS_REVIEW:
        raise ConfigError(
            f"item {external_id!r} is not waiting for review (its label is {label.verdict.value})"
        )
    verdict = Verdict.ACCEPTED if accept else Verdict.REJECTED
    reason = f"reviewed:{verdict.value}" + (f":{note}" if note else "")
    label.verdict, label.reasons = verdict, [*label.reasons, reason]
    session.execute(
        update(Item)
        .where(Item.id == item.id)
        .values(state=ItemState.ACCEPTED if accept else ItemState.REJECTED)
    )
    session.flush()
    return verdict


def resolve_reviews(
    session: Session,
    spec_id: int,
    *,
    accept: bool,
    which: ReviewFilter,
    note: str | None = None,
    dry_run: bool = False,
) -> list[str]:
    """Decide every waiting label that ``which`` covers at once; returns their external ids
    (oldest first). ``dry_run`` decides nothing and says which it would."""
    rows = session.execute(
        select(Label, Item)
        .join(Item, Item.id == Label.item_id)
        .where(Label.spec_id == spec_id, Label.verdict == Verdict.NEEDS_REVIEW)
        .order_by(Label.id)
    ).all()
    chosen = [(label, item) for label, item in rows if which.matches(label)]
    if not dry_run:
        verdict = Verdict.ACCEPTED if accept else Verdict.REJECTED
        reason = f"reviewed:{verdict.value}" + (f":{note}" if note else "")
        for label, _ in chosen:
            label.verdict, label.reasons = verdict, [*label.reasons, reason]
        ids = [item.id for _, item in chosen]
        for start in range(0, len(ids), 5000):
            session.execute(
                update(Item)
                .where(Item.id.in_(ids[start : start + 5000]))
                .values(state=ItemState.ACCEPTED if accept else ItemState.REJECTED)
                .execution_options(synchronize_session=False)
            )
        session.flush()
    return [item.external_id for _, item in chosen]
