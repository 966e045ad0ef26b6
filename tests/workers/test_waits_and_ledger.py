"""Waits never cost an item an attempt, and the ledger holds every HTTP attempt, request by
request: the real pipeline (embedded, SQLite) against the real local teacher."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from support import triage_body

from stillhouse.servers.teacher.process import local_teacher
from storage.migrate import upgrade
from storage.models import CallStatus, Item, ItemState, SpecRow, TeacherCall
from storage.session import make_engine, make_sessionmaker
from workers.ingest import SourceRow, load_source
from workers.pipeline import LabelRuntime, label_until_done
from workers.spec import Spec, load_spec

pytestmark = pytest.mark.slow


def _spec(tmp_path: Path, **teacher: Any) -> Spec:
    body = triage_body()
    body["name"] = f"waits-{tmp_path.name[-12:]}"
    body["teacher"].update({"timeout_s": 5, "max_retries": 2, "concurrency": 4, **teacher})
    body["labeling"] = {"batch_size": 8, "lease_s": 60, "max_attempts": 2}
    body["checks"]["require_known_good_match"] = False
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(body))
    return load_spec(str(path))


def _store(tmp_path: Path, spec: Spec, items: int) -> tuple[sessionmaker[Session], int]:
    url = f"sqlite:///{tmp_path}/waits.db"
    upgrade(url)
    sessions = make_sessionmaker(make_engine(url))
    body = {"body": "the printer is on fire", "queue": "tech"}
    rows = [{"id": f"t{i}", "headline": f"ticket {i}", **body} for i in range(items)]
    load_source(sessions, spec, [SourceRow(i + 1, row) for i, row in enumerate(rows)])
    with sessions() as session:
        spec_id = session.scalar(select(SpecRow.id).where(SpecRow.name == spec.name))
    assert spec_id is not None
    return sessions, spec_id


def _profile(tmp_path: Path, **settings: Any) -> list[str]:
    path = tmp_path / "faults.yaml"
    path.write_text(yaml.safe_dump({"seed": 3, "latency": 5, **settings}))
    return ["--faults", str(path)]


def _items(sessions: sessionmaker[Session]) -> list[Any]:
    with sessions() as session:
        return list(session.execute(select(Item.state, Item.attempts, Item.last_error)).all())


def test_a_teacher_that_only_asks_to_wait_never_fails_an_item(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    sessions, spec_id = _store(tmp_path, spec, 6)
    args = _profile(tmp_path, shares={"rate_limit": 1.0}, retry_after_s=30)
    with (
        local_teacher("fixed", extra_args=args) as url,
        LabelRuntime(sessions, teacher_base_url=url) as runtime,
    ):
        for _ in range(3):  # a run after a run: the items wait, they do not fail
            label_until_done(runtime, spec_id)
        served = httpx.get(f"{url}/stats", timeout=5).json()["requests"]

    items = _items(sessions)
    assert {state for state, _, _ in items} == {ItemState.PENDING}
    assert {attempts for _, attempts, _ in items} == {0}
    assert all(error.startswith("rate_limited") for _, _, error in items)
    assert served == 6  # each asked once; the 30 s wait is the item's, not a busy loop


def test_an_open_circuit_returns_items_with_their_attempts(tmp_path: Path) -> None:
    spec = _spec(tmp_path, circuit_breaker={"failures": 3, "cooldown_s": 60}, max_retries=1)
    sessions, spec_id = _store(tmp_path, spec, 12)
    args = _profile(tmp_path, shares={"server_error": 1.0})
    with (
        local_teacher("fixed", extra_args=args) as url,
        LabelRuntime(sessions, teacher_base_url=url) as runtime,
    ):
        for _ in range(3):
            label_until_done(runtime, spec_id)
        served = httpx.get(f"{url}/stats", timeout=5).json()["requests"]

    items = _items(sessions)
    busy = [(attempts, error) for _, attempts, error in items if error.startswith("teacher_busy")]
    assert busy, items  # the breaker opened and held the rest back
    assert all(attempts == 0 for attempts, _ in busy)
    assert all("circuit breaker is open" in error for _, error in busy)
    assert not [i for i in items if i.state == ItemState.FAILED and "teacher_busy" in i.last_error]
    assert served < 12 * 2  # far fewer requests than the items' retries would have sent


def test_the_ledger_matches_the_teachers_request_log_request_by_request(tmp_path: Path) -> None:
    spec = _spec(tmp_path, max_retries=6, circuit_breaker={"failures": 1000, "cooldown_s": 1})
    sessions, spec_id = _store(tmp_path, spec, 40)
    shares = {"server_error": 0.2, "rate_limit": 0.2, "reset": 0.05}
    args = _profile(tmp_path, shares=shares, retry_after_s=0)
    with (
        local_teacher("fixed", extra_args=args) as url,
        LabelRuntime(sessions, teacher_base_url=url) as runtime,
    ):
        for _ in range(5):
            label_until_done(runtime, spec_id)
        log = httpx.get(f"{url}/requests", timeout=5).json()["entries"]

    with sessions() as session:
        ledger = session.execute(
            select(TeacherCall.client_request_id, TeacherCall.request_hash, TeacherCall.status)
        ).all()
    sent = [row for row in ledger if row.status != CallStatus.CACHE_HIT]
    by_id = {row.client_request_id: row for row in sent}
    assert len(by_id) == len(sent) == len(log)  # one ledger row per request, each its own id
    for entry in log:
        row = by_id[entry["client_request_id"]]
        assert row.request_hash == entry["request_hash"]
        ok = entry["status"] == 200
        assert (row.status == CallStatus.OK) == ok, (entry, row)
    statuses = Counter(entry["status"] for entry in log)
    assert statuses[429] > 0 and statuses[200] >= 40  # the faults did happen
    assert not [row for row in sent if row.status == CallStatus.IN_FLIGHT]
