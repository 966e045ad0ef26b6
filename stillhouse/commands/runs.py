"""`stillhouse runs …`: the student runs, queued to finished, and two compared by slice."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from schemas.errors import ConfigError
from stillhouse.context import open_database
from stillhouse.settings import Settings
from storage.models import StudentRun
from storage.runs import list_runs, run_by_name
from student_train.artifacts import interval_key

__all__ = ["run_info", "run_runs_compare", "run_runs_exec", "run_runs_list", "run_runs_show"]


def run_info(run: StudentRun, *, full: bool = False) -> dict[str, Any]:
    """One run as `runs list` (and, ``full``, `runs show`) prints it."""
    summary = run.summary or {}
    info = {
        "name": run.name,
        "id": run.id,
        "spec": run.spec_name,
        "kind": run.kind,
        "state": run.state.value,
        "headline": summary.get("headline"),
        "flagged": run.flagged,
        "latency_ms": summary.get("latency_ms"),
        "out_dir": run.out_dir,
        "created_at": run.created_at.isoformat() if run.created_at else None,
        "started_at": run.started_at.isoformat() if run.started_at else None,
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
        "error": run.error,
    }
    if full:
        info.update(
            summary=summary, request=run.request, host=run.host, pid=run.pid, log=run.log_path
        )
    return info


def run_runs_list(settings: Settings, *, spec: str | None, limit: int) -> list[dict[str, Any]]:
    """The newest runs first."""
    with open_database(settings) as sessions, sessions() as session:
        return [run_info(run) for run in list_runs(session, spec_name=spec, limit=limit)]


def _run(session: Session, name: str) -> StudentRun:
    run = run_by_name(session, name)
    if run is None:
        raise ConfigError(f"no run {name!r}: `stillhouse runs list` shows them")
    return run


def run_runs_show(settings: Settings, name: str) -> dict[str, Any]:
    """One run: its request, state, where it ran, its summary and its files."""
    from pathlib import Path

    with open_database(settings) as sessions, sessions() as session:
        info = run_info(_run(session, name), full=True)
    folder = Path(info["out_dir"])
    info["files"] = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    return info


def run_runs_compare(settings: Settings, first: str, second: str) -> dict[str, Any]:
    """Two finished runs side by side: their headline figures and, per slice, the student's
    figure in each with the difference (second minus first)."""
    with open_database(settings) as sessions, sessions() as session:
        runs = [_run(session, first), _run(session, second)]
        summaries = [run.summary or {} for run in runs]
        names = [run.name for run in runs]
        unfinished = [run.name for run in runs if run.summary is None]
    if unfinished:
        raise ConfigError(f"{', '.join(unfinished)} has not finished: nothing to compare yet")
    key = (summaries[0].get("headline") or {}).get("slice_key", "student_accuracy")
    interval = interval_key(key)
    slices = sorted(set(summaries[0].get("slices") or {}) | set(summaries[1].get("slices") or {}))
    rows = []
    for slice_name in ["overall", *slices]:
        cells = [
            (
                s.get("overall")
                if slice_name == "overall"
                else (s.get("slices") or {}).get(slice_name)
            )
            or {}
            for s in summaries
        ]
        a, b = (c.get(key) for c in cells)
        rows.append(
            {
                "slice": slice_name,
                "a": a,
                "a_interval": cells[0].get(interval),
                "b": b,
                "b_interval": cells[1].get(interval),
                "delta": None if a is None or b is None else round(b - a, 6),
            }
        )
    flagged = [sorted(f["slice"] for f in s.get("flagged") or []) for s in summaries]
    return {
        "a": names[0],
        "b": names[1],
        "metric": key,
        "headline": [s.get("headline") for s in summaries],
        "latency_ms": [s.get("latency_ms") for s in summaries],
        "flagged": flagged,
        "slices": rows,
    }


def _scores_of(summary: dict[str, Any], slice_name: str) -> dict[str, Any]:
    if slice_name == "overall":
        return dict(summary.get("overall") or {})
    return dict((summary.get("slices") or {}).get(slice_name) or {})


def run_runs_exec(settings: Settings, run_id: int) -> dict[str, Any]:
    """Train one queued run in this process (what a train worker's job starts)."""
    from stillhouse.commands.train import execute_run
    from workers.runs import LOG_FILE

    with open_database(settings) as sessions:
        with sessions() as session:
            run = _run(session, str(run_id))
            log_path = f"{run.out_dir}/{LOG_FILE}"
        report = execute_run(sessions, run.id, log_path=log_path)
    return {"run": run.name, "state": "finished", "flagged": len(report.get("flagged") or [])}
