"""`stillhouse advise`: should this spec's task be distilled, at this volume? Gathers the
measured figures (the ledger, the labels, the latest run and its router) and hands them,
with the stated costs, to ``workers.advice.advise``."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path
from typing import Any

from sqlalchemy import distinct, func, or_, select
from sqlalchemy.orm import Session

from stillhouse.context import open_database
from stillhouse.settings import Settings
from storage.models import (
    CallStatus,
    Item,
    Label,
    ReviewState,
    ReviewTask,
    RunState,
    SpecRow,
    StudentRun,
    TeacherCall,
    Verdict,
)
from workers.advice import Measured, Stated, advise
from workers.spec import Spec, load_spec

__all__ = ["measure_task", "run_advise"]


def run_advise(
    settings: Settings,
    spec_ref: str,
    volume_per_day: float,
    stated: Stated,
    *,
    teacher_usd_per_item: float | None = None,
) -> dict[str, Any]:
    """The advice for ``spec_ref`` at ``volume_per_day``; ``teacher_usd_per_item`` replaces
    the ledger's figure (a what-if: another teacher's price)."""
    spec = load_spec(spec_ref)
    with open_database(settings) as sessions, sessions() as session:
        measured = measure_task(session, spec)
    if teacher_usd_per_item is not None:
        measured = dataclasses.replace(measured, teacher_usd_per_item=teacher_usd_per_item)
    result = advise(measured, stated, volume_per_day)
    result["teacher_cost_from"] = "stated" if teacher_usd_per_item is not None else "ledger"
    return result


def measure_task(session: Session, spec: Spec) -> Measured:
    """What the store says about ``spec`` (every stored version of its name)."""
    spec_ids = list(session.scalars(select(SpecRow.id).where(SpecRow.name == spec.name)))
    if not spec_ids:
        return Measured(spec=spec.name, classes=len(spec.label_names))
    spend, items_called = session.execute(
        select(func.sum(TeacherCall.cost_usd), func.count(distinct(TeacherCall.item_id))).where(
            TeacherCall.spec_id.in_(spec_ids)
        )
    ).one()
    latency = session.scalar(
        select(func.avg(TeacherCall.latency_ms)).where(
            TeacherCall.spec_id.in_(spec_ids), TeacherCall.status == CallStatus.OK
        )
    )
    outputs = session.scalars(
        select(Label.output).where(Label.spec_id.in_(spec_ids), Label.verdict == Verdict.ACCEPTED)
    )
    counts: Counter[str] = Counter()
    labeled = 0
    for output in outputs:
        labeled += 1
        value = (output or {}).get(spec.class_field) if spec.class_field else None
        if isinstance(value, str):
            counts[value] += 1
    items = session.scalar(
        select(func.count()).select_from(Item).where(Item.spec_name == spec.name)
    )
    reviewed = select(ReviewTask.item_id).where(
        ReviewTask.spec_id.in_(spec_ids), ReviewTask.state == ReviewState.RESOLVED
    )
    measurable = session.scalar(
        select(func.count())
        .select_from(Item)
        .where(
            Item.spec_name == spec.name,
            or_(Item.known_good.is_not(None), Item.id.in_(reviewed)),
        )
    )
    run = session.scalars(
        select(StudentRun)
        .where(StudentRun.spec_name == spec.name, StudentRun.state == RunState.FINISHED)
        .order_by(StudentRun.id.desc())
        .limit(1)
    ).first()
    figures = _run_figures(run)
    return Measured(
        spec=spec.name,
        teacher_usd_per_item=(float(spend or 0.0) / items_called) if items_called else None,
        teacher_latency_ms=None if latency is None else round(float(latency), 3),
        items_labeled=labeled,
        classes=len(spec.label_names),
        label_counts=dict(counts),
        measurable_share=(measurable or 0) / items if items else 0.0,
        **figures,
    )


def _run_figures(run: StudentRun | None) -> dict[str, Any]:
    """The latest run's student and router figures (its summary, then its router.json)."""
    if run is None:
        return {}
    summary = run.summary or {}
    overall = summary.get("overall") or {}
    router = summary.get("router")
    path = Path(run.out_dir) / "router.json"
    if router is None and path.is_file():
        router = json.loads(path.read_text(encoding="utf-8"))
    test = (router or {}).get("test") or {}
    return {
        "run": run.name,
        "student_kind": run.kind,
        "student_accuracy": overall.get("student_accuracy"),
        "teacher_accuracy": test.get("teacher_accuracy", overall.get("teacher_accuracy")),
        "routed_accuracy": test.get("accuracy"),
        "fallback_share": test.get("teacher_share"),
        "student_latency_p99_ms": (summary.get("latency_ms") or {}).get("p99"),
        "against": (router or {}).get("against"),
    }
