"""Backfills through the providers' batch APIs, against the real local teacher over HTTP
(OpenAI's Batch API and Anthropic's Message Batches, with injected failures and expiry), on
SQLite and Postgres: every item ends labeled or pending again, what failed goes out again
exactly once, the ledger (at the batch price) equals what the server counted, a restart
mid-download duplicates nothing, and a second backfill while a batch is open submits nothing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from support import triage_body

from stillhouse.servers.teacher.process import local_teacher
from storage.models import (
    CallStatus,
    Item,
    ItemState,
    Label,
    SpecRow,
    TeacherBatch,
    TeacherBatchRequest,
    TeacherCall,
)
from storage.session import make_engine, make_sessionmaker
from workers.batch_api import BatchResult
from workers.batches import BatchRunner, _store_results, wait_until_done
from workers.ingest import load_source, read_source
from workers.pipeline import LabelRuntime
from workers.spec import Spec, parse_spec

FAST = ["--latency-ms", "0"]


def _spec(provider: str, base_url: str, **batch: Any) -> Spec:
    body = triage_body()
    body["name"] = "batched"
    body["teacher"]["provider"] = provider
    body["teacher"]["base_url"] = base_url
    body["labeling"] = {"mode": "batch", "batch": {"poll_s": 0.2, **batch}}
    return parse_spec(body, source="batched.yaml")


def _load(sessions: sessionmaker[Session], spec: Spec, n: int) -> int:
    load_source(sessions, spec, read_source("bbc", limit=n))
    with sessions() as session:
        spec_id = session.scalar(select(SpecRow.id).where(SpecRow.name == spec.name))
    assert spec_id is not None
    return int(spec_id)


def _stats(base_url: str) -> dict[str, Any]:
    return dict(httpx.get(f"{base_url}/stats").json())


def _run(sessions: sessionmaker[Session], spec: Spec, spec_id: int) -> Any:
    with LabelRuntime(sessions) as runtime:
        runner = BatchRunner(
            sessions, spec_id, spec, label=lambda ids: runtime.label_batch(spec_id, item_ids=ids)
        )
        try:
            return wait_until_done(runner, timeout_s=120)
        finally:
            runner.close()


def _ledger(session: Session, spec_id: int) -> list[TeacherCall]:
    return list(session.scalars(select(TeacherCall).where(TeacherCall.spec_id == spec_id)))


@pytest.fixture(params=["openai", "anthropic"])
def provider(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def faulty_teacher() -> Iterator[str]:
    """Fails 20 % and expires 10 % of the first batch's requests; later batches are clean."""
    args = [*FAST, "--batch-fail-share", "0.2", "--batch-expire-share", "0.1"]
    args += ["--batch-faulty-batches", "1", "--batch-in-progress-s", "0.2"]
    with local_teacher("fixed", extra_args=args) as url:
        yield url


