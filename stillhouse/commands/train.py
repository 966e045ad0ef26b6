"""`stillhouse train`: the student trained on a spec's accepted labels, compared with the
teacher on held-out items."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from schemas.errors import ConfigError
from stillhouse.commands.common import stored_spec_id
from stillhouse.context import open_database
from stillhouse.settings import Settings
from storage.models import Verdict
from storage.training import TrainingRow, labeled_rows
from workers.spec import Spec, load_spec

__all__ = ["run_train", "train_student"]


def run_train(
    settings: Settings, spec_ref: str, *, out: Path | None, epochs: int | None
) -> dict[str, Any]:
    """Train the spec's student and compare it with the teacher on held-out items
    (``stillhouse.output.show_train`` prints the comparison)."""
    spec = load_spec(spec_ref)
    with open_database(settings) as sessions:
        spec_id = stored_spec_id(sessions, spec)
        out = out or settings.runs_dir / f"{spec.name}-v{spec.version}"
        report = train_student(sessions, spec, spec_id, out_dir=out, epochs=epochs)
    share = spec.body.get("student", {}).get("val_share", 0.2)
    return {**report, "val_share": share, "out_dir": str(out)}


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
