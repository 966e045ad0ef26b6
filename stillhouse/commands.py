"""What the CLI commands do, composed from the layers below (the edge owns transactions)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from sqlalchemy import select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from schemas.errors import BudgetExhausted, ConfigError, SpecError
from stillhouse.context import open_database, open_runtime
from stillhouse.render import cell, plain, table_console
from stillhouse.settings import Settings
from storage.items import last_error, pending_item_ids
from storage.models import SpecRow
from storage.stats import label_stats, status
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

__all__ = ["BackfillOptions", "run_backfill", "run_demo", "run_status", "run_train"]


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    )


@dataclass(frozen=True, slots=True)
class BackfillOptions:
    """How `backfill` reads and loads, beyond the source and the spec."""

    from_sql: str | None = None  # a query to read instead of a file
    sql_url: str | None = None  # where the query runs (default: the store itself)
    rejects: Path | None = None  # default: .stillhouse/rejects/<spec>-<time>.jsonl
    max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES
    keep_duplicate_content: bool = False
    load_only: bool = False


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
    """Load, then label (embedded) or dispatch (distributed); returns a summary."""
    options = options or BackfillOptions()
    spec = load_spec(spec_ref)
    rows, position = _open_source(settings, source, limit, options)
    # A field the spec reads and no row has (a typo) is refused before anything is written.
    head = list(itertools.islice(rows, FIELD_CHECK_ROWS))
    field_warnings = check_fields(spec, head, source or "the query")
    rows = itertools.chain(head, rows)
    _, sessions = open_database(settings)
    started = time.monotonic()
    rejects = RejectsFile(options.rejects or _rejects_path(settings, spec.name), position=position)
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
    }
    if options.load_only:
        _report_load(loaded, ingest, console)
        return loaded
    spec_id = _spec_id(sessions, spec)
    if settings.distributed:
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
        "last_error": error,
    }
    _report_backfill(result, ingest, console)
    return result


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
    with _progress(console) as progress:
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


def _spec_id(sessions: sessionmaker[Session], spec: Spec) -> int:
    with sessions() as session:
        spec_id = session.scalar(
            select(SpecRow.id).where(SpecRow.name == spec.name, SpecRow.version == spec.version)
        )
    assert spec_id is not None
    return spec_id


def _label_embedded(
    settings: Settings, sessions: sessionmaker[Session], spec_id: int, console: Console
) -> dict[str, Any]:
    import socket

    from storage.leases import ready_now, reclaim_dead_owners, release_owner
    from workers.spec import LABELING_DEFAULTS

    with sessions.begin() as session:
        # An earlier embedded run on this machine that was killed left its batch leased:
        # the sweeper's rules, now, in-process (there is no sweeper here). Its waits were
        # that run's view of the teacher: this run asks again at once.
        reclaimed = reclaim_dead_owners(
            session,
            spec_id,
            socket.gethostname(),
            _pid_alive,
            default_max_attempts=LABELING_DEFAULTS["max_attempts"],
        )
        ready_now(session, spec_id)
        todo = len(pending_item_ids(session, spec_id))
    if reclaimed:
        console.print(f"took back {reclaimed} items an earlier run left leased when it stopped")
    total = BatchSummary()
    with open_runtime(settings) as runtime, _progress(console) as progress:
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
    return {
        "labeled": total.labeled,
        "teacher_calls": total.teacher_calls,
        "cache_hits": total.cache_hits,
        "failed": total.failed,
        "waiting": total.released,
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
    with _progress(console) if console.is_terminal else nullcontext() as progress:
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
    if error and error.startswith(f"{BudgetExhausted.kind}: "):
        raise BudgetExhausted(error.removeprefix(f"{BudgetExhausted.kind}: "))


def _stop_if_workers_misconfigured(sessions: sessionmaker[Session], spec_id: int) -> None:
    # A worker that cannot label (a key variable not set in its environment) says so on the
    # items it held back: the waiting backfill says it too, and stops.
    with sessions() as session:
        error = last_error(session, spec_id)
    for kind in (ConfigError.kind, SpecError.kind):
        if error and error.startswith(f"{kind}: "):
            raise ConfigError(
                f"the workers cannot label these items: {error.removeprefix(f'{kind}: ')}; "
                f"fix the workers' environment (see the README's distributed stack), they "
                f"retry the items by themselves"
            )


def _hint_stalled(sessions: sessionmaker[Session], spec_id: int, console: Console) -> None:
    with sessions() as session:
        error = last_error(session, spec_id)
    console.print(
        "no progress for 30 s: is a `stillhouse worker` running on this broker and "
        "database?" + (f" Last item error: {plain(error)}" if error else ""),
        markup=False,
        highlight=False,
    )


def _report_load(result: dict[str, Any], ingest: IngestSummary, console: Console) -> None:
    seconds = max(result["load_seconds"], 0.01)
    console.print(
        f"loaded {result['rows']} rows in {seconds:.1f} s ({result['rows'] / seconds:,.0f}/s): "
        f"{result['inserted']} new, {result['already_loaded']} already loaded, "
        f"{result['duplicate_content']} duplicate content, {result['bad_rows']} bad"
    )
    for bad in ingest.bad[:20]:
        console.print(f"  line {bad.line}: {plain(bad.reason)}", markup=False, highlight=False)
    if ingest.bad_count > 20:
        console.print(f"  … and {ingest.bad_count - 20} more bad rows")
    if result["rejects"]:
        console.print(
            f"bad rows written to {plain(result['rejects'])}", markup=False, highlight=False
        )
    for warning in result["warnings"]:
        console.print(f"warning: {plain(warning)}", style="bold yellow", markup=False)
    if ingest.counts.changed:
        examples = ", ".join(plain(i, one_line=True) for i in ingest.counts.changed_ids[:3])
        console.print(
            f"{ingest.counts.changed} documents changed under an existing id and were "
            f"kept as first loaded (e.g. {examples})",
            markup=False,
            highlight=False,
        )


def _report_backfill(result: dict[str, Any], ingest: IngestSummary, console: Console) -> None:
    _report_load(result, ingest, console)
    if "labeled" in result:
        console.print(
            f"labeled {result['labeled']} items: {result['teacher_calls']} teacher "
            f"calls, {result['cache_hits']} cache hits, {result['failed']} failed, "
            f"{result['waiting']} waiting to retry"
        )
    if result.get("failed") or result.get("waiting"):
        console.print(
            f"last item error: {plain(result['last_error'])}", markup=False, highlight=False
        )
        console.print(
            f"not finished: {result.get('waiting', 0)} items wait to retry (they stay pending "
            f"and keep their attempts: run the same command again once the teacher answers), "
            f"{result.get('failed', 0)} failed (`stillhouse requeue --spec SPEC` puts failed "
            f"items back)",
            markup=False,
            highlight=False,
        )
    unchecked = result["accepted"] - result["accepted_checked"]
    console.print(
        f"teacher accuracy vs known-good: {_pct(result['teacher_accuracy'])}; "
        f"accepted labels: {result['accepted']} of {result['labels']}: "
        f"{result['accepted_checked']} checked against a known-good record "
        f"({_pct(result['accepted_accuracy'])} agree)"
        + (
            f", {unchecked} without one (withheld or none: accuracy unknown, see "
            f"`stillhouse report`)"
            if unchecked
            else ""
        )
        + (
            f"; {result['needs_review']} waiting for review (`stillhouse review list`)"
            if result["needs_review"]
            else ""
        )
    )


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def run_estimate(
    settings: Settings,
    source: str,
    spec_ref: str,
    *,
    limit: int | None,
    sample: int,
    as_json: bool,
    console: Console,
) -> dict[str, Any]:
    """Print what labeling ``source`` would cost; loads nothing, calls nothing."""
    import json
    import sys

    from workers.estimate import estimate_source

    spec = load_spec(spec_ref)
    rows = read_source(source, limit=limit)
    _, sessions = open_database(settings)
    with sessions() as session:
        result = estimate_source(
            session,
            spec,
            rows,
            sample_size=sample,
            workers=settings.worker_concurrency if settings.distributed else 1,
        ).as_dict()
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return result
    budget = result["budget_usd"]
    console.print(
        f"{result['rows']} rows ({result['bad_rows']} bad): about {result['calls']} teacher "
        f"calls, {result['prompt_tokens']:,} prompt + {result['completion_tokens']:,} completion "
        f"tokens, ${result['cost_usd']:.4f}, {result['seconds']:.0f} s"
        + (
            ""
            if budget is None
            else f"; budget_usd ${budget:.2f} "
            f"({'enough' if result['within_budget'] else 'NOT enough'})"
        ),
        markup=False,
        highlight=False,
    )
    console.print(
        f"already labeled: {100 * result['already_done_share']:.0f} % of the sample; "
        f"cached answers: {100 * result['cached_share']:.0f} %"
    )
    for note in result["assumptions"]:
        console.print(f"  assumed: {note}", markup=False, highlight=False)
    return result


def run_report(
    settings: Settings, spec_ref: str, *, as_json: bool, console: Console
) -> dict[str, Any]:
    """Print the filter report for the spec's current version."""
    import json
    import sys

    from storage.training import report_rows
    from workers.report import build_report

    spec = load_spec(spec_ref)
    _, sessions = open_database(settings)
    spec_id = _spec_id_or_fail(sessions, spec)
    with sessions() as session:
        result = build_report(spec, report_rows(session, spec_id))
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return result
    table = Table(title=f"{spec.name} v{spec.version}: what the checks kept")
    for column in (
        "group",
        "labels",
        "accepted",
        "rejected",
        "teacher vs known-good",
        "accepted vs known-good",
        "top reasons",
    ):
        table.add_column(column)
    for name, tally in [("overall", result["overall"]), *result["slices"].items()]:
        reasons = ", ".join(
            f"{k} {v}" for k, v in sorted(tally["by_reason"].items(), key=lambda kv: -kv[1])[:3]
        )
        table.add_row(
            cell(name),
            str(tally["labels"]),
            str(tally["by_verdict"].get("accepted", 0)),
            str(tally["by_verdict"].get("rejected", 0)),
            _pct(tally["teacher_agreement"]),
            _pct(tally["accepted_accuracy"]),
            cell(reasons),
        )
    table_console().print(table)
    held = result["withheld"]
    console.print(
        f"withheld known-good ({held['labels']} items): the other checks accepted "
        f"{_pct(held['accepted_share'])}, and {_pct(held['accepted_accuracy'])} of "
        f"those were right (raw teacher: {_pct(held['raw_accuracy'])})"
    )
    return result


