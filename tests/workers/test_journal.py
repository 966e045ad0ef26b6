"""The embedded write-ahead journal: attempts on file before they are sent, recovered into
the ledger after the process that wrote them died (a real ``kill -9`` of a real backfill)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from sqlalchemy import select
from support import ROOT, triage_body

from stillhouse.servers.teacher.process import local_teacher
from storage.migrate import upgrade
from storage.models import CallStatus, Item, SpecRow, TeacherCall
from storage.results import InFlight
from storage.session import make_engine, make_sessionmaker
from workers import journal as journal_module
from workers.ingest import SourceRow, load_source
from workers.journal import Journal, journal_folder, recover_journals
from workers.spec import load_spec


def _store(tmp_path: Path) -> tuple[str, int, list[int]]:
    url = f"sqlite:///{tmp_path}/store.db"
    upgrade(url)
    spec = load_spec("triage")
    sessions = make_sessionmaker(make_engine(url))
    rows = [
        {"id": f"t{i}", "headline": f"ticket {i}", "body": "b", "queue": "tech"} for i in range(3)
    ]
    load_source(sessions, spec, [SourceRow(i + 1, r) for i, r in enumerate(rows)])
    with sessions() as session:
        spec_id = session.scalar(select(SpecRow.id))
        item_ids = list(session.scalars(select(Item.id).order_by(Item.id)))
    assert spec_id is not None
    return url, spec_id, item_ids


def _attempt(item_id: int, spec_id: int, request_id: str) -> InFlight:
    return InFlight(item_id, spec_id, "h" * 64, 1, request_id, 0.001)


def test_attempts_a_dead_process_left_become_in_flight_rows(tmp_path: Path) -> None:
    url, spec_id, items = _store(tmp_path)
    engine = make_engine(url)
    folder = journal_folder(engine)
    assert folder == Path(f"{tmp_path}/store.db.calls-ahead")
    writer = f"""
import os
from pathlib import Path
from storage.results import InFlight
from workers.journal import Journal
journal = Journal(Path({str(folder)!r}))
for n, item in enumerate({items!r}):
    journal.append(InFlight(item, {spec_id}, "h" * 64, 1, f"dead-{{n}}", 0.001))
os.kill(os.getpid(), 9)
"""
    died = subprocess.run([sys.executable, "-c", writer], cwd=ROOT, timeout=60)
    assert died.returncode == -signal.SIGKILL
    with make_sessionmaker(engine).begin() as session:  # one of them did reach the ledger
        session.add(
            TeacherCall(
                item_id=items[0],
                spec_id=spec_id,
                request_hash="h" * 64,
                attempt=1,
                status=CallStatus.OK,
                client_request_id="dead-0",
            )
        )

    assert recover_journals(engine) == 2
    with make_sessionmaker(engine)() as session:
        rows = session.execute(
            select(TeacherCall.client_request_id, TeacherCall.status).order_by(TeacherCall.id)
        ).all()
    assert [(r.client_request_id, r.status) for r in rows] == [
        ("dead-0", CallStatus.OK),
        ("dead-1", CallStatus.IN_FLIGHT),
        ("dead-2", CallStatus.IN_FLIGHT),
    ]
    assert list(folder.glob("*.jsonl")) == []  # recovered once, never twice
    assert recover_journals(engine) == 0


def test_a_living_processs_journal_is_left_alone(tmp_path: Path) -> None:
    url, spec_id, items = _store(tmp_path)
    engine = make_engine(url)
    folder = journal_folder(engine)
    assert folder is not None
    journal = Journal(folder)
    journal.append(_attempt(items[0], spec_id, "alive-0"))

    assert recover_journals(engine) == 0
    assert len(list(folder.glob("*.jsonl"))) == 1
    journal.settle(["alive-0"])
    journal.close()
    assert list(folder.glob("*.jsonl")) == []


def test_settled_segments_are_deleted_as_the_journal_moves_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_module, "SEGMENT_LINES", 2)
    journal = Journal(tmp_path / "j")
    for n in range(5):
        journal.append(_attempt(1, 1, f"r{n}"))
    assert len(list((tmp_path / "j").glob("*.jsonl"))) == 3
    journal.settle(["r0", "r1", "r3"])
    assert len(list((tmp_path / "j").glob("*.jsonl"))) == 2  # the first segment is done
    journal.settle(["r2"])
    assert len(list((tmp_path / "j").glob("*.jsonl"))) == 1  # the last one stays open
    journal.close()
    assert len(list((tmp_path / "j").glob("*.jsonl"))) == 1  # r4 never reached the ledger


def test_a_line_cut_short_by_the_crash_is_skipped(tmp_path: Path) -> None:
    url, spec_id, items = _store(tmp_path)
    engine = make_engine(url)
    folder = journal_folder(engine)
    assert folder is not None
    folder.mkdir()
    whole = json.dumps([items[0], spec_id, "h" * 64, 1, "whole", 0.0])
    (folder / "1-dead-1.jsonl").write_text(whole + "\n" + whole[:20])

    assert recover_journals(engine) == 1


@pytest.mark.slow
def test_a_killed_backfill_leaves_a_ledger_row_for_every_request_it_sent(tmp_path: Path) -> None:
    """kill -9 of an embedded backfill mid-run; the next run recovers the journal and
    finishes: the ledger then holds every request the teacher received, by its id."""
    body = triage_body()
    body["teacher"].update(concurrency=8, timeout_s=10, max_retries=2)
    body["labeling"] = {"batch_size": 8, "lease_s": 10, "max_attempts": 5}
    body["checks"]["require_known_good_match"] = False
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(body))
    db = f"sqlite:///{tmp_path}/killed.db"
    log = tmp_path / "requests.jsonl"
    args = ["--latency-ms", "400", "--request-log", str(log)]
    with local_teacher("fixed", extra_args=args) as url:
        env = {
            **os.environ,
            "STILLHOUSE_DATABASE_URL": db,
            "STILLHOUSE_BROKER_URL": "",
            "STILLHOUSE_TEACHER_BASE_URL": url,
        }
        command = [sys.executable, "-m", "stillhouse", "backfill", "bbc", "--spec", str(spec)]
        command += ["--limit", "48", "--json"]
        first = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while httpx.get(f"{url}/stats", timeout=5).json()["requests"] < 20:
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        time.sleep(10.5)  # the killed run's leases run out
        second = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, timeout=240)
        assert second.returncode == 0, second.stderr
    received = [json.loads(line) for line in log.read_text().splitlines()]
    received = [entry for entry in received if "at" in entry]
    engine = make_engine(db)
    with make_sessionmaker(engine)() as session:
        ledger = dict(
            session.execute(select(TeacherCall.client_request_id, TeacherCall.status)).all()
        )
        labeled = session.scalar(select(Item.id).where(Item.state == "pending").limit(1))
    sent = {entry["client_request_id"] for entry in received}
    assert sent <= set(ledger)  # every request the teacher received is on the ledger
    unsent = {rid for rid, status in ledger.items() if rid and rid not in sent}
    assert all(ledger[rid] == CallStatus.IN_FLIGHT for rid in unsent)
    assert len(unsent) <= 8  # only attempts killed between the journal and the wire
    assert any(status == CallStatus.IN_FLIGHT for status in ledger.values())  # the dead ones
    assert labeled is None
