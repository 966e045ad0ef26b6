"""Load, label and inspect: backfill, batches, estimate, requeue, status, report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from schemas.errors import ConfigError
from stillhouse.cli.root import JsonOpt, SpecOpt, app, batches_app, err, settings
from stillhouse.output import (
    print_json,
    show_backfill,
    show_batches,
    show_calibration,
    show_estimate,
    show_report,
    show_requeue,
    show_status,
)

__all__ = [
    "backfill",
    "batches_cancel",
    "batches_list",
    "batches_poll",
    "calibrate",
    "estimate",
    "report",
    "requeue",
    "status",
]


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
    mode: Annotated[
        str | None,
        typer.Option(
            help="live: call the teacher now; batch: the provider's batch API at its batch "
            "price (labeling.mode in the spec; the default is the spec's). With --no-wait, "
            "submit and return (`stillhouse batches poll` follows). "
            "Example: stillhouse backfill bbc --spec triage --mode batch",
        ),
    ] = None,
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
        estimated = run_estimate(settings(), source, spec, limit=limit, sample=200)
        if as_json:
            print_json(estimated)
        else:
            show_estimate(estimated, err)
        return
    options = BackfillOptions(
        from_sql=from_sql,
        sql_url=sql_url,
        rejects=rejects,
        max_doc_bytes=max_doc_bytes,
        keep_duplicate_content=keep_duplicate_content,
        load_only=load_only,
        mode=mode,
    )
    result = run_backfill(
        settings(), source, spec, limit=limit, wait=wait, console=err, options=options
    )
    show_backfill(result, err)  # on stderr, with --json too: what the load and labeling did
    if as_json:
        print_json(result)
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

    result = run_estimate(settings(), source, spec, limit=limit, sample=sample)
    if as_json:
        print_json(result)
    else:
        show_estimate(result, err)


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
        settings(),
        spec,
        failed=failed,
        rejected=rejected,
        error_contains=error,
        external_ids=item,
    )
    show_requeue(result, err)
    if as_json:
        print_json(result)


@app.command()
def status(
    spec: Annotated[str | None, typer.Option("--spec", "-s", help="spec name")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Counts by state and verdict, teacher spend, and labeling rate.

    Example: stillhouse status --spec triage --json
    """
    from stillhouse.commands import run_status

    result = run_status(settings(), spec)
    if as_json:
        print_json(result)
    else:
        show_status(result, err)


@app.command()
def report(spec: SpecOpt, as_json: JsonOpt = False) -> None:
    """What the checks accepted and rejected, by slice and class, against known-good records.

    Also measures the filter without known-good records, on the withheld share of items.

    Example: stillhouse report --spec triage --json
    """
    from stillhouse.commands import run_report

    result = run_report(settings(), spec)
    if as_json:
        print_json(result)
    else:
        show_report(result, err)


@app.command()
def calibrate(
    spec: SpecOpt,
    target: Annotated[
        float | None,
        typer.Option(help="an accuracy to reach, e.g. 0.97: the threshold it needs"),
    ] = None,
    points: Annotated[int, typer.Option(help="points of the curve to print")] = 10,
    png: Annotated[Path | None, typer.Option(help="also draw the curve into this PNG")] = None,
    as_json: JsonOpt = False,
) -> None:
    """How far the teacher's confidence can be trusted: coverage against accuracy on the
    labels whose known-good record the checks saw.

    With --target, the lowest confidence whose labels reach it at the 95 % lower bound, and,
    on the withheld share (records the checks never saw), the accuracy that threshold is
    estimated to give next to the one measured.

    Example: stillhouse calibrate --spec triage --target 0.97 --png triage-curve.png
    """
    from stillhouse.commands.calibrate import run_calibrate

    result = run_calibrate(settings(), spec, target=target, points=points, png=png)
    if as_json:
        print_json(result)
    else:
        show_calibration(result, err)


@batches_app.callback(invoke_without_command=True)
def batches_list(
    ctx: typer.Context,
    spec: Annotated[str | None, typer.Option(help="only this spec's batches")] = None,
    limit: Annotated[int, typer.Option(min=1, help="the newest this many")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """Provider batches (backfill --mode batch): step, provider status and progress.

    Example: stillhouse batches --spec triage
    """
    if ctx.invoked_subcommand is not None:
        return
    from stillhouse.commands.batches import run_batches_list

    rows = run_batches_list(settings(), spec_name=spec, limit=limit)
    if as_json:
        print_json(rows)
        return
    show_batches(rows, err)


@batches_app.command("poll")
def batches_poll(
    spec: Annotated[
        str | None, typer.Option(help="one spec (default: every spec in batch mode)")
    ] = None,
    once: Annotated[bool, typer.Option("--once", help="one pass, then return")] = False,
    forever: Annotated[
        bool,
        typer.Option(
            "--forever",
            help="keep polling every spec in batch mode until stopped (what `worker --beat` "
            "runs); survives database and provider outages",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Follow open batches to their end, label what they answered, resubmit what failed.

    Embedded mode's poller (a fleet runs it under `stillhouse worker --beat`). Safe to stop
    and run again at any point: it resumes from what the database recorded.

    Example: stillhouse batches poll --spec triage
    """
    from stillhouse.commands.batches import run_batches_poll

    if forever:
        from stillhouse.commands.batches import run_batches_forever

        run_batches_forever(settings(), spec_name=spec)
        return
    result = run_batches_poll(settings(), spec_name=spec, once=once, console=err)
    if as_json:
        print_json(result)


@batches_app.command("cancel")
def batches_cancel(
    batch_id: Annotated[int, typer.Argument(help="the batch's id in `stillhouse batches`")],
    as_json: JsonOpt = False,
) -> None:
    """Cancel a batch: what it answered is kept, the rest goes back to pending (and out again
    with the next `backfill`).

    Example: stillhouse batches cancel 3
    """
    from stillhouse.commands.batches import run_batches_cancel

    result = run_batches_cancel(settings(), batch_id)
    if as_json:
        print_json(result)
    else:
        err.print(f"batch {result['id']}: {result['status']}")
