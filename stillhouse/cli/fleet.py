"""The distributed stack's processes: worker and dispatch."""

from __future__ import annotations

from typing import Annotated

import typer

from stillhouse.cli.root import JsonOpt, app, settings
from stillhouse.output import print_json

__all__ = ["dispatch", "worker"]


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
    queues: Annotated[
        str,
        typer.Option(
            help="label, train, or both comma-separated: train takes `train --queue` jobs, "
            "each trainer its own process"
        ),
    ] = "label",
) -> None:
    """Run a Celery label worker (needs STILLHOUSE_BROKER_URL and a Postgres URL).

    The default threads pool runs several batches in one process over one event loop and
    connection pool, so one batch's teacher calls overlap another's database work; run one
    worker process per core. Refuses to start with a pickle serializer, a Redis that evicts
    keys, or a visibility timeout shorter than the task time limit. SIGTERM is graceful: the
    batches in work finish first.

    A training worker (`--queues train --concurrency 1`) runs each `stillhouse train --queue`
    job as its own process, its output in the run's train.log.

    Example: STILLHOUSE_BROKER_URL=redis://127.0.0.1:6379/0 stillhouse worker --concurrency 2 --beat
    """
    from stillhouse.distributed import run_worker

    run_worker(
        settings(), concurrency=concurrency, pool=pool, loglevel=loglevel, beat=beat, queues=queues
    )


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
    done = run_dispatch(settings(), once=once)
    if done is not None and as_json:
        print_json(
            {
                "sent": done.sent,
                "batches": done.batches,
                "unsent": done.unsent,
                "leases_expired": done.sweep.expired,
                "failed": done.sweep.failed,
                "requeued": done.sweep.requeued,
            }
        )