def run_review_list(settings: Settings, spec_ref: str, *, limit: int, as_json: bool) -> None:
    import json
    import sys
    from dataclasses import asdict

    from storage.review import review_queue

    spec = load_spec(spec_ref)
    _, sessions = open_database(settings)
    spec_id = _spec_id_or_fail(sessions, spec)
    with sessions() as session:
        entries = review_queue(session, spec_id, limit=limit)
    if as_json:
        sys.stdout.write(json.dumps([asdict(e) for e in entries], indent=2) + "\n")
        return
    table = Table(title=f"{spec.name} v{spec.version}: waiting for review ({len(entries)})")
    for column in ("item", "teacher", "known-good", "confidence", "text"):
        table.add_column(column)
    for e in entries:
        table.add_row(
            cell(e.external_id),
            cell(json.dumps(e.output, ensure_ascii=False)),
            cell(json.dumps(e.known_good, ensure_ascii=False)),
            "n/a" if e.confidence is None else f"{e.confidence:.2f}",
            cell(e.text.replace("\n", " "), limit=80),
        )
    table_console().print(table)


def run_review_resolve(
    settings: Settings,
    spec_ref: str,
    items: list[str],
    *,
    accept: bool,
    note: str | None,
    which: Any = None,
    dry_run: bool = False,
    console: Console,
) -> dict[str, Any]:
    """Decide the waiting labels of ``items``, or every waiting label ``which`` covers."""
    from storage.review import resolve_review, resolve_reviews

    spec = load_spec(spec_ref)
    _, sessions = open_database(settings)
    spec_id = _spec_id_or_fail(sessions, spec)
    decided: list[str] = []
    with sessions() as session:
        if items:
            for item in items:  # each must be waiting: the error names the one that is not
                resolve_review(session, spec_id, item, accept=accept, note=note)
                decided.append(item)
        else:
            decided = resolve_reviews(
                session, spec_id, accept=accept, which=which, note=note, dry_run=dry_run
            )
        if dry_run:
            session.rollback()
        else:
            session.commit()
    verdict = "accepted" if accept else "rejected"
    shown = ", ".join(plain(i, one_line=True) for i in decided[:10])
    more = f" and {len(decided) - 10} more" if len(decided) > 10 else ""
    console.print(
        f"{'would decide' if dry_run else 'decided'} {len(decided)} labels: {verdict}"
        + (f" ({shown}{more})" if decided else ""),
        markup=False,
        highlight=False,
    )
    return {"verdict": verdict, "decided": decided, "dry_run": dry_run}


