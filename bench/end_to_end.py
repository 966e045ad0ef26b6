"""End to end: labeled items per second as a share of what the teacher allows, beside a bare
aiohttp loop measured against the same teacher in the same run, and the CPU each item costs
outside the teacher call.

    python bench/end_to_end.py --mode distributed --workers 2 --concurrency 64
    python bench/end_to_end.py --mode embedded --items 2000 --server-max-concurrency 32
    python bench/end_to_end.py --mode embedded --items 6000 --server-rpm 6000

The teacher is the local `fixed` backend (every answer after --latency-ms), optionally with
the limits of a hosted one (--server-max-concurrency, --server-rpm, --server-tpm: 429 with
Retry-After and x-ratelimit-* headers). ``bound_per_s`` is what it allows at most: the
client's concurrency or the server's in-flight cap over the latency, or the rpm cap.
``reference`` is `bench/reference.py` (a bare aiohttp loop with the same concurrency that
waits out every 429) against the same server, just before; ``share_of_reference`` is ours
over its rate. ``rate_limited_after_5s`` is the share of requests answered 429 after the
first 5 s of our run, from the teacher's own request log.

Modes:
- ``embedded``: `stillhouse backfill`'s labeling on SQLite in this process (the pipeline's
  lanes over one event loop), timed from the first claim to the last commit; CPU is this
  process's, and ``call_cpu_ms_per_item`` the event loop thread's (the teacher calls).
- ``distributed``: W processes of `stillhouse worker --pool threads --concurrency T` and the
  dispatcher (the loop of `stillhouse dispatch`, in a thread here so its CPU counts), on the
  usual settings' Postgres and Redis (STILLHOUSE_DATABASE_URL, STILLHOUSE_BROKER_URL) or a
  scratch database on the local Postgres (--admin-url) and Redis database 14. The spec's
  concurrency is the fleet's: the workers share it through Redis. CPU is read from /proc:
  the workers' user+system time plus the dispatcher thread's; ``call_cpu_ms_per_item`` is
  the part the workers spent inside teacher calls, as they log it per batch.
  ``postgres_cpu_ms_per_item`` is Postgres's own CPU over the run when it runs here.

Items are loaded before the clock starts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from reference import (
    add_server_options,
    aiohttp_reference,
    capped_bound,
    drop_database,
    scratch_database,
    server_args,
)
from sqlalchemy import func, select

from stillhouse.servers.teacher.process import local_teacher
from stillhouse.settings import Settings
from storage.migrate import upgrade
from storage.models import Item, ItemState, SpecRow
from storage.session import make_engine, make_sessionmaker
from workers.dispatch import DispatchOptions, run_dispatcher
from workers.ingest import SourceRow, load_source
from workers.spec import load_spec

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
FINAL = [ItemState.ACCEPTED, ItemState.REJECTED, ItemState.REVIEW, ItemState.FAILED]
TEXT = (
    "the shipment arrived late and the invoice lists a different amount than the order "
    "customer asks for a refund after the update broke the login page on mobile devices"
)
WORDS = TEXT.split(" ")


def _proc_cpu_s(pid: int) -> tuple[float, int]:
    """(user+system seconds, parent pid) of one process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS, int(fields[1])


def tree_cpu_s(root: int) -> float:
    """CPU seconds of a process and all its descendants still alive."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cpu[int(entry)], parents[int(entry)] = _proc_cpu_s(int(entry))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(cpu.get(pid, 0.0) for pid in tree)


def postgres_cpu_s() -> float | None:
    """CPU seconds of this machine's Postgres processes, exited backends included (their time
    is in the postmaster's cutime/cstime); None when no Postgres runs here."""
    total, seen = 0.0, False
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                name, rest = handle.read().rsplit(")", 1)
        except (FileNotFoundError, ProcessLookupError):
            continue
        if name.endswith("(postgres"):
            fields = rest.split()
            total += sum(int(f) for f in fields[11:15]) / CLOCK_TICKS
            seen = True
    return total if seen else None


