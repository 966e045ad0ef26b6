"""The review queue: labels a person must decide (the teacher may be right, the record wrong)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from schemas.errors import ConfigError
from storage.models import (
    Item,
    ItemState,
    Label,
    ReviewReason,
    ReviewState,
    ReviewTask,
    Verdict,
)

__all__ = [
    "NewTask",
    "ReviewEntry",
    "ReviewFilter",
    "SampleRow",
    "TaskEntry",
    "TaskRow",
    "decide_task",
    "judged_rows",
    "open_task_rows",
    "queue_tasks",
    "recorded_labels",
    "resolve_review",
    "resolve_reviews",
    "review_queue",
    "sample_decisions",
    "sample_population",
    "task_queue",
    "task_row",
]


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


# Review tasks: items put before a person for a reason other than their own label's verdict.


@dataclass(frozen=True, slots=True)
class NewTask:
    item_id: int
    rank: float  # higher first
    proposed: dict[str, Any]
    stratum: str | None = None
    weight: float | None = None
    details: dict[str, Any] = field(default_factory=dict)


def queue_tasks(session: Session, spec_id: int, reason: ReviewReason, tasks: list[NewTask]) -> int:
    """Adds the tasks whose item has none for ``reason`` under this version yet (open or
    decided: a person is not asked twice); returns how many it added."""
    existing = set(
        session.scalars(
            select(ReviewTask.item_id).where(
                ReviewTask.spec_id == spec_id, ReviewTask.reason == reason
            )
        )
    )
    new = [t for t in tasks if t.item_id not in existing]
    session.add_all(
        ReviewTask(
            spec_id=spec_id,
            item_id=t.item_id,
            reason=reason,
            state=ReviewState.OPEN,
            rank=t.rank,
            proposed=t.proposed,
            stratum=t.stratum,
            weight=t.weight,
            details=t.details,
        )
        for t in new
    )
    session.flush()
    return len(new)


@dataclass(frozen=True, slots=True)
class TaskEntry:
    """One review task as `review list` shows it."""

    external_id: str
    reason: str
    state: str
    rank: float
    proposed: dict[str, Any]
    record: dict[str, Any] | None  # the item's known-good record now
    output: dict[str, Any] | None  # the teacher's answer
    confidence: float | None
    stratum: str | None
    details: dict[str, Any]
    text: str
    decision: str | None
    record_before: dict[str, Any] | None
    record_after: dict[str, Any] | None
    decided_by: str | None
    decided_at: str | None
    note: str | None


def _task_select(spec_id: int) -> Any:
    return (
        select(
            Item.external_id,
            ReviewTask.reason,
            ReviewTask.state,
            ReviewTask.rank,
            ReviewTask.proposed,
            Item.known_good,
            Label.output,
            Label.confidence,
            ReviewTask.stratum,
            ReviewTask.details,
            Item.text,
            ReviewTask.decision,
            ReviewTask.record_before,
            ReviewTask.record_after,
            ReviewTask.decided_by,
            ReviewTask.decided_at,
            ReviewTask.note,
        )
        .join(Item, Item.id == ReviewTask.item_id)
        .outerjoin(Label, (Label.item_id == Item.id) & (Label.spec_id == ReviewTask.spec_id))
        .where(ReviewTask.spec_id == spec_id)
    )


def task_queue(
    session: Session,
    spec_id: int,
    reason: ReviewReason,
    *,
    limit: int = 50,
    state: ReviewState | None = ReviewState.OPEN,
) -> list[TaskEntry]:
    """The tasks for ``reason`` (open ones by default), highest rank first."""
    stmt = _task_select(spec_id).where(ReviewTask.reason == reason)
    if state is not None:
        stmt = stmt.where(ReviewTask.state == state)
    stmt = stmt.order_by(ReviewTask.rank.desc(), ReviewTask.id).limit(limit)
    entries = []
    for row in session.execute(stmt):
        values = list(row)
        values[1], values[2] = str(values[1]), str(values[2])
        values[15] = None if values[15] is None else values[15].isoformat()
        entries.append(TaskEntry(*values))
    return entries


@dataclass(frozen=True, slots=True)
class TaskRow:
    task: ReviewTask
    item: Item
    label: Label | None


def task_row(session: Session, spec_id: int, reason: ReviewReason, external_id: str) -> TaskRow:
    """The task for one item (the error says when there is none, or it is decided)."""
    row = session.execute(
        select(ReviewTask, Item)
        .join(Item, Item.id == ReviewTask.item_id)
        .where(
            ReviewTask.spec_id == spec_id,
            ReviewTask.reason == reason,
            Item.external_id == external_id,
        )
    ).one_or_none()
    if row is None:
        raise ConfigError(
            f"item {external_id!r} has no {reason.value} review under this spec version "
            f"(`stillhouse review list --reason {reason.value}` shows the open ones)"
        )
    task, item = row
    if task.state != ReviewState.OPEN:
        raise ConfigError(
            f"item {external_id!r}'s {reason.value} review was decided already "
            f"({task.decision} by {task.decided_by} at {task.decided_at:%Y-%m-%d %H:%M} UTC)"
        )
    label = session.scalars(
        select(Label).where(Label.item_id == item.id, Label.spec_id == spec_id)
    ).one_or_none()
    return TaskRow(task, item, label)


def open_task_rows(session: Session, spec_id: int, reason: ReviewReason) -> list[TaskRow]:
    """Every open task for ``reason``, highest rank first, with its item and label."""
    rows = session.execute(
        select(ReviewTask, Item, Label)
        .join(Item, Item.id == ReviewTask.item_id)
        .outerjoin(Label, (Label.item_id == Item.id) & (Label.spec_id == spec_id))
        .where(
            ReviewTask.spec_id == spec_id,
            ReviewTask.reason == reason,
            ReviewTask.state == ReviewState.OPEN,
        )
        .order_by(ReviewTask.rank.desc(), ReviewTask.id)
    ).all()
    return [TaskRow(task, item, label) for task, item, label in rows]


def decide_task(
    row: TaskRow,
    *,
    decision: str,
    record_after: dict[str, Any] | None,
    label_verdict: Verdict | None,
    by: str,
    note: str | None,
    session: Session,
) -> None:
    """Closes a task: writes the item's record (the one before is kept on the task), and,
    with ``label_verdict``, moves the item's label to it with a ``reviewed:…`` reason."""
    task, item, label = row.task, row.item, row.label
    task.state = ReviewState.RESOLVED
    task.decision = decision
    task.record_before = item.known_good
    task.record_after = record_after
    task.decided_by = by
    task.decided_at = datetime.now(UTC)
    task.note = note
    if record_after != item.known_good:
        item.known_good = record_after
    if label is not None and label_verdict is not None and label_verdict != label.verdict:
        tag = f"reviewed:{task.reason.value}:{decision}" + (f":{note}" if note else "")
        label.verdict, label.reasons = label_verdict, [*label.reasons, tag]
        item.state = ItemState.ACCEPTED if label_verdict == Verdict.ACCEPTED else ItemState.REJECTED
    session.flush()


