"""The student: train, its runs, the advisor (distill or not), and the demo that labels,
trains and compares."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stillhouse.cli.root import JsonOpt, app, err, runs_app, settings
from stillhouse.output import (
    print_json,
    show_advice,
    show_demo,
    show_run,
    show_runs,
    show_runs_compare,
    show_train,
)

__all__ = ["advise", "demo", "runs_compare", "runs_exec", "runs_list", "runs_show", "train"]


@app.command()
def train(
    spec: Annotated[
        str | None,
        typer.Option("--spec", "-s", help="spec file or bundled name: freeze a dataset of it now"),
    ] = None,
    dataset: Annotated[
        str | None, typer.Option(help="a dataset from `stillhouse dataset create`")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="run folder, new or empty (default runs/RUN)")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="override the spec's student.epochs")] = None,
    fail_on_flag: Annotated[
        bool,
        typer.Option(
            "--fail-on-flag", help="exit 4 when a slice or class is flagged (for pipelines)"
        ),
    ] = False,
    queue: Annotated[
        bool,
        typer.Option(
            "--queue",
            help="submit to the workers' train queue (`stillhouse worker --queues train`) "
            "instead of training here",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Train the student on a frozen dataset and compare it with the teacher on held-out items.

    It learns from the accepted labels of the dataset's train split (with their weights) and
    is measured on its val and test splits, and by slice and class on the test split: a
    slice more than student.slice_margin below the overall accuracy, or a class below its
    student.min_recall, is flagged. Given a spec and no dataset, it first freezes one of
    every label of the spec's current version and says which; labeling can go on. Each run
    is recorded (`stillhouse runs list`) and gets a folder of its own under runs/: weights
    (safetensors), config.json, metrics.json, MODEL_CARD.md and PNG plots. With --queue a
    train worker runs the trainer as its own process and `stillhouse runs` follows it.

    Example: stillhouse train --spec triage

    Example: stillhouse train --dataset triage-2026-12
    """
    from stillhouse.commands import run_train

    report = run_train(settings(), spec, dataset=dataset, out=out, epochs=epochs, queue=queue)
    if queue:
        err.print(
            f"queued run {report['run']} on the train queue; follow it with "
            f"`stillhouse runs show {report['run']}`",
            markup=False,
            highlight=False,
        )
        if as_json:
            print_json(report)
        return
    show_train(report, err)
    if as_json:
        print_json(report)
    if fail_on_flag and report.get("flagged"):
        names = ", ".join(dict.fromkeys(flag["slice"] for flag in report["flagged"]))
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


@runs_app.command("list")
def runs_list(
    spec: Annotated[str | None, typer.Option("--spec", "-s", help="only this spec's runs")] = None,
    limit: Annotated[int, typer.Option(help="how many, newest first")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """The student runs, newest first: queued, running, finished or failed, with the headline
    figure, flagged slices and latency of those that finished.

    Example: stillhouse runs list --spec triage
    """
    from stillhouse.commands import run_runs_list

    runs = run_runs_list(settings(), spec=spec, limit=limit)
    print_json(runs) if as_json else show_runs(runs, err)


@runs_app.command("show")
def runs_show(
    run: Annotated[str, typer.Argument(help="run name (or id)")],
    as_json: JsonOpt = False,
) -> None:
    """One run: what it was asked, where and when it ran, how it ended (the error of a failed
    run, the end of its log), its figures by slice and its files.

    Example: stillhouse runs show triage-v2-20261202-101500
    """
    from stillhouse.commands import run_runs_show

    info = run_runs_show(settings(), run)
    print_json(info) if as_json else show_run(info, err)


@runs_app.command("compare")
def runs_compare(
    a: Annotated[str, typer.Argument(help="the first run")],
    b: Annotated[str, typer.Argument(help="the second run")],
    as_json: JsonOpt = False,
) -> None:
    """Two finished runs slice by slice: the student's figure in each with its interval, and
    the difference (B minus A), beside their headline figures, flags and latency.

    Example: stillhouse runs compare triage-v2-20261202-101500 triage-v2-20261202-113000
    """
    from stillhouse.commands import run_runs_compare

    compared = run_runs_compare(settings(), a, b)
    print_json(compared) if as_json else show_runs_compare(compared, err)


@runs_app.command("exec", hidden=True)
def runs_exec(run_id: Annotated[int, typer.Argument(help="the queued run's id")]) -> None:
    """Train one queued run in this process (what a train worker starts for each job).

    Example: stillhouse runs exec 7
    """
    from stillhouse.commands import run_runs_exec

    print_json(run_runs_exec(settings(), run_id))


@app.command()
def advise(
    spec: Annotated[str, typer.Option("--spec", "-s", help="spec file or bundled name")],
    volume: Annotated[
        str, typer.Option(metavar="N/day", help="inputs a day the task must answer, e.g. 2000/day")
    ],
    build_hours: Annotated[float, typer.Option(help="engineering hours to ship a student")] = 40.0,
    upkeep_hours: Annotated[
        float, typer.Option(help="engineering hours a month to keep it (retrain, watch)")
    ] = 8.0,
    hourly_rate: Annotated[float, typer.Option(help="USD an engineering hour")] = 100.0,
    hosting: Annotated[float, typer.Option(help="USD a month to host the router")] = 60.0,
    amortize_months: Annotated[float, typer.Option(help="months the build is spread over")] = 12.0,
    max_quality_loss: Annotated[
        float, typer.Option(help="points below the teacher the routed answers may be")
    ] = 1.0,
    teacher_usd: Annotated[
        float | None,
        typer.Option(help="USD a teacher call, instead of the ledger's (a what-if)"),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Distill, or keep calling the teacher? Monthly costs at a volume, break-even, quality.

    Measured: the teacher's cost per item and latency (the ledger), the labels' classes, the
    share of items with a known-good record or a review, and the latest run's accuracy and
    fallback share (its router). Stated (defaults shown): build and upkeep hours, their
    rate, hosting. The answer is distill, do_nothing (keep calling the teacher) or not_yet
    (with what is missing).

    Example: stillhouse advise --spec triage --volume 2000000/day
    """
    from stillhouse.commands import run_advise
    from workers.advice import Stated

    result = run_advise(
        settings(),
        spec,
        _per_day(volume),
        Stated(
            build_hours=build_hours,
            upkeep_hours_per_month=upkeep_hours,
            hourly_rate_usd=hourly_rate,
            hosting_usd_per_month=hosting,
            amortize_months=amortize_months,
            max_quality_loss_points=max_quality_loss,
        ),
        teacher_usd_per_item=teacher_usd,
    )
    if as_json:
        print_json(result)
    else:
        show_advice(result, err)


def _per_day(volume: str) -> float:
    """``2000/day``, ``2,000,000/day`` or a bare number: inputs a day."""
    from schemas.errors import ConfigError

    text = volume.strip().lower().replace(",", "").replace("_", "")
    text = text.removesuffix("/day").removesuffix("/d").strip()
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"--volume {volume!r}: give inputs a day, e.g. 2000/day") from None
    if not value > 0:
        raise ConfigError(f"--volume {volume!r}: must be more than 0 a day")
    return value
