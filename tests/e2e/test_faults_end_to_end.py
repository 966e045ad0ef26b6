"""Each injected teacher fault ends the right way through the real pipeline and HTTP path:
retried, waited, rejected with the right reason code, or refused; and the call ledger
matches the requests the teacher server itself counted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import pytest
import yaml
from sqlalchemy import select
from support import triage_body

from stillhouse.servers.teacher.process import local_teacher
from storage.models import CallStatus, Item, Label, TeacherCall, TeacherResponse
from storage.session import make_engine, make_sessionmaker

ITEMS = 12


def _spec(tmp_path: Path, *, require_match: bool) -> Path:
    body = triage_body()
    body["teacher"].update(
        timeout_s=1,
        max_retries=8,
        concurrency=4,
        circuit_breaker={"failures": 1000, "cooldown_s": 1},
    )
    body["checks"]["require_known_good_match"] = require_match
    body["checks"]["withhold_share"] = 0  # every record is checked here
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def _run(tmp_path: Path, kind: str, share: float, *, require_match: bool = False) -> dict:
    profile = tmp_path / "faults.yaml"
    profile.write_text(
        yaml.safe_dump(
            {
                "seed": 11,
                "latency": 5,
                "shares": {kind: share},
                "retry_after_s": 1,
                "hang_s": 5,
                "drip_s": 5,
            }
        )
    )
    db = f"sqlite:///{tmp_path}/faults.db"
    with local_teacher("fixed", extra_args=["--faults", str(profile)]) as url:
        env = {
            **os.environ,
            "STILLHOUSE_DATABASE_URL": db,
            "STILLHOUSE_BROKER_URL": "",
            "STILLHOUSE_TEACHER_BASE_URL": url,
        }
        spec = _spec(tmp_path, require_match=require_match)
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "stillhouse",
                "backfill",
                "bbc",
                "--spec",
                str(spec),
                "--limit",
                str(ITEMS),
                "--json",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=240,
        )
        assert run.returncode == 0, run.stderr
        served = httpx.get(f"{url}/stats", timeout=5).json()
    engine = make_engine(db)
    with make_sessionmaker(engine)() as session:
        calls = session.execute(select(TeacherCall.status, TeacherCall.error_kind)).all()
        labels = session.execute(
            select(
                Label.output,
                Label.reasons,
                Label.known_good_match,
                Item.payload,
                TeacherResponse.response,
            )
            .join(Item, Item.id == Label.item_id)
            .join(TeacherResponse, TeacherResponse.request_hash == Label.request_hash)
        ).all()
    engine.dispose()
    paid = [c for c in calls if c.status != CallStatus.CACHE_HIT]
    # Every request the server received is one ledger row, and the other way round.
    assert len(paid) == served["requests"], (Counter(calls), served)
    return {
        "summary": json.loads(run.stdout),
        "served": served,
        "labels": labels,
        "errors": Counter(c.error_kind for c in paid if c.status == CallStatus.ERROR),
        "ok": sum(1 for c in paid if c.status == CallStatus.OK),
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "error_kind"),
    [
        ("rate_limit", "rate_limited"),
        ("server_error", "unavailable"),
        ("reset", "unavailable"),
        ("hang", "timeout"),
        ("slow_drip", "timeout"),
    ],
)
def test_transient_faults_are_retried_until_every_item_is_labeled(
    tmp_path: Path, kind: str, error_kind: str
) -> None:
    result = _run(tmp_path, kind, 0.3)
    assert result["served"]["faults"][kind] > 0
    assert set(result["errors"]) == {error_kind}
    assert sum(result["errors"].values()) == result["served"]["faults"][kind]
    assert result["ok"] == ITEMS - result["summary"]["cache_hits"]
    assert len(result["labels"]) == ITEMS
    assert all(not reasons for _, reasons, _, _, _ in result["labels"])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("truncated", "truncated"),
        ("refusal", "refused"),
    ],
)
def test_bad_answers_are_rejected_with_their_reason_and_kept(
    tmp_path: Path, kind: str, reason: str
) -> None:
    result = _run(tmp_path, kind, 1.0)
    assert not result["errors"]  # a bad answer is an answer: never retried as an error
    assert len(result["labels"]) == ITEMS
    assert {tuple(reasons) for _, reasons, _, _, _ in result["labels"]} == {(reason,)}
    # A cut answer is re-asked once (and cut again); a refusal is not a format problem.
    assert result["ok"] == (2 * ITEMS if kind == "truncated" else ITEMS)


@pytest.mark.slow
def test_wrong_answers_are_caught_by_the_known_good_records(tmp_path: Path) -> None:
    result = _run(tmp_path, "wrong", 1.0, require_match=True)
    # The fixed teacher's own answer is the first queue; "wrong" always answers another one.
    assert all(output["label"] != "business" for output, _, _, _, _ in result["labels"])
    business = [row for row in result["labels"] if row[3]["queue"] == "business"]
    assert business and all(
        match is False and reasons == ["known_good_mismatch:label"]
        for _, reasons, match, _, _ in business
    )


@pytest.mark.slow
def test_malformed_answers_are_re_asked_once_then_rejected_unless_only_fenced(
    tmp_path: Path,
) -> None:
    result = _run(tmp_path, "malformed", 1.0)
    assert not result["errors"]
    assert len(result["labels"]) == ITEMS
    outcomes: Counter[bool] = Counter()
    for _, reasons, _, _, raw in result["labels"]:
        content = raw["choices"][0]["message"]["content"]
        # A Markdown fence around valid JSON is what real models do: it is parsed, not lost.
        fenced = content.startswith("```json")
        assert reasons == ([] if fenced else ["parse_error"]), content
        outcomes[fenced] += 1
    assert outcomes[False] > 0
    # Every unusable first answer was re-asked once (each re-ask is a paid, ledgered call):
    # at least the items still unusable at the end were, and no item twice. (A re-ask can
    # come back fenced, and then it is labeled.)
    assert ITEMS + outcomes[False] <= result["ok"] <= 2 * ITEMS


@pytest.mark.slow
def test_a_re_ask_repairs_answers_that_were_broken_only_sometimes(tmp_path: Path) -> None:
    result = _run(tmp_path, "truncated", 0.5)
    repaired = result["ok"] - ITEMS
    assert repaired > 0  # some first answers were cut and re-asked
    rejected = [reasons for _, reasons, _, _, _ in result["labels"] if reasons]
    # Only items whose re-ask was cut as well stay rejected.
    assert len(rejected) < repaired
    assert all(reasons == ["truncated"] for reasons in rejected)


def _backfill(env: dict[str, str], spec: Path, limit: int) -> dict:
    args = ["backfill", "bbc", "--spec", str(spec), "--limit", str(limit), "--json"]
    run = subprocess.run(
        [sys.executable, "-m", "stillhouse", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=240,
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def _named(tmp_path: Path, name: str) -> Path:
    body = triage_body()
    body["name"] = name
    body["checks"]["require_known_good_match"] = False
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


@pytest.mark.slow
def test_a_second_spec_asking_the_same_question_is_answered_from_the_cache(
    tmp_path: Path,
) -> None:
    # The spec's name and version used to be in the request (the schema's name): every spec
    # paid for its own copy of the same answers.
    db = {"STILLHOUSE_DATABASE_URL": f"sqlite:///{tmp_path}/c.db", "STILLHOUSE_BROKER_URL": ""}
    with local_teacher("fixed", extra_args=["--latency-ms", "5"]) as url:
        env = {**db, "STILLHOUSE_TEACHER_BASE_URL": url}
        first = _backfill(env, _named(tmp_path, "triage_a"), ITEMS)
        second = _backfill(env, _named(tmp_path, "triage_b"), ITEMS)
        served = httpx.get(f"{url}/stats", timeout=5).json()
    assert first["teacher_calls"] == ITEMS and first["cache_hits"] == 0
    assert second["teacher_calls"] == 0 and second["cache_hits"] == ITEMS
    assert served["completions"] == ITEMS


@pytest.mark.slow
def test_a_refused_or_truncated_answer_is_kept_but_never_replayed(tmp_path: Path) -> None:
    db = {"STILLHOUSE_DATABASE_URL": f"sqlite:///{tmp_path}/r.db", "STILLHOUSE_BROKER_URL": ""}
    profile = tmp_path / "refuse.yaml"
    profile.write_text(yaml.safe_dump({"seed": 1, "latency": 5, "shares": {"refusal": 1.0}}))
    with local_teacher("fixed", extra_args=["--faults", str(profile)]) as url:
        refused = _backfill({**db, "STILLHOUSE_TEACHER_BASE_URL": url}, _named(tmp_path, "a"), 6)
    with local_teacher("fixed", extra_args=["--latency-ms", "5"]) as url:
        env = {**db, "STILLHOUSE_TEACHER_BASE_URL": url}
        asked_again = _backfill(env, _named(tmp_path, "b"), 6)
        replayed = _backfill(env, _named(tmp_path, "c"), 6)
    assert refused["accepted"] == 0 and refused["teacher_calls"] == 6
    # The same requests: the refusals were kept for their labels, not replayed.
    assert asked_again["cache_hits"] == 0 and asked_again["teacher_calls"] == 6
    assert asked_again["accepted"] == 6
    # The good answers replaced them in the cache.
    assert replayed["cache_hits"] == 6 and replayed["teacher_calls"] == 0
    engine = make_engine(db["STILLHOUSE_DATABASE_URL"])
    with make_sessionmaker(engine)() as session:
        kept = session.scalars(select(Label.reasons).join(Item).where(Item.spec_name == "a"))
        assert all(reasons == ["refused"] for reasons in kept)
    engine.dispose()