def run_status(
    settings: Settings, spec_name: str | None, *, as_json: bool, console: Console
) -> None:
    import json
    import sys

    _, sessions = open_database(settings)
    with sessions() as session:
        spec_name = _stored_spec_name(session, spec_name)
        now = status(session, spec_name)
    if as_json:
        sys.stdout.write(json.dumps(now.as_dict(), indent=2) + "\n")
        return
    table = Table(title=f"stillhouse status{f' — {spec_name}' if spec_name else ''}")
    table.add_column("what")
    table.add_column("count", justify="right")
    for name, count in {
        **now.by_state,
        **{f"verdict {k}": v for k, v in now.by_verdict.items()},
    }.items():
        table.add_row(cell(name), str(count))
    table.add_row("items", str(now.items))
    for name, count in now.calls.items():
        table.add_row(f"calls {name}", str(count))
    table.add_row("spend (USD)", f"{now.spend_usd:.4f}")
    table.add_row("labeled / s", "n/a" if now.labeled_per_s is None else str(now.labeled_per_s))
    table_console().print(table)
    if now.last_error:
        console.print(
            f"last error on an unfinished item: {plain(now.last_error)}",
            markup=False,
            highlight=False,
        )


def run_train(
    settings: Settings, spec_ref: str, *, out: Path | None, epochs: int | None, console: Console
) -> dict[str, Any]:
    from stillhouse.training import train_student

    spec = load_spec(spec_ref)
    _, sessions = open_database(settings)
    spec_id = _spec_id_or_fail(sessions, spec)
    out = out or settings.runs_dir / f"{spec.name}-v{spec.version}"
    report = train_student(sessions, spec, spec_id, out_dir=out, epochs=epochs)
    share = spec.body.get("student", {}).get("val_share", 0.2)
    console.print(
        f"held out {report['n_val']} items by a stable hash of their id (val_share {share:g}: "
        f"an item keeps its side as the data grows; on a small set the share held out "
        f"varies around it)",
        markup=False,
        highlight=False,
    )
    console.print(
        f"student on {report['n_val']} held-out items: "
        f"{_pct(report['student_accuracy'])} vs known-good "
        f"(teacher on the same items: {_pct(report['teacher_accuracy'])}); "
        f"trained in {report['train_seconds']:.1f} s; written to {out}"
    )
    return report


