"""`stillhouse backfill`: load a source (file, bundled corpus, SQL query) and label it,
embedded or through the fleet."""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from schemas.errors import BudgetExhausted, ConfigError, SpecError
from stillhouse.commands.batches import label_in_batches
from stillhouse.commands.common import stored_spec_id
from stillhouse.context import open_database, open_runtime
from stillhouse.output import plain, progress_bar
from stillhouse.settings import Settings
from storage.items import last_error, pending_item_ids
from storage.models import FINAL_STATES, Item
from storage.stats import label_stats, status
from workers.batches import set_labeling_mode
from workers.ingest import (
    DEFAULT_MAX_DOC_BYTES,
    FIELD_CHECK_ROWS,
    IngestSummary,
    RejectsFile,
    SourceRow,
    check_fields,
    load_source,
    position_name,
    read_source,
    read_sql,
    unmatched_known_good,
)
from workers.pipeline import BatchSummary, label_until_done
from workers.spec import Spec, load_spec

__all__ = ["BackfillOptions", "run_backfill"]


@dataclass(frozen=True, slots=True)
class BackfillOptions:
    """How `backfill` reads and loads, beyond the source and the spec."""

    from_sql: str | None = None  # a query to read instead of a file
    sql_url: str | None = None  # where the query runs (default: the store itself)
    rejects: Path | None = None  # default: .stillhouse/rejects/<spec>-<time>.jsonl
    max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES
    keep_duplicate_content: bool = False
    load_only: bool = False
    mode: str | None = None  # live or batch; None: the spec's labeling.mode


def run_backfill(
    settings: Settings,
    source: str | None,
    spec_ref: str,
    *,
    limit: int | None,
    wait: bool,
    console: Console,
    options: BackfillOptions | None = None,
) -> dict[str, Any]:
    """Load, then label (embedded) or dispatch (distributed); returns a summary
    (``stillhouse.output.show_backfill`` prints it). Progress goes to ``console``."""
    options = options or BackfillOptions()
    spec = _with_mode(load_spec(spec_ref), options.mode)
    rows, position = _open_source(settings, source, limit, options)
    # A field the spec reads and no row has (a typo) is refused before anything is written.
    head = list(itertools.islice(rows, FIELD_CHECK_ROWS))
    field_warnings = check_fields(spec, head, source or "the query")
    rows = itertools.chain(head, rows)
    with open_database(settings) as sessions:
        started = time.monotonic()
        rejects = RejectsFile(
            options.rejects or _rejects_path(settings, spec.name), position=position
        )
        with rejects:
            ingest = _ingest(sessions, spec, rows, limit, console, options, rejects)
        loaded = {
            "spec": spec.name,
            "version": spec.version,
            "rows": ingest.rows,
            "inserted": ingest.counts.inserted,
            "already_loaded": ingest.counts.existing,
            "duplicate_content": ingest.counts.duplicate_content,
            "changed_documents": ingest.counts.changed,
            "bad_rows": ingest.bad_count,
            "rejects": str(rejects.path) if rejects.count else None,
            "load_seconds": round(time.monotonic() - started, 2),
            "warnings": field_warnings + unmatched_known_good(spec, ingest.known_good_values),
            "bad_examples": [{"line": b.line, "reason": b.reason} for b in ingest.bad[:20]],
            "changed_examples": ingest.counts.changed_ids[:3],
        }
        if options.load_only:
            return loaded
        spec_id = stored_spec_id(sessions, spec)
        with sessions.begin() as session:
            set_labeling_mode(session, spec_id, spec.labeling_mode)
        if spec.labeling_mode == "batch":
            # Embedded or distributed alike: the batches are followed from here with --wait
            # (in-process labeling of what they answered), else by `worker --beat` or
            # `stillhouse batches poll`.
            labeled = label_in_batches(
                settings, sessions, spec, spec_id, wait=wait, console=console
            )
        elif settings.distributed:
            labeled = _label_distributed(settings, sessions, spec, spec_id, wait, console)
        else:
            labeled = _label_embedded(settings, sessions, spec_id, console)
        elapsed = time.monotonic() - started
        with sessions() as session:
            stats = label_stats(session, spec_id)
            error = last_error(session, spec_id)
        result = {
            **loaded,
            **labeled,
            "seconds": round(elapsed, 2),
            "teacher_accuracy": stats.teacher_accuracy,
            "accepted_accuracy": stats.accepted_accuracy,
            "labels": stats.labels,
            "accepted": stats.accepted,
            "accepted_checked": stats.accepted_checked,
            "needs_review": stats.needs_review,
            "last_error": error.message if error else None,
        }
        return result


