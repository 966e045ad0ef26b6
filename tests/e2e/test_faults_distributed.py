"""Faults in the distributed stack, with real processes: a worker killed or stopped mid-batch,
Redis flushed or restarted, Postgres restarted, a batch delivered twice.

After each: every item reaches a final state, exactly one label per item, the teacher server's
own request count equals the ledger's, and paid calls exceed items by at most the calls that
were in flight when something died.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from support import triage_body
from support.clitools import run_cli
from support.faultkit import (
    Proc,
    all_final,
    assert_clean,
    ledger,
    own_postgres,
    own_redis,
    served,
    wait_for,
)

from stillhouse.servers.teacher.process import local_teacher
from storage.migrate import upgrade

ITEMS = 32
BATCH = 8

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]


@pytest.fixture(scope="module")
def slow_teacher() -> Iterator[str]:
    """The local teacher's `fixed` backend: a valid answer after 600 ms, every time."""
    with local_teacher("fixed", extra_args=["--latency-ms", "600"]) as url:
        yield url


def _spec(tmp_path: Path) -> Path:
    body = triage_body()
    body["teacher"].update(concurrency=BATCH, timeout_s=10, max_retries=2)
    body["labeling"] = {"batch_size": BATCH, "lease_s": 10, "max_attempts": 5}
    body["checks"]["require_known_good_match"] = False
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def _env(db: str, broker: str, teacher: str) -> dict[str, str]:
    return {
        "STILLHOUSE_DATABASE_URL": db,
        "STILLHOUSE_BROKER_URL": broker,
        "STILLHOUSE_TEACHER_BASE_URL": teacher,
        "STILLHOUSE_DISPATCH_INTERVAL_S": "0.3",
        "STILLHOUSE_REQUEUE_AFTER_S": "4",
    }


