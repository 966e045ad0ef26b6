"""A jury of real local teacher servers labels BBC articles through the real pipeline and HTTP
path: the votes decide the labels, every call to every teacher is in the ledger (as many rows
as each server counted requests), and a relabel asks no teacher again for what it answered."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import yaml
from sqlalchemy import delete, select, update
from support import triage_body
from support.clitools import embedded_env, run_cli

from stillhouse.servers.teacher.process import local_teacher
from storage.models import CallStatus, Item, ItemState, Label, TeacherCall, TeacherResponse
from storage.session import make_engine, make_sessionmaker
from workers.prompt import render_messages
from workers.spec import Spec, load_spec
from workers.teacher import build_request

ITEMS = 12
FAST = ["--latency-ms", "5"]


def _spec(tmp_path: Path, jurors: list[dict[str, Any]], *, require_match: bool) -> Spec:
    body = triage_body()
    body["teacher"].update(timeout_s=10, max_retries=2, concurrency=4)
    body["checks"].update(require_known_good_match=require_match, withhold_share=0)
    body["jury"] = {"teachers": jurors, "min_agreement": 0.6}
    path = tmp_path / "jury.yaml"
    path.write_text(yaml.safe_dump(body))
    return load_spec(str(path))


def _backfill(db: str, primary_url: str, spec: Spec) -> dict[str, Any]:
    # STILLHOUSE_TEACHER_BASE_URL points the primary teacher at its server; the jury
    # teachers keep the base URLs their spec entries give.
    run = run_cli(
        embedded_env(db, primary_url),
        *("backfill", "bbc", "--spec", spec.source, "--limit", str(ITEMS), "--json"),
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    summary: dict[str, Any] = json.loads(run.stdout)
    return summary


def _stored(db: str) -> dict[str, Any]:
    engine = make_engine(db)
    with make_sessionmaker(engine)() as session:
        labels = {
            row.external_id: row
            for row in session.execute(
                select(
                    Item.external_id,
                    Item.text,
                    Item.payload,
                    Label.output,
                    Label.verdict,
                    Label.reasons,
                    Label.problems,
                    Label.agreement,
                    Label.request_hash,
                ).join(Label, Label.item_id == Item.id)
            )
        }
        calls = session.execute(select(TeacherCall.request_hash, TeacherCall.status)).all()
        responses = dict(
            session.execute(select(TeacherResponse.request_hash, TeacherResponse.response)).all()
        )
    engine.dispose()
    return {"labels": labels, "calls": calls, "responses": responses}


def _hashes(spec: Spec, texts: list[str]) -> dict[str, set[str]]:
    """Each teacher's request hashes for these items (what its ledger rows are keyed by)."""
    return {
        teacher.model: {
            build_request(
                teacher, render_messages(spec, text), spec.output_schema, spec.schema_name
            ).request_hash
            for text in texts
        }
        for teacher in spec.teachers
    }


def _paid(calls: list[Any], hashes: set[str]) -> int:
    return sum(1 for c in calls if c.request_hash in hashes and c.status != CallStatus.CACHE_HIT)


def _stats(url: str) -> dict[str, Any]:
    stats: dict[str, Any] = httpx.get(f"{url}/stats", timeout=5).json()
    return stats


def _relabel(db: str) -> None:
    """Lose every label (as a relabel of the same definition would start): items pending."""
    engine = make_engine(db)
    with make_sessionmaker(engine).begin() as session:
        session.execute(delete(Label))
        session.execute(update(Item).values(state=ItemState.PENDING, attempts=0))
    engine.dispose()


def _content(body: dict[str, Any]) -> dict[str, Any]:
    content: dict[str, Any] = json.loads(body["choices"][0]["message"]["content"])
    return content


