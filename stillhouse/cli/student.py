"""The student: train, and the demo that labels, trains and compares."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stillhouse.cli.root import JsonOpt, SpecOpt, app, err, settings
from stillhouse.output import print_json, show_demo, show_train

__all__ = ["demo", "train"]


@app.command()
def train(
    spec: SpecOpt,
    out: Annotated[Path | None, typer.Option(help="run folder (default runs/SPEC-vN)")] = None,
    epochs: Annotated[int | None, typer.Option(help="override the spec's student.epochs")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Train the student on accepted labels and compare it with the teacher on held-out items.

    Example: stillhouse train --spec triage
    """
    from stillhouse.commands import run_train

    report = run_train(settings(), spec, out=out, epochs=epochs)
    show_train(report, err)
    if as_json:
        print_json(report)


@app.command()
def demo(
    limit: Annotated[int | None, typer.Option(help="label only this many BBC articles")] = None,
) -> None:
    """Start the local teacher, label the BBC corpus, train the student, print accuracies.

    Example: stillhouse demo --limit 500
    """
    from stillhouse.commands import run_demo

    labeled, report = run_demo(settings(), limit=limit, console=err)
    show_demo(labeled, report)