def _spec_file(directory: str, concurrency: int, batch_size: int) -> Path:
    body = yaml.safe_load(Path(load_spec("triage").source).read_text())
    body["name"] = "bench-e2e"
    body["teacher"].update(concurrency=concurrency, timeout_s=30, max_retries=2)
    body["labeling"] = {"batch_size": batch_size, "lease_s": 600, "max_attempts": 5}
    body["checks"]["require_known_good_match"] = False
    # The pipeline's rate, not a calibration's: no target (its withheld items would wait for
    # records these synthetic rows do not have), the share withheld as the figures had it.
    body["checks"].pop("target_accuracy", None)
    body["checks"]["withhold_share"] = 0.1
    path = Path(directory) / "bench-e2e.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def _rows(n: int) -> list[SourceRow]:
    rows = []
    for i in range(n):
        words = [WORDS[(i * 7 + k * 13) % len(WORDS)] for k in range(60)]
        row = {"id": f"b{i}", "headline": f"ticket {i}", "body": " ".join(words), "queue": "tech"}
        rows.append(SourceRow(i + 1, row))
    return rows


def _final_count(sessions: Any) -> int:
    with sessions() as session:
        return int(
            session.scalar(select(func.count()).select_from(Item).where(Item.state.in_(FINAL))) or 0
        )


