"""Read accepted labels for training (issue-2 minimal form; frozen snapshots come later)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.models import Item, KnownGood, Label, Verdict

__all__ = ["TrainingRow", "labeled_rows"]


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
    """Items labeled under one spec version with the given verdicts, in item id order."""
    stmt = (
        select(Item.id, Item.external_id, Item.text, Label.output, Label.verdict, KnownGood.fields)
        .join(Label, Label.item_id == Item.id)
        .outerjoin(KnownGood, KnownGood.item_id == Item.id)
        .where(Label.spec_id == spec_id, Label.verdict.in_(verdicts))
        .order_by(Item.id)
    )
    return [TrainingRow(*row) for row in session.execute(stmt)]