def run_requeue(
    settings: Settings,
    spec_ref: str,
    *,
    failed: bool,
    rejected: bool,
    error_contains: str | None,
    external_ids: list[str] | None,
    console: Console,
) -> dict[str, Any]:
    """Put failed (and, for a new spec version, earlier rejected) items back to pending."""
    from storage.items import requeue_items
    from workers.ingest import store_spec

    spec = load_spec(spec_ref)
    _, sessions = open_database(settings)
    with sessions.begin() as session:
        spec_row = store_spec(session, spec)  # a new version is stored here, ready to label
        done = requeue_items(
            session,
            spec_row,
            failed=failed,
            rejected=rejected,
            error_contains=error_contains,
            external_ids=external_ids,
        )
    result = {"spec": spec.name, "version": spec.version, "failed": done.failed}
    if rejected:
        result["rejected"] = done.rejected
    console.print(
        f"{done.failed + done.rejected} items of {spec.name} back to pending for v{spec.version} "
        f"({done.failed} failed, {done.rejected} rejected under an earlier version): "
        f"`stillhouse backfill --spec SPEC` (no source) labels them; distributed, the "
        f"dispatcher queues them for the workers",
        markup=False,
        highlight=False,
    )
    return result


def _stored_spec_name(session: Session, given: str | None) -> str | None:
    """The spec name ``status --spec`` means: a stored name, or the name in a spec file (a
    path or a bundled name); a name the store does not know is an error, not a table of
    zeros."""
    if given is None:
        return None
    names = sorted(set(session.scalars(select(SpecRow.name))))
    if given in names:
        return given
    try:
        name = load_spec(given).name
    except ConfigError:
        name = None
    if name in names:
        return name
    known = ", ".join(names) if names else "none yet: run `stillhouse backfill` first"
    raise ConfigError(f"no spec named {given!r} in the store (specs stored: {known})")