def _with_mode(spec: Spec, mode: str | None) -> Spec:
    """The spec with ``labeling.mode`` set (an operational setting: same version and hash)."""
    if mode is None:
        return spec
    if mode not in ("live", "batch"):
        raise ConfigError(f"--mode must be live or batch, not {mode!r}")
    if mode == "batch" and spec.teacher.provider not in ("openai", "anthropic"):
        raise ConfigError(f"teacher.provider {spec.teacher.provider!r} has no batch API")
    labeling = {**spec.body.get("labeling", {}), "mode": mode}
    return dataclasses.replace(spec, body={**spec.body, "labeling": labeling})


def _open_source(
    settings: Settings, source: str | None, limit: int | None, options: BackfillOptions
) -> tuple[Iterator[SourceRow], str]:
    # Fails before anything is written: a missing file, a bad type, a failing query.
    if options.from_sql is not None:
        if source is not None:
            raise ConfigError("give either a SOURCE or --from-sql, not both")
        url = options.sql_url or settings.database_url
        return read_sql(options.from_sql, url, limit=limit), "row"
    if options.sql_url is not None:
        raise ConfigError("--sql-url goes with --from-sql QUERY")
    if source is None:
        # No source: nothing to load, label what is pending (requeued items, say).
        return iter(()), "row"
    rows = read_source(source, limit=limit, max_doc_bytes=options.max_doc_bytes)
    return rows, position_name(source)


def _rejects_path(settings: Settings, spec_name: str) -> Path:
    # Next to the store: the SQLite file's folder, else .stillhouse/ in the working directory.
    folder = Path(".stillhouse")
    if settings.is_sqlite:
        database = make_url(settings.database_url).database
        if database and database != ":memory:":
            folder = Path(database).parent
    return folder / "rejects" / f"{spec_name}-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"


def _ingest(
    sessions: sessionmaker[Session],
    spec: Spec,
    rows: Iterator[SourceRow],
    limit: int | None,
    console: Console,
    options: BackfillOptions,
    rejects: RejectsFile,
) -> IngestSummary:
    with progress_bar(console) as progress:
        task = progress.add_task("loading", total=limit)
        summary = load_source(
            sessions,
            spec,
            rows,
            on_chunk=lambda s: progress.update(task, completed=s.rows),
            rejects=rejects,
            max_doc_bytes=options.max_doc_bytes,
            keep_duplicate_content=options.keep_duplicate_content,
        )
        progress.update(task, completed=summary.rows, total=summary.rows)
    return summary


def _label_embedded(
    settings: Settings, sessions: sessionmaker[Session], spec_id: int, console: Console
) -> dict[str, Any]:
    import socket

    from storage.leases import ready_now, reclaim_dead_owners, release_owner

    with sessions.begin() as session:
        # An earlier embedded run on this machine that was killed left its batch leased:
        # the sweeper's rules, now, in-process (there is no sweeper here). Its waits were
        # that run's view of the teacher: this run asks again at once.
        reclaimed = reclaim_dead_owners(
            session,
            spec_id,
            socket.gethostname(),
            _pid_alive,
        )
        ready_now(session, spec_id)
        todo = len(pending_item_ids(session, spec_id))
    if reclaimed:
        console.print(f"took back {reclaimed} items an earlier run left leased when it stopped")
    total = BatchSummary()
    with open_runtime(settings) as runtime, progress_bar(console) as progress:
        task = progress.add_task("labeling", total=todo)

        def advance(batch: BatchSummary) -> None:
            progress.advance(task, batch.labeled + batch.failed)

        try:
            total = label_until_done(runtime, spec_id, on_batch=advance)
        finally:
            # Ctrl-C, a 401, a spent budget: the batch in hand goes back now, its attempt
            # refunded, instead of staying leased for lease_s.
            with sessions.begin() as session:
                release_owner(session, runtime.owner)
    with sessions() as session:
        # Not the releases counted on the way (an item that waited for a calibration and was
        # labeled after it was released once): what is still unlabeled now.
        waiting = session.scalar(
            select(func.count()).where(Item.spec_id == spec_id, Item.state.not_in(FINAL_STATES))
        )
    return {
        "labeled": total.labeled,
        "teacher_calls": total.teacher_calls,
        "cache_hits": total.cache_hits,
        "failed": total.failed,
        "waiting": int(waiting or 0),
    }