@dataclass(frozen=True, slots=True)
class SampleRow:
    item_id: int
    external_id: str
    output: dict[str, Any]
    confidence: float


def sample_population(session: Session, spec_id: int) -> list[SampleRow]:
    """The labels a review sample is drawn from: parsed, with a confidence, on an item with no
    known-good record and no sample task yet."""
    sampled = select(ReviewTask.item_id).where(
        ReviewTask.spec_id == spec_id, ReviewTask.reason == ReviewReason.SAMPLE
    )
    stmt = (
        select(Item.id, Item.external_id, Label.output, Label.confidence)
        .join(Label, Label.item_id == Item.id)
        .where(
            Label.spec_id == spec_id,
            Label.output.is_not(None),
            Label.confidence.is_not(None),
            Item.known_good.is_(None),
            Item.id.not_in(sampled),
        )
        .order_by(Item.id)
    )
    return [SampleRow(*row) for row in session.execute(stmt) if isinstance(row[2], dict)]


def sample_decisions(session: Session, spec_id: int) -> tuple[int, int, int]:
    """(open, decided, decided the teacher was right) over this version's sample tasks."""
    counts = dict(
        session.execute(
            select(ReviewTask.decision, func.count())
            .where(ReviewTask.spec_id == spec_id, ReviewTask.reason == ReviewReason.SAMPLE)
            .group_by(ReviewTask.decision)
        ).all()
    )
    waiting = counts.pop(None, 0)
    return waiting, sum(counts.values()), counts.get("confirmed", 0)


def judged_rows(session: Session, spec_id: int) -> list[tuple[Any, ...]]:
    """(item id, external id, text, record, teacher output, confidence) for every label of
    this version whose item has a known-good record, in item order."""
    stmt = (
        select(
            Item.id, Item.external_id, Item.text, Item.known_good, Label.output, Label.confidence
        )
        .join(Label, Label.item_id == Item.id)
        .where(Label.spec_id == spec_id, Item.known_good.is_not(None))
        .order_by(Item.id)
    )
    return [tuple(row) for row in session.execute(stmt)]


def recorded_labels(session: Session, spec_id: int) -> int:
    """Labels of this version with a confidence on an item with a known-good record (the
    source's or a review decision's): what a calibration can learn from."""
    stmt = (
        select(func.count())
        .select_from(Label)
        .join(Item, Item.id == Label.item_id)
        .where(
            Label.spec_id == spec_id,
            Label.confidence.is_not(None),
            Item.known_good.is_not(None),
        )
    )
    return int(session.scalar(stmt) or 0)
