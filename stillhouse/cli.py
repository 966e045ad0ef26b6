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
from stillhouse.render import plain
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
    spec: SpecOpt,
    source: Annotated[
        str | None,
        typer.Argument(
            help="a .jsonl, .csv or .parquet file, or 'bbc' (bundled); none: label what is "
            "pending (requeued items, say)"
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="load at most this many rows")] = None,
    wait: Annotated[bool, typer.Option(help="distributed mode: wait until labeled")] = True,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="only estimate calls, tokens, cost and time")
    ] = False,
    load_only: Annotated[
        bool,
        typer.Option(
            "--load-only",
            help="load (or resume loading) and stop: no labeling, no queueing. "
            "Example: stillhouse backfill tickets.jsonl --spec triage --load-only",
        ),
    ] = False,
    rejects: Annotated[
        Path | None,
        typer.Option(
            help="where bad rows go, one JSON line each (default "
            ".stillhouse/rejects/SPEC-TIME.jsonl, made only when a row is bad). "
            "Example: --rejects bad-rows.jsonl",
        ),
    ] = None,
    max_doc_bytes: Annotated[
        int,
        typer.Option(
            min=1,
            help="a row whose JSON is larger is a bad row. Example: --max-doc-bytes 200000",
        ),
    ] = 1 << 20,
    from_sql: Annotated[
        str | None,
        typer.Option(
            help="read the rows of this SQL query instead of a file (streamed). "
            "Example: --from-sql 'SELECT id, headline, body FROM tickets'",
        ),
    ] = None,
    sql_url: Annotated[
        str | None,
        typer.Option(
            help="SQLAlchemy URL the --from-sql query runs on (default: the store). "
            "Example: --sql-url sqlite:///legacy.db",
        ),
    ] = None,
    keep_duplicate_content: Annotated[
        bool,
        typer.Option(
            "--keep-duplicate-content",
            help="store a new id even when its text is already stored under another id. "
            "Example: stillhouse backfill t.jsonl --spec triage --keep-duplicate-content",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Load a source into the store and label it with the spec's teacher.

    Streams JSONL, CSV, Parquet or a SQL query (--from-sql) in chunks, in bounded memory;
    an interrupted load resumes when run again. Bad rows go to the rejects file while the
    good rows load. Embedded (no STILLHOUSE_BROKER_URL): labels in-process. Distributed:
    enqueues id batches for `stillhouse worker` processes and, with --wait, follows them.

    Example: stillhouse backfill bbc --spec triage --limit 200

    Example: stillhouse backfill --from-sql 'SELECT * FROM tickets' --sql-url
    sqlite:///legacy.db --spec triage --load-only --rejects bad.jsonl
    """
    from stillhouse.commands import BackfillOptions, run_backfill, run_estimate

    if dry_run:
        if source is None:
            raise ConfigError("--dry-run estimates a SOURCE file or built-in source")
        run_estimate(
            Settings(), source, spec, limit=limit, sample=200, as_json=as_json, console=err
        )
        return
    options = BackfillOptions(
        from_sql=from_sql,
        sql_url=sql_url,
        rejects=rejects,
        max_doc_bytes=max_doc_bytes,
        keep_duplicate_content=keep_duplicate_content,
        load_only=load_only,
    )
    result = run_backfill(
        Settings(), source, spec, limit=limit, wait=wait, console=err, options=options
    )
    if as_json:
        _print_json(result)
    if result.get("waiting") or result.get("failed"):
        raise typer.Exit(3)  # labeling did not finish: the summary said why and what next
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
def requeue(
    spec: SpecOpt,
    failed: Annotated[
        bool, typer.Option("--failed/--no-failed", help="items that used their attempts")
    ] = True,
    rejected: Annotated[
        bool,
        typer.Option(help="items rejected under an earlier version, to relabel under this one"),
    ] = False,
    error: Annotated[
        str | None,
        typer.Option(metavar="TEXT", help="only failed items whose last error holds TEXT"),
    ] = None,
    item: Annotated[
        list[str] | None, typer.Option("--id", help="only this external id (repeatable)")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Put failed items (and rejected ones, for a new spec version) back to pending.

    A failed item used its attempts (labeling.max_attempts): say, the teacher was down. Its
    attempts start again. Waits never fail an item; they stay pending by themselves.

    Example: stillhouse requeue --spec triage --error "cannot connect"

    Example: stillhouse requeue --spec triage_v2.yaml --no-failed --rejected
    """
    from stillhouse.commands import run_requeue

    result = run_requeue(
        Settings(),
        spec,
        failed=failed,
        rejected=rejected,
        error_contains=error,
        external_ids=item,
        console=err,
    )
    if as_json:
        _print_json(result)


@app.command()
def worker(
    concurrency: Annotated[
        int | None, typer.Option(help="batches in work at once (threads, or prefork processes)")
    ] = None,
    pool: Annotated[str, typer.Option(help="threads, prefork or solo")] = "threads",
    loglevel: Annotated[str, typer.Option(help="Celery log level")] = "INFO",
    beat: Annotated[
        bool, typer.Option("--beat", help="also run the dispatcher and sweeper (one per site)")
    ] = False,
) -> None:
    """Run a Celery label worker (needs STILLHOUSE_BROKER_URL and a Postgres URL).

    The default threads pool runs several batches in one process over one event loop and
    connection pool, so one batch's teacher calls overlap another's database work; run one
    worker process per core. Refuses to start with a pickle serializer, a Redis that evicts
    keys, or a visibility timeout shorter than the task time limit. SIGTERM is graceful: the
    batches in work finish first.

    Example: STILLHOUSE_BROKER_URL=redis://127.0.0.1:6379/0 stillhouse worker --concurrency 2 --beat
    """
    from stillhouse.distributed import run_worker

    run_worker(Settings(), concurrency=concurrency, pool=pool, loglevel=loglevel, beat=beat)


@app.command()
def dispatch(
    once: Annotated[bool, typer.Option("--once", help="one pass, then exit")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Queue ready items for workers and sweep: expired leases, lost messages, max attempts.

    Runs every STILLHOUSE_DISPATCH_INTERVAL_S until stopped; several may run at once
    (claims use FOR UPDATE SKIP LOCKED). `stillhouse worker --beat` starts one for you.

    Example: stillhouse dispatch --once --json
    """
    import logging

    from stillhouse.distributed import run_dispatch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # its schema check says nothing new
    done = run_dispatch(Settings(), once=once)
    if done is not None and as_json:
        _print_json(
            {
                "sent": done.sent,
                "batches": done.batches,
                "unsent": done.unsent,
                "leases_expired": done.sweep.expired,
                "failed": done.sweep.failed,
                "requeued": done.sweep.requeued,
            }
        )


@app.command()
def serve(
    spec: Annotated[
        list[str],
        typer.Option(
            "--spec", "-s", metavar="SPEC", help="spec file or bundled name to accept (repeatable)"
        ),
    ],
    host: Annotated[str, typer.Option(help="bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8080,
    workers: Annotated[int, typer.Option(min=1, help="uvicorn worker processes")] = 1,
    insecure_no_auth: Annotated[
        bool,
        typer.Option("--insecure-no-auth", help="accept requests without a token (loopback only)"),
    ] = False,
) -> None:
    """Serve the ingest API: POST /v1/items stores live samples as pending items.

    Tokens come from STILLHOUSE_API_TOKENS (comma-separated). Labeling is done by
    `stillhouse worker` processes; GET /healthz and GET /metrics are open.

    Example: STILLHOUSE_API_TOKENS=s3cret stillhouse serve --spec triage --port 8080
    """
    from stillhouse.api_server import serve as serve_api

    serve_api(
        Settings(),
        spec,
        host=host,
        port=port,
        workers=workers,
        insecure_no_auth=insecure_no_auth,
    )


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
    max_concurrency: Annotated[
        int | None, typer.Option(min=1, help="requests in flight; more get 429")
    ] = None,
    rpm: Annotated[
        int | None, typer.Option(min=1, help="requests per minute; more get 429")
    ] = None,
    tpm: Annotated[int | None, typer.Option(min=1, help="tokens per minute; more get 429")] = None,
    limit_window_s: Annotated[
        float, typer.Option(min=0.01, help="--rpm/--tpm buckets hold this many seconds' worth")
    ] = 1.0,
    retry_after_s: Annotated[
        float, typer.Option(min=0, help="Retry-After of a 429 over --max-concurrency")
    ] = 1.0,
    request_log: Annotated[
        Path | None,
        typer.Option(metavar="PATH", help="append every request to this JSON-lines file"),
    ] = None,
) -> None:
    """Serve an OpenAI-compatible /v1/chat/completions backed by a real local model.

    Fault kinds: rate_limit, server_error, reset, hang, slow_drip, malformed, truncated,
    refusal, wrong; the X-Stillhouse-Fault header forces one on a single request. Limits
    (--max-concurrency, --rpm, --tpm) are enforced as hosted providers do: 429 with
    Retry-After and x-ratelimit-* headers.

    Example: stillhouse teacher serve --backend fixed --max-concurrency 32 --rpm 6000
    """
    import os

    from stillhouse.teacher_server import serve
    from stillhouse.teacher_server.limits import LimitsConfig

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
        limits=LimitsConfig(max_concurrency, rpm, tpm, limit_window_s, retry_after_s),
        request_log=request_log,
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
            # The primary first, then the jury that votes with it.
            "teachers": [
                {"provider": t.provider, "model": t.model, "base_url": t.base_url}
                for t in loaded.teachers
            ],
            "jury_min_agreement": loaded.jury.min_agreement if loaded.jury.teachers else None,
            "output_schema": loaded.output_schema,
        }
    )


@spec_app.command("reference")
def spec_reference() -> None:
    """Print the spec reference (every field, its type, default and meaning) as Markdown.

    It is generated from schemas/spec.schema.json; docs/spec-reference.md holds a copy.

    Example: stillhouse spec reference > spec-reference.md
    """
    from schemas.reference import render_reference

    sys.stdout.write(render_reference())


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
    spec: SpecOpt,
    accept: Annotated[bool, typer.Option("--accept/--reject", help="the teacher was right")],
    items: Annotated[
        list[str] | None, typer.Argument(help="external ids to decide (or use the filters)")
    ] = None,
    every: Annotated[
        bool, typer.Option("--all", help="every waiting label (with the filters: every match)")
    ] = False,
    label: Annotated[str | None, typer.Option(help="only labels the teacher gave this")] = None,
    reason: Annotated[
        str | None, typer.Option(metavar="TEXT", help="only labels with a reason holding TEXT")
    ] = None,
    min_confidence: Annotated[float | None, typer.Option(help="only at least this")] = None,
    max_confidence: Annotated[float | None, typer.Option(help="only at most this")] = None,
    note: Annotated[str | None, typer.Option(help="why, kept with each label")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="say which, decide nothing")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Decide waiting labels: --accept (the teacher was right, the record wrong) or --reject.

    Give the items' ids, or filters (--label, --reason, --min/--max-confidence) or --all for
    a bulk decision; --dry-run lists what a decision would cover.

    Example: stillhouse review resolve bbc/tech/042 --spec triage --accept --note "record wrong"

    Example: stillhouse review resolve --spec triage --reject --label sport --max-confidence 0.5
    """
    from stillhouse.commands import run_review_resolve
    from storage.review import ReviewFilter

    which = ReviewFilter(label, reason, min_confidence, max_confidence)
    filtered = any(v is not None for v in (label, reason, min_confidence, max_confidence))
    if items and (filtered or every):
        raise ConfigError("give item ids or filters (--all, --label, …), not both")
    if not items and not (filtered or every):
        raise ConfigError(
            "say which labels: item ids, a filter (--label, --reason, --min-confidence, "
            "--max-confidence), or --all"
        )
    result = run_review_resolve(
        Settings(),
        spec,
        items or [],
        accept=accept,
        note=note,
        which=which,
        dry_run=dry_run,
        console=err,
    )
    if as_json:
        _print_json(result)


def main() -> None:
    """Entry point: known errors become one clear message and exit code 2."""
    try:
        app()
    except StillhouseError as exc:
        err.print(f"error: {plain(exc)}", style="bold red", markup=False, highlight=False)
        sys.exit(2)
