"""Student runs: create one, move it through queued → running → finished | failed, read them.

A run is recorded before its trainer starts, so `stillhouse runs` shows queued and running
work, and a trainer that dies leaves a row that says so (``fail_run`` from whoever saw it
die). Each transition is fenced by the state it leaves: a run is started once, and a run
that finished is never marked failed by a late watcher.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from storage.models import RunState, StudentRun

__all__ = [
    "create_run",
    "fail_run",
    "finish_run",
    "list_runs",
    "run_by_name",
    "start_run",
]


def create_run(
    session: Session,
    *,
    name: str,
    spec_id: int,
    spec_name: str,
    dataset_id: int,
    kind: str,
    out_dir: str,
    request: dict[str, Any],
) -> StudentRun:
    """A queued run (flushed, so it has its id)."""
    run = StudentRun(
        name=name,
        spec_id=spec_id,
        spec_name=spec_name,
        dataset_id=dataset_id,
        kind=kind,
        state=RunState.QUEUED,
        out_dir=out_dir,
        request=request,
    )
    session.add(run)
    session.flush()
    return run


def _move(session: Session, run_id: int, sources: tuple[RunState, ...], **values: Any) -> bool:
    """Set ``values`` on the run if it is in one of ``sources``; whether it was."""
    result = session.execute(
        update(StudentRun)
        .where(StudentRun.id == run_id, StudentRun.state.in_(sources))
        .values(**values)
    )
    return bool(getattr(result, "rowcount", 0))


def start_run(session: Session, run_id: int, *, host: str, pid: int, log_path: str | None) -> bool:
    """Mark a queued run running in this process; False when it is not queued (started
    elsewhere already, or over)."""
    return _move(
        session,
        run_id,
        (RunState.QUEUED,),
        state=RunState.RUNNING,
        host=host,
        pid=pid,
        log_path=log_path,
        started_at=datetime.now(UTC),
    )


def finish_run(session: Session, run_id: int, summary: dict[str, Any]) -> bool:
    """Record a running run's summary and mark it finished."""
    return _move(
        session,
        run_id,
        (RunState.RUNNING,),
        state=RunState.FINISHED,
        summary=summary,
        flagged=len(summary.get("flagged") or []),
        finished_at=datetime.now(UTC),
    )


def fail_run(session: Session, run_id: int, error: str) -> bool:
    """Mark a queued or running run failed with why; a finished run stays finished."""
    return _move(
        session,
        run_id,
        (RunState.QUEUED, RunState.RUNNING),
        state=RunState.FAILED,
        error=error[-4_000:],
        finished_at=datetime.now(UTC),
    )


def run_by_name(session: Session, name: str) -> StudentRun | None:
    """The run called ``name`` (or whose id is ``name``), if any."""
    run = session.scalars(select(StudentRun).where(StudentRun.name == name)).first()
    if run is None and name.isdigit():
        run = session.get(StudentRun, int(name))
    return run


def list_runs(
    session: Session, *, spec_name: str | None = None, limit: int = 50
) -> list[StudentRun]:
    """The newest runs first, of one spec or all."""
    stmt = select(StudentRun).order_by(StudentRun.id.desc()).limit(limit)
    if spec_name is not None:
        stmt = stmt.where(StudentRun.spec_name == spec_name)
    return list(session.scalars(stmt))