def test_failed_and_expired_requests_go_out_again_exactly_once_and_the_ledger_matches(
    sessions: sessionmaker[Session], faulty_teacher: str, provider: str
) -> None:
    httpx.post(f"{faulty_teacher}/stats/reset")
    spec = _spec(provider, faulty_teacher)
    spec_id = _load(sessions, spec, 60)
    _run(sessions, spec, spec_id)
    with sessions() as session:
        states = dict(
            session.execute(
                select(Item.state, func.count()).where(Item.spec_id == spec_id).group_by(Item.state)
            ).all()
        )
        batches = list(
            session.scalars(
                select(TeacherBatch)
                .where(TeacherBatch.spec_id == spec_id)
                .order_by(TeacherBatch.id)
            )
        )
        labels = session.scalar(select(func.count()).where(Label.spec_id == spec_id))
        ledger = _ledger(session, spec_id)
        items = session.scalar(select(func.count()).where(Item.spec_id == spec_id))
    assert set(states) <= {ItemState.ACCEPTED, ItemState.REJECTED}, states
    assert labels == items
    first, second = batches
    assert first.failed == round(0.2 * first.requests) and first.expired == round(
        0.1 * first.requests
    )
    # What failed or expired went out again, once, in one more batch, and all of it came back.
    assert second.requests == first.failed + first.expired
    assert second.succeeded == second.requests and second.failed == second.expired == 0
    assert all(b.step == "done" for b in batches)
    served = _stats(faulty_teacher)["batch"]
    ok = [c for c in ledger if c.status == CallStatus.OK]
    errors = [c for c in ledger if c.status == CallStatus.ERROR]
    assert (
        served["requests"]
        == len(ok) + len(errors)
        == first.requests + second.requests - first.expired
    )
    assert len(errors) == first.failed and served["expired"] == first.expired
    assert len({c.client_request_id for c in ledger}) == len(ledger)
    # Priced at half the live price, and the budget counts exactly the ledger's spend.
    for call in ok:
        live = spec.teacher.cost_usd(call.prompt_tokens, call.completion_tokens)
        assert call.cost_usd == pytest.approx(live * 0.5, rel=1e-6) and call.cost_usd > 0
    assert sum(b.spent_usd for b in batches) == pytest.approx(sum(c.cost_usd for c in ok))
    assert _stats(faulty_teacher)["requests"] == 0  # nothing went live


def test_retry_live_sends_what_failed_as_live_calls(
    sessions: sessionmaker[Session], faulty_teacher: str
) -> None:
    httpx.post(f"{faulty_teacher}/stats/reset")
    spec = _spec("openai", faulty_teacher, retry="live")
    spec_id = _load(sessions, spec, 40)
    total = _run(sessions, spec, spec_id)
    with sessions() as session:
        batches = list(session.scalars(select(TeacherBatch).where(TeacherBatch.spec_id == spec_id)))
        labels = session.scalar(select(func.count()).where(Label.spec_id == spec_id))
        items = session.scalar(select(func.count()).where(Item.spec_id == spec_id))
    assert len(batches) == 1
    assert total.live_labeled == batches[0].failed + batches[0].expired > 0
    assert labels == items
    assert _stats(faulty_teacher)["completions"] == total.live_labeled


def test_an_unknown_custom_id_is_ignored_and_a_repeated_result_changes_nothing(
    sessions: sessionmaker[Session],
) -> None:
    spec = _spec("openai", "http://127.0.0.1:9/v1")
    spec_id = _load(sessions, spec, 3)
    with sessions.begin() as session:
        item = session.scalars(select(Item).where(Item.spec_id == spec_id)).first()
        assert item is not None
        batch = TeacherBatch(
            spec_id=spec_id,
            spec_name=spec.name,
            provider="openai",
            base_url="x",
            model="m",
            key="k" * 32,
            step="downloading",
            requests=1,
            size_bytes=0,
            succeeded=0,
            failed=0,
            expired=0,
            price_factor=0.5,
            reserved_usd=0.0,
            spent_usd=0.0,
        )
        session.add(batch)
        session.flush()
        session.add(
            TeacherBatchRequest(
                batch_id=batch.id,
                item_id=item.id,
                request_hash="a" * 64,
                state="waiting",
                prompt_tokens=0,
                completion_tokens=0,
            )
        )
        batch_id = batch.id
    answer = {"choices": [{"message": {"content": "{}"}}], "usage": {"prompt_tokens": 3}}
    with sessions.begin() as session:
        got = _store_results(
            session,
            batch_id,
            [
                BatchResult("a" * 64, "succeeded", answer, 200),
                BatchResult("b" * 64, "succeeded", answer, 200),
            ],
        )
    assert got == (1, 1)
    with sessions.begin() as session:
        again = _store_results(session, batch_id, [BatchResult("a" * 64, "failed", None, 500)])
        row = session.scalars(select(TeacherBatchRequest)).one()
    assert again == (0, 0) and row.state == "succeeded" and row.prompt_tokens == 3


