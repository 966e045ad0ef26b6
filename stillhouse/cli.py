"""The `stillhouse` command line: a thin layer over the pipeline.

Data goes to stdout, messages to stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from schemas.errors import ConfigError, StillhouseError
from stillhouse.settings import Settings

__all__ = ["app", "main"]

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    help="stillhouse: teacher labels in, clean training data out.",
)
teacher_app = typer.Typer(no_args_is_help=True, help="Run a local OpenAI-compatible teacher.")
db_app = typer.Typer(no_args_is_help=True, help="Database schema (Alembic migrations).")
spec_app = typer.Typer(no_args_is_help=True, help="Spec files.")
review_app = typer.Typer(no_args_is_help=True, help="Labels waiting for a person's decision.")
app.add_typer(teacher_app, name="teacher")
app.add_typer(db_app, name="db")
app.add_typer(spec_app, name="spec")
app.add_typer(review_app, name="review")

err = Console(stderr=True, soft_wrap=True)

SpecOpt = Annotated[str, typer.Option("--spec", "-s", help="spec file, or a bundled example name")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON on stdout")]


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


@app.command()
def backfill(
    source: Annotated[str, typer.Argument(help="a .jsonl or .csv file, or 'bbc' (bundled)")],
    spec: SpecOpt,
    limit: Annotated[int | None, typer.Option(help="load at most this many rows")] = None,
    wait: Annotated[bool, typer.Option(help="distributed mode: wait until labeled")] = True,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="only estimate calls, tokens, cost and time")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Load a source into the store and label it with the spec's teacher.

    Embedded (no STILLHOUSE_BROKER_URL): labels in-process. Distributed: enqueues id batches
    for `stillhouse worker` processes and, with --wait, follows them to the end.

    Example: stillhouse backfill bbc --spec triage --limit 200
    """
    from stillhouse.commands import run_backfill, run_estimate

    if dry_run:
        run_estimate(
            Settings(), source, spec, limit=limit, sample=200, as_json=as_json, console=err
        )
        return
    result = run_backfill(Settings(), source, spec, limit=limit, wait=wait, console=err)
    if as_json:
        _print_json(result)
    if result.get("bad_rows"):
        raise typer.Exit(1)


@app.command()
def estimate(
    source: Annotated[str, typer.Argument(help="a .jsonl or .csv file, or 'bbc' (bundled)")],
    spec: SpecOpt,
    limit: Annotated[int | None, typer.Option(help="consider at most this many rows")] = None,
    sample: Annotated[int, typer.Option(help="rows rendered and looked up")] = 200,
    as_json: JsonOpt = False,
) -> None:
    """Expected teacher calls, tokens, cost and time for a source, before anything is spent.

    Rows already labeled under this spec version and answers already cached count as free.

    Example: stillhouse estimate bbc --spec triage
    """
    from stillhouse.commands import run_estimate

    run_estimate(Settings(), source, spec, limit=limit, sample=sample, as_json=as_json, console=err)


@app.command()
def report(spec: SpecOpt, as_json: JsonOpt = False) -> None:
    """What the checks accepted and rejected, by slice and class, against known-good records.

    Also measures the filter without known-good records, on the withheld share of items.

    Example: stillhouse report --spec triage --json
    """
    from stillhouse.commands import run_report

    run_report(Settings(), spec, as_json=as_json, console=err)