def _wait_ready(log: Path, worker: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while b" ready." not in log.read_bytes():
        if worker.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the worker did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def _call_cpu_ms(log: Path) -> float:
    return sum(float(m) for m in re.findall(rb"call_cpu_ms=([0-9.]+)", log.read_bytes()))


def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = tempfile.mkdtemp(prefix="stillhouse-e2e-")
    log = Path(args.keep_log) if args.keep_log else Path(tmp) / "requests.jsonl"
    with local_teacher("fixed", extra_args=[*server_args(args), "--request-log", str(log)]) as url:
        reference = asyncio.run(aiohttp_reference(url, args.concurrency, args.items))
        httpx.post(f"{url}/stats/reset", timeout=5).raise_for_status()
        log.unlink()
        measure = _embedded if args.mode == "embedded" else _distributed
        result = measure(args, url, Path(tmp))
        result.update(_server_side(url, log, result["started_at"]))
    bound = capped_bound(args, args.concurrency)
    reference["share_of_bound"] = round(reference["per_s"] / bound, 3)
    return {
        "mode": args.mode,
        "items": args.items,
        "seconds": result.pop("seconds"),
        "items_per_s": round(args.items / result["elapsed"], 1),
        "bound_per_s": round(bound, 1),
        "share_of_bound": round(args.items / result["elapsed"] / bound, 3),
        "share_of_reference": round(args.items / result.pop("elapsed") / reference["per_s"], 3),
        "reference": reference,
        "concurrency": args.concurrency,
        "server_limits": {
            "max_concurrency": args.server_max_concurrency,
            "rpm": args.server_rpm,
            "tpm": args.server_tpm,
            "retry_after_s": args.server_retry_after_s,
        },
        "latency_ms": args.latency_ms,
        "batch_size": args.batch_size,
        **{k: v for k, v in result.items() if k != "started_at"},
        "machine": f"{os.cpu_count()} cpus, {platform.machine()}, "
        f"Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
    }


def _server_side(url: str, log: Path, started_at: float) -> dict[str, Any]:
    """What the teacher saw: requests, 429s, the most in flight, 429s after the first 5 s."""
    stats = httpx.get(f"{url}/stats", timeout=5).json()
    arrived: dict[int, float] = {}
    statuses: dict[int, int] = {}
    done: dict[int, float] = {}
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        if "at" in entry:
            arrived[entry["n"]] = entry["at"]
        if entry.get("status") is not None:
            statuses[entry["n"]] = entry["status"]
            done[entry["n"]] = entry["done"]
    late = [n for n, at in arrived.items() if at > started_at + 5]
    late_429 = sum(1 for n in late if statuses.get(n) == 429)
    served = [done[n] - arrived[n] for n in done if n in arrived and statuses.get(n) == 200]
    return {
        "server_latency_ms": round(sum(served) / len(served) * 1000, 1) if served else None,
        "teacher_requests": stats["requests"],
        "teacher_429s": stats["rate_limited"] + stats["faults"]["rate_limit"],
        "teacher_max_in_flight": stats["max_in_flight"],
        "rate_limited_after_5s": round(late_429 / len(late), 4) if late else 0.0,
    }


def _embedded(args: argparse.Namespace, url: str, tmp: Path) -> dict[str, Any]:
    from workers.pipeline import LabelRuntime, label_until_done

    db = f"sqlite:///{tmp}/bench.db"
    upgrade(db)
    engine = make_engine(db)
    sessions = make_sessionmaker(engine)
    spec = load_spec(str(_spec_file(str(tmp), args.concurrency, args.batch_size)))
    load_source(sessions, spec, _rows(args.items))
    with sessions() as session:
        spec_id = session.scalar(select(SpecRow.id).where(SpecRow.name == spec.name))
    assert spec_id is not None
    with LabelRuntime(sessions, teacher_base_url=url) as runtime:
        runtime.spec(spec_id)  # clients and slots made before the clock starts
        started_at, started, cpu = time.time(), time.monotonic(), time.process_time()
        total = label_until_done(runtime, spec_id)
        elapsed, cpu = time.monotonic() - started, time.process_time() - cpu
    latency = _client_latency_ms(sessions)
    engine.dispose()
    if total.labeled != args.items:
        raise SystemExit(f"labeled {total.labeled} of {args.items} items")
    return {
        "started_at": started_at,
        "elapsed": elapsed,
        "seconds": round(elapsed, 2),
        "overhead_cpu_ms_per_item": round((cpu * 1000 - total.call_cpu_ms) / args.items, 3),
        "call_cpu_ms_per_item": round(total.call_cpu_ms / args.items, 3),
        "process_cpu_ms_per_item": round(cpu * 1000 / args.items, 3),
        "lanes": _lanes_of(spec),
        "client_latency_ms": latency,
    }


def _client_latency_ms(sessions: Any) -> float | None:
    """The mean latency of answered calls as the workers measured them (the ledger's)."""
    from storage.models import CallStatus, TeacherCall

    with sessions() as session:
        mean = session.scalar(
            select(func.avg(TeacherCall.latency_ms)).where(TeacherCall.status == CallStatus.OK)
        )
    return None if mean is None else round(float(mean), 1)


def _lanes_of(spec: Any) -> int:
    from workers.pipeline import _lanes_for

    return _lanes_for(spec)


def _distributed(args: argparse.Namespace, url: str, tmp: Path) -> dict[str, Any]:
    settings = Settings()
    scratch = None
    db = settings.database_url
    if settings.is_sqlite:
        db, scratch = scratch_database(args.admin_url)
    broker = settings.broker_url or "redis://127.0.0.1:6379/14"
    try:
        upgrade(db)
        engine = make_engine(db)
        sessions = make_sessionmaker(engine)
        spec = load_spec(str(_spec_file(str(tmp), args.concurrency, args.batch_size)))
        load_source(sessions, spec, _rows(args.items))
        result = _measure(args, db, broker, url, sessions, tmp)
        result["client_latency_ms"] = _client_latency_ms(sessions)
        engine.dispose()
    finally:
        if scratch:
            drop_database(args.admin_url, scratch)
    return result


def _measure(
    args: argparse.Namespace, db: str, broker: str, teacher: str, sessions: Any, tmp: Path
) -> dict[str, Any]:
    import redis

    redis.Redis.from_url(broker).flushdb()
    env = {
        **os.environ,
        "STILLHOUSE_DATABASE_URL": db,
        "STILLHOUSE_BROKER_URL": broker,
        "STILLHOUSE_TEACHER_BASE_URL": teacher,
    }
    workers, logs = [], []
    for n in range(args.workers):
        logs.append(tmp / f"worker{n}.log")
        with logs[-1].open("wb") as out:
            workers.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "stillhouse",
                        "worker",
                        "--pool",
                        "threads",
                        "--concurrency",
                        str(args.threads),
                    ],
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    try:
        for worker, log in zip(workers, logs, strict=True):
            _wait_ready(log, worker)
        return _timed(args, broker, sessions, workers, logs)
    finally:
        for worker in workers:
            os.killpg(worker.pid, signal.SIGTERM)
        for worker in workers:
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)


