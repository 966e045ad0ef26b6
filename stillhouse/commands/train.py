"""`stillhouse train`: the student trained on a frozen dataset, compared with the teacher on
its held-out splits."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from schemas.errors import ConfigError
from stillhouse.context import open_database
from stillhouse.settings import Settings
from storage.datasets import DatasetFilters, DatasetRecipe, dataset_by_name, free_name
from storage.models import Dataset, SpecRow, StudentRun, Verdict
from storage.runs import create_run, fail_run, finish_run, start_run
from storage.training import DatasetRow
from workers.spec import Spec, load_spec, parse_spec

__all__ = [
    "TRAINING_FILTERS",
    "calibrate_run",
    "execute_run",
    "load_classifier",
    "run_summary",
    "run_train",
    "student_kind",
    "train_student",
    "write_run_files",
]

# The dataset `train --spec` freezes: every label, so the held-out splits measure the student
# and the teacher on what comes in, not only on what the checks kept; training itself uses
# the accepted labels of the train split.
TRAINING_FILTERS = DatasetFilters(verdicts=tuple(v.value for v in Verdict))
# Settings of the spec's student section that the evaluation reads, not the trainer.
EVALUATION_SETTINGS = ("kind", "slice_margin", "min_recall")
DEFAULT_KIND = {"classification": "bag_of_ngrams", "ranking": "ranking", "extraction": "tagger"}
# The student kinds each task kind takes.
KINDS_FOR = {
    "classification": ("bag_of_ngrams", "minilm"),
    "ranking": ("ranking",),
    "extraction": ("tagger",),
}


def run_train(
    settings: Settings,
    spec_ref: str | None,
    *,
    dataset: str | None = None,
    out: Path | None,
    epochs: int | None,
    queue: bool = False,
) -> dict[str, Any]:
    """Train the student on dataset ``dataset`` or, given only a spec, on a dataset frozen
    now from its current version with the defaults (``created_dataset`` names it); labeling
    may go on meanwhile. The run is recorded first (``stillhouse runs``) with its own folder;
    with ``queue`` it goes to the workers' train queue, else it trains here and now.
    ``stillhouse.output.show_train`` prints the comparison."""
    if dataset is None and spec_ref is None:
        raise ConfigError("say what to train on: --dataset NAME, or --spec SPEC")
    if queue:  # refused before anything is recorded
        from stillhouse.distributed import open_celery

        open_celery(settings, check=False)
    created = None
    with open_database(settings) as sessions:
        if dataset is None:
            assert spec_ref is not None
            spec = load_spec(spec_ref)
            created = _freeze(sessions, spec)
            dataset = created["name"]
        with sessions.begin() as session:
            frozen = dataset_by_name(session, dataset)
            spec = _spec_of(session, frozen, spec_ref)
            request = {"epochs": epochs, "spec_ref": spec_ref}
            run = _new_run(session, settings, spec, frozen, out, request)
            run_id, run_name, out_dir = run.id, run.name, run.out_dir
        if queue:
            from stillhouse.distributed import submit_training

            submit_training(settings, run_id)
            return {
                "run": run_name,
                "state": "queued",
                "out_dir": out_dir,
                "created_dataset": created,
            }
        report = execute_run(sessions, run_id, spec=spec)
    return {**report, "run": run_name, "out_dir": out_dir, "created_dataset": created}


def _new_run(
    session: Session,
    settings: Settings,
    spec: Spec,
    dataset: Dataset,
    out: Path | None,
    request: dict[str, Any],
) -> StudentRun:
    """A queued run with a name and a folder of its own: a given ``out`` must be new or
    empty, so one run never overwrites another's files."""
    kind = student_kind(spec)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = free_name(session, f"{spec.name}-v{spec.version}-{stamp}", StudentRun.name)
    folder = out or settings.runs_dir / name
    while out is None and folder.exists():  # a runs folder shared by several databases
        name = f"{name}-x"
        folder = settings.runs_dir / name
    if folder.exists() and any(folder.iterdir()):
        raise ConfigError(
            f"{folder} is not empty: runs never overwrite each other; give --out a new folder "
            f"or leave it out (each run gets {settings.runs_dir}/NAME)"
        )
    assert dataset.id is not None
    return create_run(
        session,
        name=name,
        spec_id=dataset.spec_id,
        spec_name=spec.name,
        dataset_id=dataset.id,
        kind=kind,
        out_dir=str(folder),
        request=request,
    )


