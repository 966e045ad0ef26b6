"""`stillhouse train`: the student trained on a frozen dataset, compared with the teacher on
its held-out splits."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from schemas.errors import ConfigError
from stillhouse.context import open_database
from stillhouse.settings import Settings
from storage.datasets import DatasetFilters, DatasetRecipe
from storage.models import Dataset, SpecRow, Verdict
from storage.training import DatasetRow
from workers.spec import Spec, load_spec, parse_spec

__all__ = ["TRAINING_FILTERS", "run_train", "train_student"]

# The dataset `train --spec` freezes: every label, so the held-out splits measure the student
# and the teacher on what comes in, not only on what the checks kept; training itself uses
# the accepted labels of the train split.
TRAINING_FILTERS = DatasetFilters(verdicts=tuple(v.value for v in Verdict))


def run_train(
    settings: Settings,
    spec_ref: str | None,
    *,
    dataset: str | None = None,
    out: Path | None,
    epochs: int | None,
) -> dict[str, Any]:
    """Train the student on dataset ``dataset`` or, given only a spec, on a dataset frozen
    now from its current version with the defaults (``created_dataset`` names it); labeling
    may go on meanwhile. ``stillhouse.output.show_train`` prints the comparison."""
    if dataset is None and spec_ref is None:
        raise ConfigError("say what to train on: --dataset NAME, or --spec SPEC")
    created = None
    with open_database(settings) as sessions:
        if dataset is None:
            assert spec_ref is not None
            spec = load_spec(spec_ref)
            created = _freeze(sessions, spec)
            dataset = created["name"]
        with sessions() as session:
            from storage.datasets import dataset_by_name

            frozen = dataset_by_name(session, dataset)
            spec = _spec_of(session, frozen, spec_ref)
        out = out or settings.runs_dir / f"{spec.name}-v{spec.version}"
        report = train_student(sessions, spec, frozen, out_dir=out, epochs=epochs)
    return {**report, "out_dir": str(out), "created_dataset": created}


def train_student(
    sessions: sessionmaker[Session],
    spec: Spec,
    dataset: Dataset,
    *,
    out_dir: Path,
    epochs: int | None = None,
) -> dict[str, Any]:
    """Train on the dataset's accepted train-split labels; evaluate on its val and test
    members against the teacher and the known-good records; returns the report."""
    if spec.kind != "classification":
        raise ConfigError(
            f"spec {spec.name!r} is a {spec.kind} spec; this student trains "
            f"classification specs only"
        )
    from storage.training import dataset_rows
    from student_train.train import StudentConfig, train_classifier

    with sessions() as session:
        rows = dataset_rows(session, dataset.id)
    examples = [_example(row, spec.label_names) for row in rows]
    evaluation = ("kind", "slice_margin", "min_recall")
    section = spec.body.get("student", {})
    settings = {k: v for k, v in section.items() if k not in evaluation}
    if epochs is not None:
        settings["epochs"] = epochs
    named = {"name": dataset.name, "content_hash": dataset.content_hash}
    try:
        config = StudentConfig(**settings)
        report = train_classifier(
            examples,
            spec.label_names,
            config,
            out_dir,
            dataset=named,
            slice_margin=float(section.get("slice_margin", 0.05)),
            min_recall=section.get("min_recall") or {},
        )
    except ValueError as exc:
        raise ConfigError(f"cannot train the student for {spec.name!r}: {exc}") from exc
    return report.as_dict()


def _freeze(sessions: sessionmaker[Session], spec: Spec) -> dict[str, Any]:
    from stillhouse.commands.dataset import freeze_dataset
    from storage.datasets import free_name

    with sessions() as session:
        name = free_name(session, f"{spec.name}-v{spec.version}-{time.strftime('%Y%m%d-%H%M%S')}")
    # student.val_share is held out, half for validation and half for the test split.
    held = float(spec.body.get("student", {}).get("val_share", 0.2))
    recipe = DatasetRecipe(shares=(1.0 - held, held / 2, held / 2))
    return freeze_dataset(sessions, spec, name, filters=TRAINING_FILTERS, recipe=recipe)


def _spec_of(session: Session, dataset: Dataset, spec_ref: str | None) -> Spec:
    """The spec version the dataset was made from: as it was stored, or the one given, which
    must be that version (its operational sections, the student's among them, may have
    changed since, as they may within a version)."""
    row = session.get(SpecRow, dataset.spec_id)
    assert row is not None
    spec = parse_spec(row.body, source=f"{row.name} v{row.version} (stored)")
    if spec_ref is not None:
        given = load_spec(spec_ref)
        if (given.name, given.version) != (row.name, row.version):
            raise ConfigError(
                f"dataset {dataset.name!r} was made from {row.name} v{row.version}, not "
                f"{given.name} v{given.version}: drop --spec, or create a dataset of that "
                f"version"
            )
        if given.content_hash != row.content_hash:
            raise ConfigError(
                f"{given.source} is {row.name} v{row.version}, but what shapes its labels "
                f"differs from the stored version: give it a new version number"
            )
        return given
    return spec


def _example(row: DatasetRow, names: list[str]) -> Any:
    from student_train.data import Example

    known = (row.known_good or {}).get("label")
    usable = row.class_value is not None and row.class_value in names
    return Example(
        item_id=row.item_id,
        external_id=row.external_id,
        text=row.text,
        label=row.class_value if usable and row.class_value else "",
        known_good=known,
        accepted=usable and row.verdict == Verdict.ACCEPTED,
        weight=row.weight,
        split=row.split,
        slices={k: str(v) for k, v in row.slices.items() if v is not None},
    )