@app.command()
def status(
    spec: Annotated[str | None, typer.Option("--spec", "-s", help="spec name")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Counts by state and verdict, teacher spend, and labeling rate.

    Example: stillhouse status --spec triage --json
    """
    from stillhouse.commands import run_status

    run_status(Settings(), spec, as_json=as_json, console=err)


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

    report = run_train(Settings(), spec, out=out, epochs=epochs, console=err)
    if as_json:
        _print_json(report)


@app.command()
def worker(
    concurrency: Annotated[int | None, typer.Option(help="worker processes")] = None,
    pool: Annotated[str, typer.Option(help="prefork, threads or solo")] = "prefork",
    loglevel: Annotated[str, typer.Option(help="Celery log level")] = "INFO",
) -> None:
    """Run a Celery label worker (needs STILLHOUSE_BROKER_URL and a Postgres URL).

    Example: STILLHOUSE_BROKER_URL=redis://127.0.0.1:6379/0 stillhouse worker --concurrency 2
    """
    from stillhouse.commands import run_worker

    run_worker(Settings(), concurrency=concurrency, pool=pool, loglevel=loglevel)


@app.command()
def demo(
    limit: Annotated[int | None, typer.Option(help="label only this many BBC articles")] = None,
) -> None:
    """Start the local teacher, label the BBC corpus, train the student, print accuracies.

    Example: stillhouse demo --limit 500
    """
    from stillhouse.commands import run_demo

    run_demo(Settings(), limit=limit, console=err)


@teacher_app.command("serve")
def teacher_serve(
    backend: Annotated[
        str, typer.Option(help="embedding, spacy, moderation, llama or fixed")
    ] = "embedding",
    host: Annotated[str, typer.Option(help="bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8765,
    api_key_env: Annotated[
        str | None, typer.Option(help="require this env var's value as the bearer token")
    ] = None,
    faults: Annotated[
        Path | None, typer.Option(metavar="PROFILE.yaml", help="fault profile to inject")
    ] = None,
    fault: Annotated[
        list[str] | None,
        typer.Option(
            metavar="KIND=SHARE",
            help="share of requests that get fault KIND (repeatable; overrides the profile)",
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="seed of the fault sequence")] = None,
    latency_ms: Annotated[
        float | None,
        typer.Option(help="--backend fixed: answer latency (default 200); others: added latency"),
    ] = None,
    model: Annotated[
        str | None, typer.Option(metavar="PATH", help="GGUF file for --backend llama")
    ] = None,
) -> None:
    """Serve an OpenAI-compatible /v1/chat/completions backed by a real local model.

    Fault kinds: rate_limit, server_error, reset, hang, slow_drip, malformed, truncated,
    refusal, wrong; the X-Stillhouse-Fault header forces one on a single request.

    Example: stillhouse teacher serve --backend fixed --fault rate_limit=0.1 --seed 7
    """
    import os

    from stillhouse.teacher_server import serve

    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise ConfigError(f"--api-key-env names {api_key_env}, which is not set")
    serve(
        host,
        port,
        backend=backend,
        api_key=api_key,
        faults=faults,
        fault=fault or (),
        seed=seed,
        latency_ms=latency_ms,
        model=model,
    )


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply the migrations to STILLHOUSE_DATABASE_URL.

    Example: stillhouse db upgrade
    """
    from storage.migrate import upgrade

    upgrade(Settings().database_url)
    err.print("database is at the latest schema revision")


@spec_app.command("check")
def spec_check(spec: Annotated[str, typer.Argument(help="spec file or bundled name")]) -> None:
    """Validate a spec file and print its normalized summary.

    Example: stillhouse spec check examples/specs/triage.yaml
    """
    from workers.spec import load_spec

    loaded = load_spec(spec)
    _print_json(
        {
            "name": loaded.name,
            "version": loaded.version,
            "kind": loaded.kind,
            "content_hash": loaded.content_hash,
            "labels": loaded.label_names,
            "output_schema": loaded.output_schema,
        }
    )


@review_app.command("list")
def review_list(
    spec: SpecOpt,
    limit: Annotated[int, typer.Option(help="how many")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """Labels that disagree with their known-good record while the teacher was confident.

    Example: stillhouse review list --spec triage
    """
    from stillhouse.commands import run_review_list

    run_review_list(Settings(), spec, limit=limit, as_json=as_json)


@review_app.command("resolve")
def review_resolve(
    item: Annotated[str, typer.Argument(help="the item's external id")],
    spec: SpecOpt,
    accept: Annotated[bool, typer.Option("--accept/--reject", help="the teacher was right")],
    note: Annotated[str | None, typer.Option(help="why, kept with the label")] = None,
) -> None:
    """Decide one waiting label: --accept (the record was wrong) or --reject.

    Example: stillhouse review resolve bbc/tech/042 --spec triage --accept --note "record wrong"
    """
    from stillhouse.commands import run_review_resolve

    run_review_resolve(Settings(), spec, item, accept=accept, note=note, console=err)


def main() -> None:
    """Entry point: known errors become one clear message and exit code 2."""
    try:
        app()
    except StillhouseError as exc:
        err.print(f"error: {exc}", style="bold red", markup=False, highlight=False)
        sys.exit(2)
