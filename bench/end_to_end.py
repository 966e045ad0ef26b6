"""End to end through Celery: labeled items per second, as a share of the teacher's bound, and
the CPU each item costs outside the teacher call.

    python bench/end_to_end.py --workers 2 --concurrency 64 --latency-ms 200

Uses the database and broker of the usual settings (STILLHOUSE_DATABASE_URL, a Postgres URL,
and STILLHOUSE_BROKER_URL); when they are unset it creates a scratch database on the local
Postgres (--admin-url) and uses Redis database 14 on 127.0.0.1, and drops the database after.

What runs: the local teacher's `fixed` backend (every answer after --latency-ms); W processes
of `stillhouse worker --pool threads --concurrency T` (each with concurrency/W teacher
connections, shared by its T batch threads); and the dispatcher (the same loop as
`stillhouse dispatch`, in a thread of this process so its CPU can be counted). Items are
loaded before the clock starts.

bound_per_s = concurrency / latency. CPU is read from /proc: the worker processes' user+system
time over the run plus the dispatcher thread's; ``call_cpu_ms_per_item`` is the part the
workers spent inside teacher calls (HTTP client, governor), as they log it per batch, and
``overhead_cpu_ms_per_item`` is the rest (dispatch, Celery, claims, checks, database writes).
``postgres_cpu_ms_per_item`` is Postgres's own CPU over the run when the server runs on this
machine (null otherwise), and ``overhead_with_postgres_cpu_ms_per_item`` adds it in.
"""

from __future__ import annotations

import argparse
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
import uuid
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import create_engine, func, select, text

from stillhouse.localteacher import local_teacher
from stillhouse.settings import Settings
from storage.migrate import upgrade
from storage.models import Item, ItemState
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


def _scratch_database(admin_url: str) -> tuple[str, str]:
    name = f"stillhouse_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return admin_url.rsplit("/", 1)[0] + f"/{name}", name


def _drop_database(admin_url: str, name: str) -> None:
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _spec_file(directory: str, per_worker: int, batch_size: int) -> Path:
    body = yaml.safe_load(Path(load_spec("triage").source).read_text())
    body["name"] = "bench-e2e"
    body["teacher"].update(concurrency=per_worker, timeout_s=30, max_retries=2)
    body["labeling"] = {"batch_size": batch_size, "lease_s": 600, "max_attempts": 5}
    body["checks"]["require_known_good_match"] = False
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
    settings = Settings()
    scratch = None
    db = settings.database_url
    if settings.is_sqlite:
        db, scratch = _scratch_database(args.admin_url)
    broker = settings.broker_url or "redis://127.0.0.1:6379/14"
    tmp = tempfile.mkdtemp(prefix="stillhouse-e2e-")
    try:
        upgrade(db)
        engine = make_engine(db)
        sessions = make_sessionmaker(engine)
        spec_path = _spec_file(tmp, args.concurrency // args.workers, args.batch_size)
        spec = load_spec(str(spec_path))
        load_source(sessions, spec, _rows(args.items))
        with local_teacher("fixed", extra_args=["--latency-ms", str(args.latency_ms)]) as url:
            result = _measure(args, db, broker, url, sessions, Path(tmp))
        engine.dispose()
    finally:
        if scratch:
            _drop_database(args.admin_url, scratch)
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
            DispatchOptions(),
            stop,
        )
        dispatch_cpu["s"] = time.thread_time() - started

    cpu_before = sum(tree_cpu_s(w.pid) for w in workers)
    pg_before = postgres_cpu_s()
    started = time.monotonic()
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
    items, bound = args.items, args.concurrency / (args.latency_ms / 1000)
    total_ms = worker_cpu * 1000 + dispatch_cpu["s"] * 1000
    overhead_ms = (total_ms - call_cpu) / items
    pg_ms = None if pg_before is None or pg_after is None else (pg_after - pg_before) * 1000
    return {
        "items": items,
        "seconds": round(elapsed, 2),
        "items_per_s": round(items / elapsed, 1),
        "bound_per_s": round(bound, 1),
        "share_of_bound": round(items / elapsed / bound, 3),
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
        "concurrency": args.concurrency,
        "latency_ms": args.latency_ms,
        "batch_size": args.batch_size,
        "machine": f"{os.cpu_count()} cpus, {platform.machine()}, "
        f"Python {platform.python_version()}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="batches in work per process")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--items", type=int, default=12000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    )
    print(json.dumps(run(parser.parse_args())))


if __name__ == "__main__":
    main()