def execute_run(
    sessions: sessionmaker[Session],
    run_id: int,
    *,
    spec: Spec | None = None,
    log_path: str | None = None,
) -> dict[str, Any]:
    """Train a queued run in this process: mark it running, train, write its folder (weights,
    config, metrics, model card, plots), and record it finished, or failed with why (then
    the error is raised again). Commits: the start (so `runs` shows it running), the end."""
    with sessions.begin() as session:
        run = session.get(StudentRun, run_id)
        if run is None:
            raise ConfigError(f"no run {run_id}: see `stillhouse runs list`")
        if not start_run(
            session, run_id, host=socket.gethostname(), pid=os.getpid(), log_path=log_path
        ):
            raise ConfigError(f"run {run.name} is {run.state}, not queued: it is not trained again")
        frozen = session.get(Dataset, run.dataset_id)
        assert frozen is not None
        session.expunge(frozen)
        spec = spec or _spec_of(session, frozen, None)
        out_dir, request, name = Path(run.out_dir), dict(run.request), run.name
    try:
        report = train_student(
            sessions, spec, frozen, out_dir=out_dir, epochs=request.get("epochs")
        )
        about = {
            "run": name,
            "spec": spec.name,
            "version": spec.version,
            "kind": spec.kind,
            "description": spec.body.get("description", ""),
        }
        report["artifacts"] = write_run_files(report, out_dir, about)
    except BaseException as exc:
        with sessions.begin() as session:
            fail_run(session, run_id, f"{type(exc).__name__}: {exc}")
        raise
    with sessions.begin() as session:
        finish_run(session, run_id, run_summary(report))
    return report