def test_the_dispatcher_leaves_a_batch_mode_spec_alone(sessions: sessionmaker[Session]) -> None:
    from storage.leases import claim_ready

    spec = _spec("openai", "http://127.0.0.1:9/v1")
    spec_id = _load(sessions, spec, 5)
    with sessions.begin() as session:
        assert claim_ready(session) == {}
        session.execute(
            SpecRow.__table__.update().where(SpecRow.id == spec_id).values(labeling_mode="live")
        )
    with sessions.begin() as session:
        assert len(claim_ready(session)[spec_id]) == 5


# -- through the CLI, as a user runs it -------------------------------------------------------


def _env(db: str, teacher: str) -> dict[str, str]:
    return {
        **os.environ,
        "STILLHOUSE_DATABASE_URL": db,
        "STILLHOUSE_BROKER_URL": "",
        "STILLHOUSE_TEACHER_BASE_URL": teacher,
        "STILLHOUSE_BATCH_POLL_S": "0.2",
        "STILLHOUSE_BATCH_RESULT_CHUNK": "10",  # a commit every 10 lines: killable mid-way
    }


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stillhouse", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def _spec_file(tmp_path: Path, provider: str = "openai") -> Path:
    body = triage_body()
    body["name"] = "batched"
    body["teacher"]["provider"] = provider
    path = tmp_path / "batched.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_killing_the_poller_mid_download_duplicates_nothing(
    tmp_path: Path, database_url: str
) -> None:
    args = [*FAST, "--batch-in-progress-s", "0.2", "--batch-result-delay-s", "0.03"]
    with local_teacher("fixed", extra_args=args) as teacher:
        env = _env(database_url, teacher)
        spec = str(_spec_file(tmp_path))
        if database_url.startswith("postgresql"):
            assert _cli(env, "db", "upgrade").returncode == 0
        submitted = _cli(
            env,
            "backfill",
            "bbc",
            "--spec",
            spec,
            "--limit",
            "120",
            "--mode",
            "batch",
            "--no-wait",
            "--json",
        )
        assert submitted.returncode == 0, submitted.stderr
        assert json.loads(submitted.stdout)["batches_submitted"] == 1
        sessions = make_sessionmaker(make_engine(database_url))
        poller = subprocess.Popen(
            [sys.executable, "-m", "stillhouse", "batches", "poll", "--spec", "batched"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 60
        received = 0
        while time.monotonic() < deadline and received < 20:
            time.sleep(0.1)
            with sessions() as session:
                received = int(
                    session.scalar(
                        select(func.count()).where(TeacherBatchRequest.state == "succeeded")
                    )
                    or 0
                )
        poller.send_signal(signal.SIGKILL)
        poller.wait()
        with sessions() as session:
            step = session.scalar(select(TeacherBatch.step))
            assert step == "downloading", step  # killed mid-download
        done = _cli(env, "batches", "poll", "--spec", "batched", "--json")
        assert done.returncode == 0, done.stderr
        served = _stats(teacher)["batch"]
        with sessions() as session:
            items = session.scalar(select(func.count()).select_from(Item))
            labels = session.scalar(select(func.count()).select_from(Label))
            ledger = list(session.scalars(select(TeacherCall)))
            states = set(session.scalars(select(Item.state)))
        assert labels == items and states <= {ItemState.ACCEPTED, ItemState.REJECTED}
        assert len(ledger) == served["requests"] == served["succeeded"]
        assert len({c.client_request_id for c in ledger}) == len(ledger)
        assert _stats(teacher)["requests"] == 0
        sessions.kw["bind"].dispose()


def test_a_second_backfill_while_a_batch_is_open_submits_nothing_new(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/b.db"
    with local_teacher("fixed", extra_args=[*FAST, "--batch-in-progress-s", "3"]) as teacher:
        env = _env(db, teacher)
        spec = str(_spec_file(tmp_path, "anthropic"))
        first = _cli(
            env,
            "backfill",
            "bbc",
            "--spec",
            spec,
            "--limit",
            "30",
            "--mode",
            "batch",
            "--no-wait",
            "--json",
        )
        assert first.returncode == 0, first.stderr
        again = _cli(
            env,
            "backfill",
            "bbc",
            "--spec",
            spec,
            "--limit",
            "30",
            "--mode",
            "batch",
            "--no-wait",
            "--json",
        )
        assert again.returncode == 0, again.stderr
        assert json.loads(first.stdout)["batches_submitted"] == 1
        assert json.loads(again.stdout)["batches_submitted"] == 0
        listed = json.loads(_cli(env, "batches", "--json").stdout)
        assert len(listed) == 1 and listed[0]["step"] == "submitted"
        done = _cli(env, "batches", "poll", "--json")
        assert done.returncode == 0, done.stderr
        status = json.loads(_cli(env, "status", "--json").stdout)
        assert status["by_state"]["batched"] == 0 and status["by_state"]["pending"] == 0
        assert _stats(teacher)["batch"]["batches"] == 1
        estimate = json.loads(
            _cli(env, "estimate", "bbc", "--spec", spec, "--limit", "60", "--json").stdout
        )
        assert estimate["batch"]["cost_usd"] == pytest.approx(estimate["cost_usd"] * 0.5, abs=2e-4)
        assert "finished batches" in " ".join(estimate["assumptions"])


@pytest.mark.parametrize("provider_name", ["openai", "anthropic"])
def test_a_poller_that_died_while_creating_finds_its_batch_instead_of_paying_twice(
    sqlite_url: str, provider_name: str
) -> None:
    from datetime import UTC, datetime, timedelta

    sessions = make_sessionmaker(make_engine(sqlite_url))
    with local_teacher("fixed", extra_args=[*FAST, "--batch-in-progress-s", "1"]) as teacher:
        spec = _spec(provider_name, teacher)
        spec_id = _load(sessions, spec, 10)
        runner = BatchRunner(sessions, spec_id, spec)
        assert runner.submit().submitted_batches == 1
        with sessions.begin() as session:
            batch = session.scalars(select(TeacherBatch)).one()
            created = batch.provider_batch_id
            # As if the process died right after the provider created the batch and before
            # the database heard of it (and long enough ago for the grace period to pass).
            batch.step, batch.provider_batch_id = "creating", None
            batch.creating_at = datetime.now(UTC) - timedelta(minutes=5)
        total = wait_until_done(runner, timeout_s=60)
        runner.close()
        with sessions() as session:
            batch = session.scalars(select(TeacherBatch)).one()
        assert batch.provider_batch_id == created and batch.step == "done"
        assert total.received == batch.requests == batch.succeeded
        assert _stats(teacher)["batch"]["batches"] == 1  # created once
    sessions.kw["bind"].dispose()


def test_the_budget_is_reserved_at_the_batch_price_and_stops_submission(
    sessions: sessionmaker[Session],
) -> None:
    from storage.budget import budget_state

    with local_teacher("fixed", extra_args=[*FAST, "--batch-in-progress-s", "0.1"]) as teacher:
        body = triage_body()
        body["name"] = "batched"
        body["teacher"]["base_url"] = teacher
        body["budget_usd"] = 0.0005
        body["labeling"] = {"mode": "batch", "batch": {"poll_s": 0.2}}
        spec = parse_spec(body, source="budgeted.yaml")
        spec_id = _load(sessions, spec, 10)
        runner = BatchRunner(sessions, spec_id, spec)
        first = runner.submit()
        assert 0 < first.submitted_requests < 10
        assert first.budget_error is not None and "budget_usd" in first.budget_error
        with sessions() as session:
            reserved = budget_state(session, spec.name).reserved_usd
            pending = session.scalar(select(func.count()).where(Item.state == ItemState.PENDING))
        assert 0 < reserved <= 0.0005 and pending == 10 - first.submitted_requests
        wait_until_done(runner, timeout_s=60)
        runner.close()
        with sessions() as session:
            state = budget_state(session, spec.name)
        assert state.reserved_usd == 0 and 0 < state.spent_usd <= 0.0005
