"""Train the student for a spec from its labels (the trainer's entry point)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from schemas.errors import ConfigError
from storage.models import Verdict
from storage.training import TrainingRow, labeled_rows
from workers.spec import Spec

__all__ = ["train_student"]


def train_student(
    sessions: sessionmaker[Session],
    spec: Spec,
    spec_id: int,
    *,
    out_dir: Path,
    epochs: int | None = None,
) -> dict[str, Any]:
    """Train on accepted labels, evaluate on every held-out labeled item; returns the report."""
    if spec.kind != "classification":
        raise ConfigError(
            f"spec {spec.name!r} is a {spec.kind} spec; this student trains "
            f"classification specs only"
        )
    from student_train.train import StudentConfig, train_classifier

    with sessions() as session:
        rows = labeled_rows(
            session, spec_id, verdicts=(Verdict.ACCEPTED, Verdict.REJECTED, Verdict.NEEDS_REVIEW)
        )
    examples = [_example(row, spec.label_names) for row in rows]
    settings = {k: v for k, v in spec.body.get("student", {}).items() if k != "kind"}
    if epochs is not None:
        settings["epochs"] = epochs
    try:
        report = train_classifier(examples, spec.label_names, StudentConfig(**settings), out_dir)
    except ValueError as exc:
        raise ConfigError(f"cannot train the student for {spec.name!r}: {exc}") from exc
    return report.as_dict()


def _example(row: TrainingRow, names: list[str]) -> Any:
    from student_train.data import Example

    label = (row.output or {}).get("label")
    known = (row.known_good or {}).get("label")
    usable = isinstance(label, str) and label in names
    return Example(
        item_id=row.item_id,
        external_id=row.external_id,
        text=row.text,
        label=str(label) if usable else "",
        known_good=known,
        accepted=usable and row.verdict == Verdict.ACCEPTED,
    )
