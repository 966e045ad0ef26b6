"""`stillhouse review`: labels waiting for a person's decision."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from schemas.errors import ConfigError
from stillhouse.commands.common import stored_spec_id
from stillhouse.context import open_database
from stillhouse.settings import Settings
from storage.models import ReviewReason
from workers.spec import load_spec

__all__ = [
    "ReviewQueue",
    "run_review_list",
    "run_review_resolve",
    "run_review_sample",
    "run_review_suspects",
    "run_task_resolve",
]

TASK_REASONS = tuple(reason.value for reason in ReviewReason)


@dataclass(frozen=True, slots=True)
class ReviewQueue:
    """The labels waiting for review under one spec version (``entries`` is what `review
    list --json` prints)."""

    spec: str
    version: int
    entries: list[dict[str, Any]]
    reason: str | None = None  # None: labels waiting; else the tasks' reason

    @property
    def title(self) -> str:
        return f"{self.spec} v{self.version}" + (f" ({self.reason})" if self.reason else "")


def run_review_list(
    settings: Settings, spec_ref: str, *, limit: int, reason: str | None = None
) -> ReviewQueue:
    """The labels waiting for review, or with ``reason`` (``suspect_record``, ``sample``)
    that reason's open tasks, highest rank first (``stillhouse.output.show_review_queue``
    prints them)."""
    from storage.review import review_queue, task_queue

    spec = load_spec(spec_ref)
    kind = _task_reason(reason)
    with open_database(settings) as sessions:
        spec_id = stored_spec_id(sessions, spec)
        with sessions() as session:
            if kind is None:
                entries = [asdict(e) for e in review_queue(session, spec_id, limit=limit)]
            else:
                entries = [asdict(e) for e in task_queue(session, spec_id, kind, limit=limit)]
    return ReviewQueue(spec.name, spec.version, entries, reason)


def _task_reason(reason: str | None) -> Any:

    if reason is None or reason in ("known_good_mismatch", "label"):
        return None
    if reason not in TASK_REASONS:
        raise ConfigError(
            f"--reason {reason!r}: choose suspect_record (records that look wrong), sample "
            f"(sampled labels to decide) or known_good_mismatch (labels waiting, the default)"
        )
    return ReviewReason(reason)


def run_review_suspects(settings: Settings, spec_ref: str, *, folds: int = 5) -> dict[str, Any]:
    """Finds the records the teacher and an out-of-fold model agree against and queues them
    as ``suspect_record`` tasks (an item already queued, or decided, is not queued again)."""
    from storage.review import judged_rows, queue_tasks

    spec = load_spec(spec_ref)
    with open_database(settings) as sessions:
        spec_id = stored_spec_id(sessions, spec)
        with sessions() as session:
            rows = judged_rows(session, spec_id)
        found = _suspect_tasks(spec, rows, folds=folds)
        with sessions() as session:
            queued = queue_tasks(session, spec_id, ReviewReason.SUSPECT_RECORD, found)
            session.commit()
    return {
        "spec": spec.name,
        "version": spec.version,
        "records": len(rows),
        "suspects": len(found),
        "queued": queued,
        "top": [{"item_id": t.item_id, "suggested": t.proposed, **t.details} for t in found[:10]],
    }


def run_review_sample(settings: Settings, spec_ref: str, *, n: int) -> dict[str, Any]:
    """Queues a stratified sample of ``n`` labels without a record as ``sample`` tasks and
    says where the review stands (``workers.review.progress``)."""
    from storage.review import queue_tasks, sample_population
    from workers.review import stratified_sample

    spec = load_spec(spec_ref)
    with open_database(settings) as sessions:
        spec_id = stored_spec_id(sessions, spec)
        with sessions() as session:
            population = sample_population(session, spec_id)
            if not population:
                raise ConfigError(
                    f"no label of {spec.name} v{spec.version} is left to sample: every parsed "
                    f"label with a confidence has a record or is in the sample already"
                )
            tasks = stratified_sample(population, n, spec.class_field)
            queued = queue_tasks(session, spec_id, ReviewReason.SAMPLE, tasks)
            session.commit()
        strata: dict[str, int] = {}
        for task in tasks:
            strata[task.stratum or "-"] = strata.get(task.stratum or "-", 0) + 1
        return {
            "spec": spec.name,
            "version": spec.version,
            "population": len(population),
            "queued": queued,
            "strata": strata,
            "progress": _progress(sessions, spec, spec_id),
        }


def _progress(sessions: Any, spec: Any, spec_id: int) -> dict[str, Any]:
    from storage.review import recorded_labels, sample_decisions
    from workers.review import progress

    with sessions() as session:
        waiting, decided, right = sample_decisions(session, spec_id)
        records = recorded_labels(session, spec_id)
    return progress(spec, waiting, decided, right, with_record=records)


def run_review_resolve(
    settings: Settings,
    spec_ref: str,
    items: list[str],
    *,
    accept: bool,
    note: str | None,
    which: Any = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Decide the waiting labels of ``items``, or every waiting label ``which`` covers
    (``stillhouse.output.show_review_decision`` prints what it decided)."""
    from storage.review import resolve_review, resolve_reviews

    spec = load_spec(spec_ref)
    with open_database(settings) as sessions:
        spec_id = stored_spec_id(sessions, spec)
        decided: list[str] = []
        with sessions() as session:
            if items:
                for item in items:  # each must be waiting: the error names the one that is not
                    resolve_review(session, spec_id, item, accept=accept, note=note)
                    decided.append(item)
            else:
                decided = resolve_reviews(
                    session, spec_id, accept=accept, which=which, note=note, dry_run=dry_run
                )
            if dry_run:
                session.rollback()
            else:
                session.commit()
    verdict = "accepted" if accept else "rejected"
    return {"verdict": verdict, "decided": decided, "dry_run": dry_run}