def test_three_teachers_vote_failures_disagree_and_every_call_is_ledgered(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/jury.db"
    with ExitStack() as stack:
        primary = stack.enter_context(local_teacher("fixed", extra_args=FAST))
        # A second opinion that is wrong about half the time, and one that is always down.
        noisy = stack.enter_context(
            local_teacher("fixed", extra_args=[*FAST, "--fault", "wrong=0.5", "--seed", "3"])
        )
        down = stack.enter_context(
            local_teacher("fixed", extra_args=[*FAST, "--fault", "server_error=1"])
        )
        spec = _spec(
            tmp_path,
            [
                {"model": "fixed-noisy", "base_url": noisy, "concurrency": 4},
                {
                    "model": "fixed-down",
                    "base_url": down,
                    "max_retries": 1,
                    "concurrency": 4,
                    "circuit_breaker": {"failures": 1000, "cooldown_s": 1},
                },
            ],
            require_match=False,
        )
        summary = _backfill(db, primary, spec)
        served = {"primary": _stats(primary), "noisy": _stats(noisy), "down": _stats(down)}
        first = _stored(db)

        labels = first["labels"]
        assert len(labels) == ITEMS and summary["labeled"] == ITEMS
        by_model = _hashes(spec, [row.text for row in labels.values()])
        # Every request each server received is one ledger row for its teacher.
        assert _paid(first["calls"], by_model["minilm-zero-shot"]) == served["primary"]["requests"]
        assert _paid(first["calls"], by_model["fixed-noisy"]) == served["noisy"]["requests"]
        assert _paid(first["calls"], by_model["fixed-down"]) == served["down"]["requests"]
        assert served["primary"]["requests"] == served["noisy"]["requests"] == ITEMS
        assert served["down"]["requests"] == 2 * ITEMS  # each call tried twice, then given up
        assert summary["teacher_calls"] == 4 * ITEMS

        wrong = served["noisy"]["faults"]["wrong"]
        assert 0 < wrong < ITEMS
        low = [row for row in labels.values() if "low_agreement" in row.reasons]
        # The fixed primary always answers the first queue; the noisy teacher agrees unless
        # its answer was spoiled; the teacher that is down agrees with nobody.
        assert len(low) == wrong
        for row in labels.values():
            assert row.output["label"] == "business"
            assert row.request_hash in by_model["minilm-zero-shot"]  # a tie goes to the primary
            if row in low:
                assert row.agreement == 0.3333 and row.verdict == "rejected"
                (problem,) = row.problems
                assert problem["message"].startswith(
                    "1 of 3 teachers give this answer, below jury.min_agreement 0.6 "
                    '(minilm-zero-shot: "business"; fixed-noisy: "'
                )
                assert problem["message"].endswith("fixed-down: no usable answer (unavailable))")
            else:
                assert row.agreement == 0.6667 and row.verdict == "accepted"
                assert row.reasons == [] and row.problems is None

        # The same run again: everything is labeled, nothing is asked.
        again = _backfill(db, primary, spec)
        assert again["teacher_calls"] == 0 and _stats(primary)["requests"] == ITEMS

        # A relabel of the same definition gets every answer from the cache, teacher by
        # teacher; only the failures (never cached) are asked again.
        _relabel(db)
        relabeled = _backfill(db, primary, spec)
        assert _stats(primary)["requests"] == ITEMS and _stats(noisy)["requests"] == ITEMS
        assert _stats(down)["requests"] == 4 * ITEMS
        assert relabeled["cache_hits"] == 2 * ITEMS and relabeled["teacher_calls"] == 2 * ITEMS
        second = _stored(db)
    assert {k: (r.output, r.reasons, r.agreement) for k, r in second["labels"].items()} == {
        k: (r.output, r.reasons, r.agreement) for k, r in labels.items()
    }


def test_a_jury_outvotes_a_wrong_primary_and_keeps_the_answer_it_came_from(
    tmp_path: Path,
) -> None:
    db = f"sqlite:///{tmp_path}/outvoted.db"
    with ExitStack() as stack:
        # The primary always answers the first queue; two jury teachers (one zero-shot model
        # asked under two names) classify for real.
        primary = stack.enter_context(local_teacher("fixed", extra_args=FAST))
        zero_shot = stack.enter_context(local_teacher("embedding"))
        spec = _spec(
            tmp_path,
            [
                {"model": "minilm-a", "base_url": zero_shot, "params": {"temperature": 0}},
                {"model": "minilm-b", "base_url": zero_shot, "params": {"temperature": 0}},
            ],
            require_match=True,
        )
        _backfill(db, primary, spec)
        served = {"primary": _stats(primary), "zero_shot": _stats(zero_shot)}
    stored = _stored(db)
    labels = stored["labels"]
    assert len(labels) == ITEMS
    by_model = _hashes(spec, [row.text for row in labels.values()])
    assert _paid(stored["calls"], by_model["minilm-zero-shot"]) == served["primary"]["requests"]
    jury_hashes = by_model["minilm-a"] | by_model["minilm-b"]
    assert _paid(stored["calls"], jury_hashes) == served["zero_shot"]["requests"] == 2 * ITEMS

    outvoted = 0
    for row in labels.values():
        label = row.output["label"]
        if label == "business":
            assert row.agreement == 1.0 and row.request_hash in by_model["minilm-zero-shot"]
        else:
            outvoted += 1
            assert row.agreement == 0.6667
            # The label is the jury's answer (its first teacher's), pointing at the response
            # it came from.
            assert row.request_hash in by_model["minilm-a"]
            assert _content(stored["responses"][row.request_hash]) == row.output
        assert (row.verdict == "accepted") == (label == row.payload["queue"])
    assert outvoted > 0
    # The jury turns a teacher that is right only on business into a useful one.
    right = sum(1 for row in labels.values() if row.output["label"] == row.payload["queue"])
    business = sum(1 for row in labels.values() if row.payload["queue"] == "business")
    assert right > business