def _load(env: dict[str, str], spec: Path) -> None:
    """Load ITEMS BBC articles and queue them (distributed backfill, not waiting)."""
    httpx.post(f"{env['STILLHOUSE_TEACHER_BASE_URL']}/stats/reset", timeout=5).raise_for_status()
    run = run_cli(
        env, "backfill", "bbc", "--spec", str(spec), "--limit", str(ITEMS), "--no-wait", "--json"
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["inserted"] == ITEMS


def _worker(env: dict[str, str], log: Path, *, beat: bool = True, concurrency: int = 1) -> Proc:
    args = ["worker", "--concurrency", str(concurrency), "--loglevel", "INFO"]
    return Proc(env, log, *args, *(["--beat"] if beat else []))


def _in_flight(url: str, teacher: str) -> bool:
    """A batch's requests are all at the teacher, waiting for answers."""
    now = ledger(url)
    waiting = now.calls.get("in_flight", 0)
    answered = now.calls.get("ok", 0) + now.calls.get("error", 0)
    return waiting > 0 and served(teacher) - answered == waiting


def _worker_with_a_batch_in_flight(env: dict[str, str], tmp_path: Path, log: str) -> Proc:
    """Load the items, start a worker, and return it once a batch waits on the teacher."""
    url, teacher = env["STILLHOUSE_DATABASE_URL"], env["STILLHOUSE_TEACHER_BASE_URL"]
    _load(env, _spec(tmp_path))
    worker = _worker(env, tmp_path / log)
    wait_for(lambda: _in_flight(url, teacher), 60, f"a batch in flight\n{worker.tail()}")
    return worker


def _finish(env: dict[str, str], tmp_path: Path, teacher: str, lost_at_most: int) -> None:
    url = env["STILLHOUSE_DATABASE_URL"]
    worker = _worker(env, tmp_path / "finisher.log")
    try:
        wait_for(all_final(url, ITEMS), 120, f"every item final\n{worker.tail()}")
    finally:
        worker.stop()
    assert_clean(url, teacher, ITEMS, lost_at_most=lost_at_most)


def test_sigkill_of_a_worker_mid_batch(
    tmp_path: Path, postgres_url: str, redis_url: str, slow_teacher: str
) -> None:
    env = _env(postgres_url, redis_url, slow_teacher)
    worker = _worker_with_a_batch_in_flight(env, tmp_path, "killed.log")
    worker.kill()
    killed = ledger(postgres_url)
    # The write-ahead rows of the killed batch stay: the ledger shows what was sent.
    assert killed.calls.get("in_flight", 0) >= 1
    _finish(env, tmp_path, slow_teacher, lost_at_most=BATCH)


def test_sigterm_lets_the_batch_in_work_finish(
    tmp_path: Path, postgres_url: str, redis_url: str, slow_teacher: str
) -> None:
    env = _env(postgres_url, redis_url, slow_teacher)
    worker = _worker_with_a_batch_in_flight(env, tmp_path, "stopped.log")
    os.kill(worker.pid, signal.SIGTERM)  # the main process: Celery's warm shutdown
    worker.process.wait(timeout=60)
    assert worker.process.returncode == 0, worker.tail()
    stopped = ledger(postgres_url)
    # Nothing left leased and nothing lost: the batch finished before the worker exited.
    assert stopped.by_state.get("leased", 0) == 0, stopped
    assert stopped.calls.get("in_flight", 0) == 0 and stopped.labels >= 1, stopped
    worker.stop()
    _finish(env, tmp_path, slow_teacher, lost_at_most=0)


def test_the_same_batch_delivered_twice_is_labeled_and_paid_once(
    tmp_path: Path, postgres_url: str, redis_url: str, slow_teacher: str
) -> None:
    env = _env(postgres_url, redis_url, slow_teacher)
    _load(env, _spec(tmp_path))
    # Deliver every queued batch a second time, as a broker redelivery would.
    code = (
        "import sys, json\n"
        "from sqlalchemy import select\n"
        "from stillhouse.distributed import open_celery\n"
        "from stillhouse.settings import Settings\n"
        "from storage.models import Item\n"
        "from storage.session import make_engine, make_sessionmaker\n"
        "from workers.celery_app import send_label_batch\n"
        "settings = Settings()\n"
        "celery = open_celery(settings)\n"
        "with make_sessionmaker(make_engine(settings.database_url))() as s:\n"
        "    rows = s.execute(select(Item.spec_id, Item.id).order_by(Item.id)).all()\n"
        f"for start in range(0, len(rows), {BATCH}):\n"
        f"    batch = rows[start:start + {BATCH}]\n"
        "    send_label_batch(celery, batch[0][0], [r[1] for r in batch])\n"
    )
    import subprocess

    subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, check=True, timeout=60)
    workers = [_worker(env, tmp_path / f"dup{n}.log", beat=False, concurrency=2) for n in range(2)]
    try:
        wait_for(all_final(postgres_url, ITEMS), 120, "every item final")
    finally:
        for worker in workers:
            worker.stop()
    assert_clean(postgres_url, slow_teacher, ITEMS, lost_at_most=0)


@pytest.mark.parametrize("fault", ["flush", "restart"])
def test_redis_lost_mid_run(
    tmp_path: Path, postgres_url: str, slow_teacher: str, fault: str
) -> None:
    with own_redis() as (broker, restart):
        env = _env(postgres_url, broker, slow_teacher)
        _load(env, _spec(tmp_path))
        worker = _worker(env, tmp_path / "worker.log")
        try:
            wait_for(lambda: ledger(postgres_url).labels >= BATCH, 60, worker.tail())
            if fault == "flush":
                import redis

                redis.Redis.from_url(broker).flushall()
            else:
                restart()  # no persistence: every queued id is gone
            wait_for(all_final(postgres_url, ITEMS), 120, f"every item final\n{worker.tail()}")
        finally:
            worker.stop()
        assert_clean(postgres_url, slow_teacher, ITEMS, lost_at_most=BATCH)


def test_postgres_restarted_mid_run(tmp_path: Path, redis_url: str, slow_teacher: str) -> None:
    with own_postgres() as (db, restart):
        upgrade(db)
        env = _env(db, redis_url, slow_teacher)
        _load(env, _spec(tmp_path))
        worker = _worker(env, tmp_path / "worker.log")
        try:
            wait_for(lambda: ledger(db).labels >= BATCH, 60, worker.tail())
            wait_for(lambda: _in_flight(db, slow_teacher), 30, "a batch in flight")
            restart()
            wait_for(all_final(db, ITEMS), 150, f"every item final\n{worker.tail()}")
        finally:
            worker.stop()
        assert_clean(db, slow_teacher, ITEMS, lost_at_most=BATCH)
