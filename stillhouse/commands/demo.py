"""`stillhouse demo`: the local teacher, the BBC corpus, a student, and the accuracies."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from stillhouse.commands.backfill import run_backfill
from stillhouse.commands.report import run_report
from stillhouse.commands.train import run_train
from stillhouse.output import show_backfill, show_calibrated, show_train
from stillhouse.settings import Settings

__all__ = ["run_demo"]


def run_demo(
    settings: Settings, *, limit: int | None, console: Console
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Label the bundled BBC corpus with the local teacher, then train the student; returns
    the backfill's and the training's results (``stillhouse.output.show_demo`` sums them
    up). The two steps' own summaries go to ``console`` as they finish."""
    from stillhouse.servers.teacher.process import local_teacher

    console.print("starting the local teacher (all-MiniLM-L6-v2 zero-shot) …")
    with local_teacher() as base_url:
        local = settings.model_copy(update={"teacher_base_url": base_url})
        labeled = run_backfill(local, "bbc", "triage", limit=limit, wait=True, console=console)
    show_backfill(labeled, console)
    calibrated = run_report(local, "triage").get("calibrated")
    if calibrated is not None:  # the spec's target: what it did to the labels without a record
        show_calibrated(calibrated, console)
    report = run_train(local, "triage", out=None, epochs=None)
    show_train(report, console)
    return labeled, report