def _timed(
    args: argparse.Namespace,
    broker: str,
    sessions: Any,
    workers: list[subprocess.Popen[bytes]],
    logs: list[Path],
) -> dict[str, Any]:
    from stillhouse.distributed import open_celery
    from workers.celery_app import send_label_batch

    celery = open_celery(Settings(broker_url=broker, database_url="postgresql://"))
    stop = threading.Event()
    dispatch_cpu = {"s": 0.0}

    def dispatcher() -> None:
        started = time.thread_time()
        run_dispatcher(
            sessions,
            lambda spec_id, ids: send_label_batch(celery, spec_id, ids),
            DispatchOptions(interval_s=args.dispatch_interval_s),
            stop,
        )
        dispatch_cpu["s"] = time.thread_time() - started

    cpu_before = sum(tree_cpu_s(w.pid) for w in workers)
    pg_before = postgres_cpu_s()
    started_at, started = time.time(), time.monotonic()
    thread = threading.Thread(target=dispatcher, daemon=True)
    thread.start()
    while _final_count(sessions) < args.items:
        for worker, log in zip(workers, logs, strict=True):
            if worker.poll() is not None:
                raise SystemExit(f"a worker died:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    elapsed = time.monotonic() - started
    worker_cpu = sum(tree_cpu_s(w.pid) for w in workers) - cpu_before
    pg_after = postgres_cpu_s()
    stop.set()
    thread.join()
    call_cpu = sum(_call_cpu_ms(log) for log in logs)
    items = args.items
    total_ms = worker_cpu * 1000 + dispatch_cpu["s"] * 1000
    overhead_ms = (total_ms - call_cpu) / items
    pg_ms = None if pg_before is None or pg_after is None else (pg_after - pg_before) * 1000
    return {
        "started_at": started_at,
        "elapsed": elapsed,
        "seconds": round(elapsed, 2),
        "overhead_cpu_ms_per_item": round(overhead_ms, 3),
        # Postgres's own CPU (a local server only; it includes this script's progress polls).
        "postgres_cpu_ms_per_item": None if pg_ms is None else round(pg_ms / items, 3),
        "overhead_with_postgres_cpu_ms_per_item": (
            None if pg_ms is None else round(overhead_ms + pg_ms / items, 3)
        ),
        "call_cpu_ms_per_item": round(call_cpu / items, 3),
        "worker_cpu_ms_per_item": round(worker_cpu * 1000 / items, 3),
        "dispatch_cpu_ms_per_item": round(dispatch_cpu["s"] * 1000 / items, 3),
        "workers": args.workers,
        "threads_per_worker": args.threads,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["embedded", "distributed"], default="distributed")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="batches in work per process")
    parser.add_argument("--concurrency", type=int, default=64, help="teacher.concurrency")
    parser.add_argument("--items", type=int, default=12000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--dispatch-interval-s", type=float, default=0.5)
    parser.add_argument("--keep-log", metavar="PATH", help="keep the teacher's request log here")
    parser.add_argument(
        "--admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    )
    add_server_options(parser)
    print(json.dumps(run(parser.parse_args())))


if __name__ == "__main__":
    main()