def _pid_alive(pid: int) -> bool:
    import os

    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def _label_distributed(
    settings: Settings,
    sessions: sessionmaker[Session],
    spec: Spec,
    spec_id: int,
    wait: bool,
    console: Console,
) -> dict[str, Any]:
    from stillhouse.distributed import spec_dispatcher

    dispatch = spec_dispatcher(settings, sessions, [spec_id])
    batch = spec.labeling["batch_size"]
    sent = dispatch().sent
    console.print(f"queued {sent} items in batches of {batch} for `stillhouse worker`")
    if not wait:
        return {"queued": sent}
    with progress_bar(console) if console.is_terminal else nullcontext() as progress:
        task = progress.add_task("labeling", total=None) if progress else None
        last_done, last_change, pause = -1, time.monotonic(), 0.05
        while True:
            with sessions() as session:
                now = status(session, spec.name)
            busy = sum(now.by_state[s] for s in ("pending", "queued", "leased"))
            if progress is not None and task is not None:
                progress.update(task, completed=now.items - busy, total=now.items)
            if busy == 0:
                break
            if busy == now.by_state["pending"]:
                _stop_if_budget_spent(sessions, spec_id)
                _stop_if_workers_misconfigured(sessions, spec_id)
            if now.items - busy != last_done:
                last_done, last_change = now.items - busy, time.monotonic()
            elif time.monotonic() - last_change > 30:
                _hint_stalled(sessions, spec_id, console)
                last_change = time.monotonic()
            # The same pass `stillhouse dispatch` runs: sweeps, then queues what is ready.
            sent += dispatch().sent
            # Often at first, so a small job is not kept waiting after its last label; every
            # half second once the job has shown it is long.
            time.sleep(pause)
            pause = min(0.5, pause * 1.5)
    return {"queued": sent, "by_state": now.by_state}


def _stop_if_budget_spent(sessions: sessionmaker[Session], spec_id: int) -> None:
    # Workers park items whose calls the budget cannot cover; waiting longer is pointless.
    with sessions() as session:
        error = last_error(session, spec_id)
    if error and error.kind == BudgetExhausted.kind:
        raise BudgetExhausted(error.message.removeprefix(f"{BudgetExhausted.kind}: "))


def _stop_if_workers_misconfigured(sessions: sessionmaker[Session], spec_id: int) -> None:
    # A worker that cannot label (a key variable not set in its environment) says so on the
    # items it held back: the waiting backfill says it too, and stops.
    with sessions() as session:
        error = last_error(session, spec_id)
    if error and error.kind in (ConfigError.kind, SpecError.kind):
        detail = error.message.removeprefix(f"{error.kind}: ")
        raise ConfigError(
            f"the workers cannot label these items: {detail}; fix the workers' environment "
            f"(see the README's distributed stack), they retry the items by themselves"
        )


def _hint_stalled(sessions: sessionmaker[Session], spec_id: int, console: Console) -> None:
    with sessions() as session:
        error = last_error(session, spec_id)
    console.print(
        "no progress for 30 s: is a `stillhouse worker` running on this broker and "
        "database?" + (f" Last item error: {plain(error.message)}" if error else ""),
        markup=False,
        highlight=False,
    )
