"""The student: train, and the demo that labels, trains and compares."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stillhouse.cli.root import JsonOpt, app, err, settings
from stillhouse.output import print_json, show_demo, show_train

__all__ = ["demo", "train"]


@app.command()
def train(
    spec: Annotated[
        str | None,
        typer.Option("--spec", "-s", help="spec file or bundled name: freeze a dataset of it now"),
    ] = None,
    dataset: Annotated[
        str | None, typer.Option(help="a dataset from `stillhouse dataset create`")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="run folder (default runs/SPEC-vN)")] = None,
    epochs: Annotated[int | None, typer.Option(help="override the spec's student.epochs")] = None,
    fail_on_flag: Annotated[
        bool,
        typer.Option(
            "--fail-on-flag", help="exit 4 when a slice or class is flagged (for pipelines)"
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Train the student on a frozen dataset and compare it with the teacher on held-out items.

    It learns from the accepted labels of the dataset's train split (with their weights) and
    is measured on its val and test splits, and by slice and class on the test split: a
    slice more than student.slice_margin below the overall accuracy, or a class below its
    student.min_recall, is flagged. Given a spec and no dataset, it first freezes one of
    every label of the spec's current version and says which; labeling can go on.

    Example: stillhouse train --spec triage

    Example: stillhouse train --dataset triage-2026-12
    """
    from stillhouse.commands import run_train

    report = run_train(settings(), spec, dataset=dataset, out=out, epochs=epochs)
    show_train(report, err)
    if as_json:
        print_json(report)
    if fail_on_flag and report.get("flagged"):
        names = ", ".join(flag["slice"] for flag in report["flagged"])
        err.print(f"--fail-on-flag: {names} flagged", markup=False, highlight=False)
        raise typer.Exit(4)


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