def write_run_files(report: dict[str, Any], out_dir: Path, about: dict[str, Any]) -> list[str]:
    """The model card and plots beside the weights; ``metrics.json`` rewritten with the run's
    name and the list of its files."""
    import json

    from student_train.artifacts import write_artifacts

    files = write_artifacts(report, out_dir, about)
    report["run"] = about["run"]
    present = sorted(p.name for p in out_dir.iterdir() if p.is_file())
    report["artifacts"] = sorted(set(present) | set(files))
    (out_dir / "metrics.json").write_text(
        json.dumps(report, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8"
    )
    return list(report["artifacts"])


def run_summary(report: dict[str, Any]) -> dict[str, Any]:
    """What the runs table keeps of a report: enough for `runs list` and `runs compare`."""
    keys = (
        *("kind", "headline", "overall", "slices", "flagged", "latency_ms", "size_bytes"),
        *("evaluated_on", "n_train", "n_val", "dataset", "slice_margin"),
    )
    summary = {key: report.get(key) for key in keys}
    router = report.get("router")
    if router:  # the router's test figures (the advisor reads them), not its curve
        summary["router"] = {
            key: router.get(key) for key in ("against", "target_accuracy", "temperature", "test")
        }
    return summary


def student_kind(spec: Spec) -> str:
    """The spec's student kind, checked against its task kind."""
    section = spec.body.get("student", {})
    kind = str(section.get("kind") or DEFAULT_KIND[spec.kind])
    if kind not in KINDS_FOR[spec.kind]:
        raise ConfigError(
            f"spec {spec.name!r} is a {spec.kind} spec: student.kind {kind!r} does not fit; "
            f"choose one of {', '.join(KINDS_FOR[spec.kind])}"
        )
    return kind


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
    from storage.training import dataset_rows

    kind = student_kind(spec)
    with sessions() as session:
        rows = dataset_rows(session, dataset.id)
    section = spec.body.get("student", {})
    settings = {k: v for k, v in section.items() if k not in EVALUATION_SETTINGS}
    if epochs is not None:
        settings["epochs"] = epochs
    named = {"name": dataset.name, "content_hash": dataset.content_hash}
    margin = float(section.get("slice_margin", 0.05))
    try:
        report = _TRAINERS[kind](rows, spec, settings, out_dir, margin)
        if spec.kind == "classification":
            report["router"] = calibrate_run(kind, rows, spec, out_dir)
    except ValueError as exc:
        raise ConfigError(f"cannot train the student for {spec.name!r}: {exc}") from exc
    report["dataset"] = named
    return report


def _config(cls: Any, settings: dict[str, Any], kind: str) -> Any:
    """The kind's config from the spec's student settings; a setting of another kind is an
    error that names the kind's own."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ConfigError(
            f"student.{', student.'.join(unknown)} is not a setting of the {kind} student; "
            f"it takes {', '.join(sorted(known))} (see docs/spec-reference.md)"
        )
    return cls(**settings)


def _train_bag(
    rows: list[DatasetRow], spec: Spec, settings: dict[str, Any], out_dir: Path, margin: float
) -> dict[str, Any]:
    from student_train.train import StudentConfig, train_classifier

    examples = [_example(row, spec.label_names) for row in rows]
    report = train_classifier(
        examples,
        spec.label_names,
        _config(StudentConfig, settings, "bag_of_ngrams"),
        out_dir,
        slice_margin=margin,
        min_recall=spec.body.get("student", {}).get("min_recall") or {},
    )
    return report.as_dict()


def _freeze(sessions: sessionmaker[Session], spec: Spec) -> dict[str, Any]:
    from stillhouse.commands.dataset import freeze_dataset

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


def calibrate_run(kind: str, rows: list[DatasetRow], spec: Spec, out_dir: Path) -> dict[str, Any]:
    """The saved student's routing (``student_train.routing``): calibrated and thresholded
    on the dataset's val split, measured on its test split, by the spec's ``router``
    section; the policy is also written to ``router.json`` for `stillhouse route serve`."""
    from student_train.routing import ROUTER_FILE, ROUTER_FORMAT, RouterConfig, calibrate_router
    from student_train.runtime import write_json

    student = load_classifier(kind, out_dir)
    held = [
        example
        for example in (_example(row, spec.label_names) for row in rows)
        if example.split in ("val", "test")
    ]
    config = RouterConfig.from_section(spec.body.get("router"), spec.label_names)
    probabilities = student.predict_proba([example.text for example in held])
    result = calibrate_router(probabilities, held, spec.label_names, config)
    write_json(out_dir / ROUTER_FILE, {"format": ROUTER_FORMAT, **result})
    return result


def load_classifier(kind: str, out_dir: Path) -> Any:
    """A saved classification student of ``kind`` (its ``predict_proba`` serves)."""
    if kind == "minilm":
        from student_train.encoder import load_encoder_student

        return load_encoder_student(out_dir)
    from student_train.train import load_student

    return load_student(out_dir)


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
        confidence=row.confidence if row.confidence is not None else row.agreement,
        slices={k: str(v) for k, v in row.slices.items() if v is not None},
    )


def _train_encoder(
    rows: list[DatasetRow], spec: Spec, settings: dict[str, Any], out_dir: Path, margin: float
) -> dict[str, Any]:
    from student_train.encoder import EncoderConfig, fit_encoder_student, save_encoder_student

    config = _config(EncoderConfig, settings, "minilm")
    examples = [_example(row, spec.label_names) for row in rows]
    student, report = fit_encoder_student(
        examples,
        spec.label_names,
        config,
        slice_margin=margin,
        min_recall=spec.body.get("student", {}).get("min_recall") or {},
    )
    save_encoder_student(student, config, report, out_dir)
    return report.as_dict()


def _train_ranker(
    rows: list[DatasetRow], spec: Spec, settings: dict[str, Any], out_dir: Path, margin: float
) -> dict[str, Any]:
    from student_train.ranking import (
        RankingConfig,
        examples_from_rows,
        fit_ranking,
        ranking_k,
        save_ranking,
    )

    config = _config(RankingConfig, settings, "ranking")
    examples = examples_from_rows(rows, spec.body)
    student, report = fit_ranking(examples, config, slice_margin=margin, k=ranking_k(spec.body))
    save_ranking(student, config, report, out_dir)
    return report


def _train_tagger(
    rows: list[DatasetRow], spec: Spec, settings: dict[str, Any], out_dir: Path, margin: float
) -> dict[str, Any]:
    from student_train.tagger import (
        TaggerConfig,
        examples_from_rows,
        extraction_fields,
        fit_tagger,
        save_tagger,
    )

    config = _config(TaggerConfig, settings, "tagger")
    fields = extraction_fields(spec.output_schema)
    examples = examples_from_rows(rows, spec.body, list(fields))
    student, report = fit_tagger(
        examples,
        fields,
        config,
        slice_margin=margin,
        min_recall=spec.body.get("student", {}).get("min_recall") or {},
    )
    # The student's answers on the evaluated documents through the teacher's own checks
    # (schema, grounding), as a router would run them.
    tested = [e for e in examples if e.split == "test"] or [
        e for e in examples if e.split != "train"
    ]
    report["checks"] = _check_answers(spec, student.predict([e.text for e in tested]), tested)
    save_tagger(student, config, report, out_dir)
    return report


def _check_answers(spec: Spec, answers: list[dict[str, Any]], docs: list[Any]) -> dict[str, Any]:
    import json
    from collections import Counter

    from workers.checks import Checker
    from workers.providers import Answer

    checker = Checker(spec)
    reasons: Counter[str] = Counter()
    for answer, doc in zip(answers, docs, strict=True):
        result = checker.check(Answer(content=json.dumps(answer)), None, doc.text)
        reasons.update(result.reasons)
    failed = sum(reasons.values())
    return {"answers": len(answers), "reasons": dict(reasons), "with_a_problem": failed}


_TRAINERS: dict[
    str, Callable[[list[DatasetRow], Spec, dict[str, Any], Path, float], dict[str, Any]]
] = {
    "bag_of_ngrams": _train_bag,
    "minilm": _train_encoder,
    "ranking": _train_ranker,
    "tagger": _train_tagger,
}
