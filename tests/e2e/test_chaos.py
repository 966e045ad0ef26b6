"""Chaos, all in one run with real processes: three workers sharing one teacher limit, a batch
larger than the concurrency, two workers killed (SIGKILL), one stalled past its lease
(SIGSTOP, SIGCONT), and a teacher outage (the teacher killed, then started again on its
port). Afterwards every item is labeled once, no wait cost an item its attempts, the fleet
never had more calls in flight than the spec allows, and the call ledger matches the
teacher's own request log request by request (by request hash and X-Client-Request-Id).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy import select
from support import triage_body
from support.clitools import run_cli
from support.faultkit import FINAL, Proc, free_port, ledger, wait_for

from stillhouse.servers.teacher.process import wait_ready
from storage.models import CallStatus, Item, Label, TeacherCall
from storage.session import make_engine, make_sessionmaker

ROWS = 600
CONCURRENCY = 12
BATCH = 32

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]


class Teacher:
    """The local teacher on a fixed port, appending every request to one log file, so it can
    be killed and started again (an outage) without losing the log."""

    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log = tmp_path / "teacher-requests.jsonl"
        self.out = tmp_path / "teacher.log"
        self.most_in_flight = 0
        self.proc: Proc | None = None

    def start(self) -> None:
        args = ["teacher", "serve", "--backend", "fixed", "--port", str(self.port)]
        args += ["--latency-ms", "150", "--request-log", str(self.log)]
        self.proc = Proc({}, self.out, *args)
        wait_ready(self.url, self.proc.process)

    def served(self) -> int:
        return int(httpx.get(f"{self.url}/stats", timeout=5).json()["requests"])

    def kill(self) -> None:
        assert self.proc is not None
        self.note_in_flight()
        self.proc.kill()

    def note_in_flight(self) -> None:
        stats = httpx.get(f"{self.url}/stats", timeout=5).json()
        self.most_in_flight = max(self.most_in_flight, int(stats["max_in_flight"]))

    def requests(self) -> dict[int, dict[str, Any]]:
        """The log: each request by (restart, number), with its status once answered."""
        seen: dict[int, dict[str, Any]] = {}
        run, last = 0, -1
        for line in self.log.read_text().splitlines():
            entry = json.loads(line)
            if "at" in entry:
                if entry["n"] <= last and entry["n"] == 0:
                    run += 1  # numbering starts again after a restart
                last = entry["n"]
                seen[run * 1_000_000 + entry["n"]] = entry
            elif run * 1_000_000 + entry["n"] in seen:
                seen[run * 1_000_000 + entry["n"]]["status"] = entry["status"]
        return seen


def _spec(tmp_path: Path) -> Path:
    body = triage_body()
    body["teacher"].update(
        concurrency=CONCURRENCY,
        timeout_s=5,
        max_retries=3,
        max_inline_wait_s=2,
        circuit_breaker={"failures": 5, "cooldown_s": 2},
    )
    body["labeling"] = {"batch_size": BATCH, "lease_s": 10, "max_attempts": 6}
    body["checks"]["require_known_good_match"] = False
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def _progress(url: str) -> int:
    return sum(n for s, n in ledger(url).by_state.items() if s in FINAL)


def test_a_chaotic_run_labels_everything_once_and_the_ledger_equals_the_teacher(
    tmp_path: Path, postgres_url: str, redis_url: str
) -> None:
    teacher = Teacher(tmp_path)
    teacher.start()
    env = {
        "STILLHOUSE_DATABASE_URL": postgres_url,
        "STILLHOUSE_BROKER_URL": redis_url,
        "STILLHOUSE_TEACHER_BASE_URL": teacher.url,
        "STILLHOUSE_DISPATCH_INTERVAL_S": "0.3",
        "STILLHOUSE_REQUEUE_AFTER_S": "4",
    }
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    spec = str(_spec(tmp_path))
    load = run_cli(
        env, "backfill", "bbc", "--spec", spec, "--limit", str(ROWS), "--no-wait", "--json"
    )
    assert load.returncode == 0, load.stderr
    items = json.loads(load.stdout)["inserted"]  # a few BBC texts repeat: loaded once
    processes: list[Proc] = [Proc(env, tmp_path / "dispatch.log", "dispatch")]

    def worker(name: str) -> Proc:
        args = ["worker", "--concurrency", "2", "--loglevel", "INFO"]
        processes.append(Proc(env, tmp_path / f"{name}.log", *args))
        return processes[-1]

    first, stalled, last = worker("w1"), worker("w2"), worker("w3")

    def reached(share: float) -> None:
        wait_for(lambda: _progress(postgres_url) >= share * items, 180, f"{share:.0%} done")

    try:
        wait_for(lambda: teacher.served() >= 60, 120, f"calls\n{first.tail()}")
        first.kill()  # mid-batch, calls in flight
        worker("w1-again")
        reached(0.2)
        os.killpg(stalled.pid, signal.SIGSTOP)  # past its lease: others take its items
        time.sleep(12)
        os.killpg(stalled.pid, signal.SIGCONT)
        reached(0.45)
        teacher.kill()  # the outage: connections refused for a few seconds
        time.sleep(4)
        teacher.start()
        reached(0.7)
        last.kill()
        worker("w3-again")
        wait_for(lambda: _progress(postgres_url) == items, 240, f"every item\n{stalled.tail()}")
        teacher.note_in_flight()
    finally:
        for process in processes:
            process.stop()
        if teacher.proc is not None:
            teacher.proc.stop()

    _assert_labeled_once(postgres_url, items)
    _assert_ledger_equals_the_teacher(postgres_url, teacher)
    # One limit for the whole fleet: three (then five) workers, never more than the spec's
    # calls in flight at the teacher.
    assert teacher.most_in_flight <= CONCURRENCY, teacher.most_in_flight


def _assert_labeled_once(url: str, items: int) -> None:
    engine = make_engine(url)
    with make_sessionmaker(engine)() as session:
        states = Counter(str(s) for s in session.scalars(select(Item.state)))
        labels = Counter(session.scalars(select(Label.item_id)))
        attempts = list(session.scalars(select(Item.attempts)))
    engine.dispose()
    assert states.get("ItemState.FAILED", 0) == 0 and "failed" not in states, states
    assert sum(states.values()) == items
    assert len(labels) == items and set(labels.values()) == {1}
    # Waits (429s, the open breaker during the outage) kept the items' attempts: only the
    # kills and the stall cost any.
    assert max(attempts) <= 4, Counter(attempts)


def _assert_ledger_equals_the_teacher(url: str, teacher: Teacher) -> None:
    engine = make_engine(url)
    with make_sessionmaker(engine)() as session:
        rows = session.execute(
            select(
                TeacherCall.client_request_id,
                TeacherCall.request_hash,
                TeacherCall.status,
                TeacherCall.http_status,
                TeacherCall.error_kind,
            ).where(TeacherCall.status != CallStatus.CACHE_HIT)
        ).all()
    engine.dispose()
    by_id = {row.client_request_id: row for row in rows}
    assert len(by_id) == len(rows)  # one id per attempt
    received = teacher.requests()
    # Every request the teacher received is on the ledger, as the same request.
    for entry in received.values():
        row = by_id.get(entry["client_request_id"])
        assert row is not None, entry
        assert row.request_hash == entry["request_hash"]
        status = entry.get("status")
        if status == 200 and row.status == CallStatus.ERROR:
            # Answered, but too late for the worker (it was stopped past its timeout).
            assert row.error_kind == "timeout", (entry, row)
        if row.status == CallStatus.OK:
            assert status == 200, (entry, row)
    # A ledger row the teacher never saw is a write-ahead row of a worker killed between
    # the commit and the send, or of a call refused while the teacher was down.
    sent_ids = {entry["client_request_id"] for entry in received.values()}
    unseen = [row for row in rows if row.client_request_id not in sent_ids]
    assert all(row.status == CallStatus.IN_FLIGHT or row.http_status is None for row in unseen), (
        unseen
    )
    assert sum(1 for row in unseen if row.status == CallStatus.IN_FLIGHT) <= 2 * BATCH
    # Per request hash, the teacher's count equals the ledger's rows it received.
    by_hash = Counter(entry["request_hash"] for entry in received.values())
    ledger_hash = Counter(row.request_hash for row in rows if row.client_request_id in sent_ids)
    assert by_hash == ledger_hash
    print(
        f"chaos result: teacher received {len(received)} requests, ledger {len(rows)} rows "
        f"({len(unseen)} never reached it: {Counter(str(r.status) for r in unseen)}), "
        f"{len(by_hash)} request hashes matched, at most {teacher.most_in_flight} in flight"
    )
