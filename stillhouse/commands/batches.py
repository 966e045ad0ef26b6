"""`stillhouse batches`: list provider batches, follow them (`poll`), cancel one; and the
batch half of `backfill --mode batch`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from schemas.errors import ConfigError
from stillhouse.context import open_database, runtime_on
from stillhouse.settings import Settings
from storage.batches import list_batches
from storage.models import FINAL_STATES, Item, SpecRow, TeacherBatch
from workers.batches import BatchRunner, TickSummary, wait_until_done
from workers.pipeline import LabelRuntime
from workers.spec import Spec, parse_spec

__all__ = [
    "label_in_batches",
    "run_batches_cancel",
    "run_batches_forever",
    "run_batches_list",
    "run_batches_poll",
]


@contextmanager
def _runner(
    settings: Settings, sessions: sessionmaker[Session], spec_id: int, spec: Spec
) -> Iterator[BatchRunner]:
    runtime: LabelRuntime = runtime_on(sessions, settings)
    runner = BatchRunner(
        sessions,
        spec_id,
        spec,
        teacher_base_url=settings.teacher_base_url,
        label=lambda ids: runtime.label_batch(spec_id, item_ids=ids),
    )
    try:
        yield runner
    finally:
        runner.close()
        runtime.close()


def _summary(total: TickSummary) -> dict[str, Any]:
    return {
        "batches_submitted": total.submitted_batches,
        "requests_submitted": total.submitted_requests,
        "joined_open_batches": total.joined_open,
        "answered_from_cache": total.cached,
        "results_received": total.received,
        "unknown_results": total.unknown_results,
        "labeled": total.labeled,
        "labeled_live": total.live_labeled,
        "failed": total.failed_items,
        "open_batches": total.open_batches,
        "budget_error": total.budget_error,
        "errors": total.errors[-5:],
    }


def label_in_batches(
    settings: Settings,
    sessions: sessionmaker[Session],
    spec: Spec,
    spec_id: int,
    *,
    wait: bool,
    console: Console,
) -> dict[str, Any]:
    """Submit the spec's pending items as provider batches; with ``wait``, follow them to
    their end and label what they answered (what `backfill --mode batch` does)."""
    started = time.monotonic()
    with _runner(settings, sessions, spec_id, spec) as runner:
        if not wait:
            total = runner.submit(include_cancelled=True)
            total.open_batches = len(runner.open_batch_ids())
        else:

            def report(tick: TickSummary) -> None:
                if tick.submitted_batches or tick.received or tick.labeled:
                    console.print(
                        f"batches: {tick.submitted_batches} submitted "
                        f"({tick.submitted_requests} requests), {tick.received} results in, "
                        f"{tick.labeled} labeled, {tick.open_batches} open"
                    )

            total = wait_until_done(runner, on_tick=report)
    out = {
        "mode": "batch",
        **_summary(total),
        "batch_seconds": round(time.monotonic() - started, 2),
    }
    if wait:
        with sessions() as session:
            waiting = session.scalar(
                select(func.count()).where(Item.spec_id == spec_id, Item.state.not_in(FINAL_STATES))
            )
        # What `backfill` prints for live labeling, in the same keys.
        out.update(
            teacher_calls=total.received + total.live_labeled,
            cache_hits=total.cached,
            waiting=int(waiting or 0),
        )
    return out


def _spec_rows(session: Session, spec_name: str | None) -> list[SpecRow]:
    stmt = select(SpecRow).where(SpecRow.labeling_mode == "batch")
    if spec_name is not None:
        stmt = select(SpecRow).where(SpecRow.name == spec_name)
    rows = list(session.scalars(stmt.order_by(SpecRow.id)))
    open_ids = set(session.scalars(select(TeacherBatch.spec_id).where(TeacherBatch.step != "done")))
    return [r for r in rows if r.labeling_mode == "batch" or r.id in open_ids]


def run_batches_poll(
    settings: Settings, *, spec_name: str | None, once: bool, console: Console
) -> dict[str, Any]:
    """Follow every open batch (of one spec, or of every spec in batch mode), label what came
    back and submit what is pending; once, or until nothing is open."""
    results: dict[str, Any] = {}
    with open_database(settings) as sessions:
        with sessions() as session:
            rows = [(r.id, r.name, r.version, r.body) for r in _spec_rows(session, spec_name)]
        if spec_name is not None and not rows:
            raise ConfigError(
                f"spec {spec_name!r} has no batches and is not in batch mode: run "
                f"`stillhouse backfill SOURCE --spec {spec_name} --mode batch` first"
            )
        for spec_id, name, version, body in rows:
            spec = parse_spec(body, source=f"spec {name} v{version}")
            with _runner(settings, sessions, spec_id, spec) as runner:
                total = runner.tick() if once else wait_until_done(runner)
            results[f"{name} v{version}"] = _summary(total)
            console.print(
                f"{name} v{version}: {total.received} results in, {total.labeled} labeled "
                f"({total.live_labeled} live), {total.submitted_batches} batches submitted, "
                f"{total.open_batches} open"
            )
    return {"specs": results}


def run_batches_forever(settings: Settings, *, spec_name: str | None) -> None:
    """Poll every spec in batch mode, one pass each ``STILLHOUSE_BATCH_POLL_S`` (default 10
    s) until SIGTERM or SIGINT; an outage is logged and tried again."""
    import logging
    import os
    import signal
    import threading

    log = logging.getLogger(__name__)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    every = float(os.environ.get("STILLHOUSE_BATCH_POLL_S") or 10.0)
    quiet = Console(stderr=True, quiet=True)
    while not stop.is_set():
        try:
            run_batches_poll(settings, spec_name=spec_name, once=True, console=quiet)
        except ConfigError as exc:
            if spec_name is not None:
                raise
            log.warning("batch poller: %s", exc)
        except Exception as exc:  # the database or the provider is away: the next pass
            log.warning("batch poller pass failed: %s", exc)
        stop.wait(every)


def run_batches_list(
    settings: Settings, *, spec_name: str | None, limit: int
) -> list[dict[str, Any]]:
    with open_database(settings) as sessions, sessions() as session:
        return list_batches(session, spec_name=spec_name, limit=limit)


def run_batches_cancel(settings: Settings, batch_id: int) -> dict[str, Any]:
    with open_database(settings) as sessions:
        with sessions() as session:
            batch = session.get(TeacherBatch, batch_id)
            if batch is None:
                raise ConfigError(f"no batch {batch_id}: `stillhouse batches` lists them")
            row = session.get(SpecRow, batch.spec_id)
            assert row is not None
            spec = parse_spec(row.body, source=f"spec {row.name} v{row.version}")
            spec_id = row.id
        with _runner(settings, sessions, spec_id, spec) as runner:
            return runner.cancel(batch_id)