def _spec_id_or_fail(sessions: sessionmaker[Session], spec: Spec) -> int:
    with sessions() as session:
        spec_id = session.scalar(
            select(SpecRow.id).where(SpecRow.name == spec.name, SpecRow.version == spec.version)
        )
    if spec_id is None:
        given = spec.source if spec.source.endswith((".yaml", ".yml")) else spec.name
        bundled = (
            Path(given).parent.name == "specs" and Path(given).parent.parent.name == "examples"
        )
        ref = spec.name if bundled else given
        raise ConfigError(
            f"nothing is labeled for spec {spec.name!r} v{spec.version} yet: run "
            f"`stillhouse backfill SOURCE --spec {ref}` first"
        )
    return spec_id


def run_demo(settings: Settings, *, limit: int | None, console: Console) -> None:
    from stillhouse.localteacher import local_teacher

    console.print("starting the local teacher (all-MiniLM-L6-v2 zero-shot) …")
    with local_teacher() as base_url:
        local = settings.model_copy(update={"teacher_base_url": base_url})
        result = run_backfill(local, "bbc", "triage", limit=limit, wait=True, console=console)
    report = run_train(local, "triage", out=None, epochs=None, console=console)
    run = {k: result.get(k, 0) for k in ("labeled", "teacher_calls", "cache_hits")}
    print(
        f"{result['labels']} BBC articles labeled; this run: {run['labeled']} new labels, "
        f"{run['teacher_calls']} teacher calls, {run['cache_hits']} cache hits, "
        f"{result['seconds']:.1f} s"
    )
    print(
        f"teacher accuracy vs known-good: {_pct(result['teacher_accuracy'])} "
        f"(all {result['labels']} labels); accepted labels: {result['accepted']}"
    )
    print(
        f"student accuracy vs known-good: {_pct(report['student_accuracy'])} on "
        f"{report['n_val']} held-out articles (teacher on the same: "
        f"{_pct(report['teacher_accuracy'])})"
    )
