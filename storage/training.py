"""Read labels for training (from a frozen dataset) and for reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.models import DatasetItem, Item, Label, Verdict

__all__ = [
    "CalibrationRow",
    "DatasetRow",
    "ReportRow",
    "TrainingRow",
    "calibration_rows",
    "dataset_rows",
    "labeled_rows",
    "report_rows",
]


@dataclass(frozen=True, slots=True)
class TrainingRow:
    item_id: int
    external_id: str
    text: str
    output: dict[str, Any] | None
    verdict: Verdict
    known_good: dict[str, Any] | None


def labeled_rows(
    session: Session, spec_id: int, *, verdicts: tuple[Verdict, ...] = (Verdict.ACCEPTED,)
) -> list[TrainingRow]:
    """Trainable items labeled under one spec version with the given verdicts, in item id
    order (a router's fallback kept out of training is not one: ``Item.trainable``)."""
    stmt = (
        select(Item.id, Item.external_id, Item.text, Label.output, Label.verdict, Item.known_good)
        .join(Label, Label.item_id == Item.id)
        .where(Label.spec_id == spec_id, Label.verdict.in_(verdicts), Item.trainable.is_(True))
        .order_by(Item.id)
    )
    return [TrainingRow(*row) for row in session.execute(stmt)]


@dataclass(frozen=True, slots=True)
class ReportRow:
    external_id: str
    slices: dict[str, Any]
    output: dict[str, Any] | None
    verdict: Verdict
    reasons: list[Any]
    known_good: dict[str, Any] | None
    confidence: float | None = None
    agreement: float | None = None


def report_rows(session: Session, spec_id: int) -> list[ReportRow]:
    """Every label of one spec version with its item's slices and known-good record."""
    stmt = (
        select(
            Item.external_id,
            Item.slices,
            Label.output,
            Label.verdict,
            Label.reasons,
            Item.known_good,
            Label.confidence,
            Label.agreement,
        )
        .join(Label, Label.item_id == Item.id)
        .where(Label.spec_id == spec_id)
        .order_by(Item.id)
    )
    return [ReportRow(*row) for row in session.execute(stmt)]


@dataclass(frozen=True, slots=True)
class DatasetRow:
    """One member of a frozen dataset, as the trainer reads it."""

    item_id: int
    external_id: str
    text: str
    class_value: str | None
    verdict: Verdict
    split: str
    weight: float
    known_good: dict[str, Any] | None
    slices: dict[str, Any] = field(default_factory=dict)
    output: dict[str, Any] | None = None  # the label's answer (what ranking and extraction learn)
    payload: dict[str, Any] = field(default_factory=dict)  # the item's input fields
    confidence: float | None = None  # the teacher's stated confidence in its answer
    agreement: float | None = None  # the share of samples (or teachers) that agreed


def dataset_rows(session: Session, dataset_id: int) -> list[DatasetRow]:
    """Every member of a dataset, in external-id order: what it was frozen with (class, verdict,
    split, weight), the label's answer and the item's text, fields and known-good record."""
    stmt = (
        select(
            DatasetItem.item_id,
            DatasetItem.external_id,
            Item.text,
            DatasetItem.class_value,
            DatasetItem.verdict,
            DatasetItem.split,
            DatasetItem.weight,
            Item.known_good,
            Item.slices,
            Label.output,
            Item.payload,
            Label.confidence,
            Label.agreement,
        )
        .join(Item, Item.id == DatasetItem.item_id)
        .join(Label, Label.id == DatasetItem.label_id)
        .where(DatasetItem.dataset_id == dataset_id)
        # By external id, not label id: labels get their ids in the order the teacher's answers
        # came back, so the same dataset would otherwise train a different student each time.
        .order_by(DatasetItem.external_id, DatasetItem.item_id)
    )
    return [
        DatasetRow(i, e, t, c, Verdict(v), s, w, k, sl or {}, o, p or {}, cf, ag)
        for i, e, t, c, v, s, w, k, sl, o, p, cf, ag in session.execute(stmt)
    ]


@dataclass(frozen=True, slots=True)
class CalibrationRow:
    """A label's signals beside its item's known-good record."""

    external_id: str
    confidence: float | None
    agreement: float | None
    output: dict[str, Any] | None
    known_good: dict[str, Any] | None


def calibration_rows(
    session: Session, spec_id: int, *, latest: int | None = None
) -> list[CalibrationRow]:
    """Every label of one spec version that has an item with a known-good record (with
    ``latest``, only the newest that many), in item id order."""
    stmt = (
        select(Item.external_id, Label.confidence, Label.agreement, Label.output, Item.known_good)
        .join(Label, Label.item_id == Item.id)
        .where(Label.spec_id == spec_id, Item.known_good.is_not(None))
    )
    if latest is not None:
        newest = stmt.order_by(Label.id.desc()).limit(latest).subquery()
        return [
            CalibrationRow(*row)
            for row in session.execute(select(newest).order_by(newest.c.external_id))
        ]
    return [CalibrationRow(*row) for row in session.execute(stmt.order_by(Item.id))]
