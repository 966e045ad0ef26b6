"""The labeling pipeline driven directly (``LabelRuntime.label_batch``), on both databases, against
the local teacher on loopback with a seeded fault sequence: the branches no CLI run reaches
on purpose (a repair that works and the reservations it settles, a repair the teacher fails,
a teacher that refuses the key).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker
from support import triage_body
from support.servers import serve_in_thread

from schemas.errors import BudgetExhausted, ConfigError
from stillhouse.servers.teacher.app import create_app
from stillhouse.servers.teacher.backends import make_backend
from stillhouse.servers.teacher.faults import FaultKind, FaultPlan, FaultProfile, Latency, Shares
from storage.models import (
    Budget,
    BudgetReservation,
    CallStatus,
    Item,
    ItemState,
    Label,
    SpecRow,
    TeacherCall,
    Verdict,
)
from workers.ingest import SourceRow, load_source
from workers.pipeline import LabelRuntime
from workers.spec import parse_spec


def seed_for(shares: dict[str, float], wanted: list[FaultKind | None]) -> int:
    """A fault seed whose first requests get exactly ``wanted`` (None: a clean answer)."""
    for seed in range(10_000):
        plan = FaultPlan(FaultProfile(seed=seed, shares=Shares(**shares)))
        if [plan.decide(n).kind for n in range(len(wanted))] == wanted:
            return seed
    raise AssertionError(f"no seed gives {wanted}")


@contextmanager
def teacher(profile: FaultProfile | None = None, api_key: str | None = None) -> Iterator[str]:
    app = create_app(make_backend("fixed", latency_ms=5), faults=profile, api_key=api_key)
    with serve_in_thread(app) as root:
        yield f"{root}/v1"


def one_item(sessions: sessionmaker[Session], **teacher: Any) -> int:
    """The triage spec (one ticket, a budget, one repair round); its spec id."""
    body = triage_body()
    body["name"] = "pipeline"
    body["teacher"].update(concurrency=1, timeout_s=5, max_retries=0, **teacher)
    body["checks"].update(require_known_good_match=False, repair_attempts=1)
    body["budget_usd"] = 10.0
    spec = parse_spec(body, source="pipeline.yaml")
    load_source(sessions, spec, [SourceRow(1, {"id": "t1", "headline": "h", "body": "jam"})])
    with sessions() as session:
        spec_id = session.scalar(select(SpecRow.id).where(SpecRow.name == "pipeline"))
    assert spec_id is not None
    return int(spec_id)


def test_a_repaired_answer_is_labeled_and_both_reservations_settle(
    sessions: sessionmaker[Session],
) -> None:
    spec_id = one_item(sessions)
    seed = seed_for({"truncated": 0.5}, [FaultKind.TRUNCATED, None])
    profile = FaultProfile(seed=seed, shares=Shares(truncated=0.5))
    with teacher(profile) as url, LabelRuntime(sessions, teacher_base_url=url) as runtime:
        summary = runtime.label_batch(spec_id)
        assert httpx.get(f"{url}/stats").json()["requests"] == 2  # the answer, then the repair
    assert (summary.labeled, summary.accepted, summary.teacher_calls) == (1, 1, 2)
    with sessions() as session:
        (label,) = session.scalars(select(Label)).all()
        calls = session.scalars(select(TeacherCall)).all()
        budget = session.get(Budget, "pipeline")
        reservations = session.scalar(select(func.count()).select_from(BudgetReservation))
    assert label.verdict == Verdict.ACCEPTED and label.output is not None
    assert [c.status for c in calls] == [CallStatus.OK, CallStatus.OK]
    # One reservation per round, both replaced by what the two calls really cost.
    assert reservations == 0
    assert budget is not None
    assert budget.spent_usd == pytest.approx(sum(c.cost_usd for c in calls))
    assert budget.spent_usd == pytest.approx(summary.spent_usd) and summary.spent_usd > 0


def test_a_repair_the_teacher_fails_is_rejected_as_repair_failed(
    sessions: sessionmaker[Session],
) -> None:
    spec_id = one_item(sessions)
    shares = {"truncated": 0.5, "server_error": 0.5}
    seed = seed_for(shares, [FaultKind.TRUNCATED, FaultKind.SERVER_ERROR])
    profile = FaultProfile(seed=seed, shares=Shares(**shares))
    with teacher(profile) as url, LabelRuntime(sessions, teacher_base_url=url) as runtime:
        summary = runtime.label_batch(spec_id)
    assert (summary.labeled, summary.accepted) == (1, 0)
    with sessions() as session:
        (label,) = session.scalars(select(Label)).all()
        item = session.scalars(select(Item)).one()
    assert label.verdict == Verdict.REJECTED
    assert "repair_failed" in label.reasons
    assert item.state == ItemState.REJECTED


def test_a_refused_key_stops_the_run_and_refunds_the_attempt(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIPELINE_TEST_KEY", "not-the-key")
    spec_id = one_item(sessions, api_key_env="PIPELINE_TEST_KEY")
    with (
        teacher(api_key="the-key") as url,
        LabelRuntime(sessions, teacher_base_url=url) as runtime,
        pytest.raises(ConfigError, match="401"),
    ):
        runtime.label_batch(spec_id)
    with sessions() as session:
        item = session.scalars(select(Item)).one()
        assert session.scalars(select(Label)).all() == []
    # Not the item's fault: back to pending with its attempt, and the error on it.
    assert (item.state, item.attempts, item.lease_owner) == (ItemState.PENDING, 0, None)
    assert item.last_error is not None and "401" in item.last_error
    assert item.last_error_kind == "config"  # what `backfill` decides on, not the text


def test_a_budget_that_runs_out_before_the_repair_leaves_the_item_waiting(
    sessions: sessionmaker[Session],
) -> None:
    """The first answer is cut short (repairable); while it is out, the budget is lowered
    (it is read fresh for every round) so the re-ask cannot be paid: the item goes back to
    pending with its attempt, the run stops with the budget error, and the paid call is on
    the ledger and the budget. It used to be rejected for a flaw the re-ask would fix."""
    spec_id = one_item(sessions)
    seed = seed_for({"truncated": 0.5}, [FaultKind.TRUNCATED, None])
    profile = FaultProfile(seed=seed, shares=Shares(truncated=0.5), latency=Latency(ms=500))
    outcome: dict[str, BaseException] = {}
    with teacher(profile) as url, LabelRuntime(sessions, teacher_base_url=url) as runtime:

        def batch() -> None:
            try:
                runtime.label_batch(spec_id)
            except BaseException as exc:  # the assertion below says which
                outcome["error"] = exc

        worker = threading.Thread(target=batch, daemon=True)
        worker.start()
        deadline = time.monotonic() + 15
        while httpx.get(f"{url}/stats").json()["requests"] < 1:
            assert time.monotonic() < deadline, "the first call never reached the teacher"
            time.sleep(0.01)
        with sessions.begin() as session:
            session.execute(update(SpecRow).values(budget_usd=1e-9))
        worker.join(timeout=30)
        assert httpx.get(f"{url}/stats").json()["requests"] == 1  # no re-ask went out
    assert isinstance(outcome.get("error"), BudgetExhausted)
    with sessions() as session:
        item = session.scalars(select(Item)).one()
        assert session.scalars(select(Label)).all() == []
        calls = session.scalars(select(TeacherCall)).all()
        budget = session.get(Budget, "pipeline")
    assert (item.state, item.attempts) == (ItemState.PENDING, 0)
    assert item.last_error is not None and item.last_error_kind == "budget"
    assert [c.status for c in calls] == [CallStatus.OK]
    assert budget is not None and budget.spent_usd == pytest.approx(calls[0].cost_usd)


def test_a_jury_the_budget_cannot_cover_asks_none_of_its_teachers_for_that_item(
    sessions: sessionmaker[Session],
) -> None:
    """Two items, each asked of the primary and one juror (four calls); the budget covers
    three. The first item gets both its votes; the second gets none (a jury short of a vote
    would reject a good label): it stays pending with its attempt, the run stops with the
    budget error, and nothing is reserved afterwards."""
    body = triage_body()
    # What a call reserves is its whole output allowance: $1 a token, 64 tokens, $64 a call.
    price = {"input_per_mtok": 0.0, "output_per_mtok": 1_000_000.0}
    body["name"] = "pipeline_jury"
    body["teacher"].update(
        concurrency=1, timeout_s=5, max_retries=0, max_output_tokens=64, price=price
    )
    body["checks"].update(require_known_good_match=False, repair_attempts=0)
    body["labeling"]["batch_size"] = 2
    body["budget_usd"] = 3 * 64.0
    with teacher() as url:
        body["jury"] = {
            "teachers": [
                {
                    "provider": "openai",
                    "base_url": url,
                    "model": "a-juror",
                    "timeout_s": 5,
                    "max_retries": 0,
                    "max_output_tokens": 64,
                    "price": price,
                }
            ],
            "min_agreement": 1.0,
        }
        spec = parse_spec(body, source="pipeline_jury.yaml")
        load_source(
            sessions,
            spec,
            [
                SourceRow(1, {"id": "t1", "headline": "h", "body": "jam"}),
                SourceRow(2, {"id": "t2", "headline": "h", "body": "late"}),
            ],
        )
        with sessions() as session:
            spec_id = session.scalar(select(SpecRow.id).where(SpecRow.name == "pipeline_jury"))
        assert spec_id is not None
        with (
            LabelRuntime(sessions, teacher_base_url=url) as runtime,
            pytest.raises(BudgetExhausted),
        ):
            runtime.label_batch(int(spec_id))
        assert httpx.get(f"{url}/stats").json()["requests"] == 2  # t1's two votes, no more
    with sessions() as session:
        items = {i.external_id: i for i in session.scalars(select(Item))}
        (label,) = session.scalars(select(Label)).all()
        calls = session.scalars(select(TeacherCall)).all()
        left = session.scalar(select(func.count()).select_from(BudgetReservation))
        budget = session.get(Budget, "pipeline_jury")
    assert label.item_id == items["t1"].id and items["t1"].state == ItemState.ACCEPTED
    assert {c.item_id for c in calls} == {items["t1"].id} and len(calls) == 2
    assert (items["t2"].state, items["t2"].attempts) == (ItemState.PENDING, 0)
    assert items["t2"].last_error_kind == "budget"
    assert left == 0
    assert budget is not None and budget.spent_usd == pytest.approx(sum(c.cost_usd for c in calls))