def run_task_resolve(
    settings: Settings,
    spec_ref: str,
    reason: str,
    items: list[str],
    *,
    accept: bool,
    record: dict[str, Any] | None,
    by: str,
    note: str | None,
    every: bool = False,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Decides ``suspect_record`` or ``sample`` tasks (``workers.review.decide`` says what
    each decision writes); all of them, or none when one is wrong."""
    from storage.models import Verdict
    from storage.review import decide_task, open_task_rows, task_row
    from workers.review import decide

    spec = load_spec(spec_ref)
    kind = _task_reason(reason)
    with open_database(settings) as sessions:
        spec_id = stored_spec_id(sessions, spec)
        decided: list[dict[str, Any]] = []
        with sessions() as session:
            rows = (
                open_task_rows(session, spec_id, kind)
                if every
                else [task_row(session, spec_id, kind, item) for item in items]
            )
            for row in rows:
                made = decide(spec, row, accept=accept, record=record)
                verdict = made.label_verdict
                if not dry_run:
                    decide_task(
                        row,
                        decision=made.decision,
                        record_after=made.record,
                        label_verdict=verdict,
                        by=by,
                        note=note,
                        session=session,
                    )
                decided.append(
                    {
                        "item": row.item.external_id,
                        "decision": made.decision,
                        "record": made.record,
                        "label": None if verdict is None else Verdict(verdict).value,
                    }
                )
            if dry_run:
                session.rollback()
            else:
                session.commit()
        result: dict[str, Any] = {"reason": reason, "decided": decided, "dry_run": dry_run}
        if kind.value == "sample":
            result["progress"] = _progress(sessions, spec, spec_id)
    return result


def _suspect_tasks(spec: Any, rows: Sequence[tuple[Any, ...]], *, folds: int = 5) -> list[Any]:
    """The records the teacher and an out-of-fold model agree against (confident learning,
    ``student_train.suspects``), as tasks ranked by P(record wrong). ``rows`` are
    ``storage.review.judged_rows``."""
    from storage.review import NewTask
    from student_train.suspects import Judged, find_suspects

    field = spec.class_field
    if field is None:
        raise ConfigError(
            f"{spec.name} is a {spec.kind} spec: suspect records are found for classification "
            f"specs, where a record is a class an out-of-fold model can dispute"
        )
    judged = []
    for item_id, external_id, text, record, output, confidence in rows:
        given = (record or {}).get(field)
        if not isinstance(given, str):
            continue
        said = output.get(field) if isinstance(output, dict) else None
        judged.append(
            Judged(
                item_id,
                external_id,
                text,
                given,
                said if isinstance(said, str) else None,
                confidence,
            )
        )
    found = find_suspects(judged, spec.label_names, folds=folds)
    return [
        NewTask(
            item_id=s.item_id,
            rank=s.p_record_wrong,
            proposed={field: s.suggested},
            details={
                "p_record_wrong": s.p_record_wrong,
                "teacher_confidence": s.teacher_confidence,
                "model_probability": s.model_probability,
                "record": s.record,
            },
        )
        for s in found
    ]
