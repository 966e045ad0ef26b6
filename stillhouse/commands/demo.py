"""`stillhouse demo`: the local teacher, the BBC corpus, a student, and the accuracies."""

from __future__ import annotations

from rich.console import Console

from stillhouse.commands.backfill import run_backfill
from stillhouse.commands.train import run_train
from stillhouse.output import pct
from stillhouse.settings import Settings

__all__ = ["run_demo"]


def run_demo(settings: Settings, *, limit: int | None, console: Console) -> None:
    from stillhouse.servers.teacher.process import local_teacher

    console.print("starting the local teacher (all-MiniLM-L6-v2 zero-shot) …")
    with local_teacher() as base_url:
        local = settings.model_copy(update={"teacher_base_url": base_url})
        result = run_backfill(local, "bbc", "triage", limit=limit, wait=True, console=console)
    report = run_train(local, "triage", out=None, epochs=None, console=console)
    run = {k: result.get(k, 0) for k in ("labeled", "teacher_calls", "cache_hits")}
    print(
        f"{result['labels']} BBC articles labeled; this run: {run['labeled']} new labels, "
        f"{run['teacher_calls']} teacher calls, {run['cache_hits']} cache hits, "
        f"{result['seconds']:.1f} s"
    )
    print(
        f"teacher accuracy vs known-good: {pct(result['teacher_accuracy'])} "
        f"(all {result['labels']} labels); accepted labels: {result['accepted']}"
    )
    print(
        f"student accuracy vs known-good: {pct(report['student_accuracy'])} on "
        f"{report['n_val']} held-out articles (teacher on the same: "
        f"{pct(report['teacher_accuracy'])})"
    )
