"""`stillhouse route serve` end to end: a bag student trained on BBC triage labels from a real
local teacher on loopback, served over HTTP with the same teacher as its fallback; the
fallbacks become items and labels of the spec, and only the kept ones reach a dataset."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from pydantic import SecretStr
from support.clitools import embedded_env, run_cli
from support.servers import serve_in_thread

from examples.bbc import iter_bbc
from stillhouse.router import Router
from stillhouse.servers.router.app import RouterLimits, create_app
from stillhouse.settings import Settings

pytestmark = pytest.mark.slow

LIMIT = 300
TOKEN = "router-secret"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A database with 300 BBC articles labeled for triage, one trained run, the teacher."""
    from stillhouse.servers.teacher.process import local_teacher

    folder = tmp_path_factory.mktemp("router")
    with local_teacher("embedding") as url:
        db = f"sqlite:///{folder}/router.db"
        env = {**embedded_env(db, url), "STILLHOUSE_RUNS_DIR": f"{folder}/runs"}
        run = run_cli(env, "backfill", "bbc", "--spec", "triage", "--limit", str(LIMIT))
        assert run.returncode == 0, run.stderr
        trained = run_cli(env, "train", "--spec", "triage", "--json")
        assert trained.returncode == 0, trained.stderr
        settings = Settings(
            database_url=db,
            broker_url=None,
            teacher_base_url=url,
            runs_dir=Path(f"{folder}/runs"),
            api_tokens=[SecretStr(TOKEN)],
        )
        yield {"env": env, "db": db, "run": json.loads(trained.stdout)["run"], "settings": settings}


def _fresh_articles(n: int) -> list[str]:
    """BBC articles past the ones labeled (the student never saw them)."""
    rows = list(iter_bbc(LIMIT + n))[LIMIT:]
    return [f"{row['headline']}\n\n{row['body']}" for row in rows]


def _items(db: str) -> list[dict[str, Any]]:
    engine = sa.create_engine(db)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT i.external_id, i.trainable, i.state, l.verdict FROM items i "
                "LEFT JOIN labels l ON l.item_id = i.id WHERE i.external_id LIKE 'routed:%'"
            )
        )
        out = [dict(row._mapping) for row in rows]
    engine.dispose()
    return out


def test_the_router_answers_with_the_student_and_the_teacher_over_http(
    trained: dict[str, Any],
) -> None:
    texts = _fresh_articles(120)
    with Router.open(trained["settings"], trained["run"]) as router:
        app = create_app(router, tokens=[SecretStr(TOKEN)], limits=RouterLimits(200_000, 50))
        with serve_in_thread(app) as base, httpx.Client(base_url=base, timeout=60) as client:
            auth = {"Authorization": f"Bearer {TOKEN}"}
            assert client.post("/v1/predict", json={"inputs": texts[:2]}).status_code == 401
            too_many = client.post("/v1/predict", json={"inputs": texts[:51]}, headers=auth)
            assert too_many.status_code == 413 and "split them" in too_many.text

            answers: list[dict[str, Any]] = []
            for start in range(0, 100, 50):
                reply = client.post(
                    "/v1/predict", json={"inputs": texts[start : start + 50]}, headers=auth
                )
                assert reply.status_code == 200, reply.text
                answers += reply.json()["answers"]
            who = [a["answered_by"] for a in answers]
            print(json.dumps({"router_http": {"teacher": who.count("teacher"), "of": len(who)}}))
            assert set(who) <= {"student", "teacher"}
            assert who.count("student") > who.count("teacher") > 0
            labels = set(router.policy.labels)
            for answer in answers:
                assert answer["label"] in labels and 0 <= answer["confidence"] <= 1
                assert answer["student_label"] in labels
                if answer["answered_by"] == "teacher":
                    assert answer["reason"] and answer["item"].startswith("routed:")
                    assert answer["stored_for_training"] is True
                    assert answer["teacher_verdict"] in ("accepted", "rejected", "needs_review")

            # Asked again, a fallback is answered from its stored label: no new teacher call.
            asked = [
                t for t, a in zip(texts, answers, strict=False) if a["answered_by"] == "teacher"
            ]
            calls_before = _calls(trained["db"])
            again = client.post("/v1/predict", json={"inputs": asked[:5]}, headers=auth).json()
            assert [a["answered_by"] for a in again["answers"]] == ["teacher"] * len(asked[:5])
            assert _calls(trained["db"]) == calls_before

            # A bad input gets its own error; the others are answered.
            mixed = client.post("/v1/predict", json={"inputs": [texts[0], 7, ""]}, headers=auth)
            assert mixed.status_code == 200
            errors = [a.get("error") for a in mixed.json()["answers"]]
            assert errors[0] is None and "must be a string" in errors[1] and "empty" in errors[2]

            # The teacher's protocol: the request the application sends the teacher.
            from workers.prompt import render_messages
            from workers.spec import load_spec

            spec = load_spec("triage")
            chat = client.post(
                "/v1/chat/completions",
                json={"model": "teacher", "messages": render_messages(spec, texts[110])},
                headers=auth,
            )
            assert chat.status_code == 200, chat.text
            body = chat.json()
            assert body["object"] == "chat.completion"
            content = json.loads(body["choices"][0]["message"]["content"])
            assert content["label"] in labels and set(content) == {"label", "confidence"}
            assert chat.headers["x-stillhouse-answered-by"] == body["stillhouse"]["answered_by"]

            metrics = client.get("/metrics").text
            assert 'stillhouse_router_answers_total{answered_by="teacher"' in metrics
            assert "stillhouse_router_teacher_share{" in metrics
            info = client.get("/v1/router", headers=auth).json()
            assert info["answers"]["answers"] >= 100 and info["store_fallbacks"] is True

    stored = _items(trained["db"])
    assert len(stored) >= who.count("teacher")
    assert all(row["trainable"] for row in stored) and all(row["verdict"] for row in stored)


def _calls(db: str) -> int:
    engine = sa.create_engine(db)
    with engine.connect() as conn:
        n = int(conn.execute(sa.text("SELECT count(*) FROM teacher_calls")).scalar_one())
    engine.dispose()
    return n


def test_no_store_keeps_fallbacks_out_of_datasets(trained: dict[str, Any]) -> None:
    texts = _fresh_articles(200)[120:]
    with Router.open(trained["settings"], trained["run"], store=False) as router:
        answers = router.predict(texts)
    routed = [a for a in answers if a.answered_by == "teacher"]
    assert routed and all(a.stored_for_training is False for a in routed)
    kept_out = {row["external_id"] for row in _items(trained["db"]) if not row["trainable"]}
    assert {a.item for a in routed} <= kept_out

    made = run_cli(
        trained["env"], "dataset", "create", "after-routing", "--spec", "triage", "--json"
    )
    assert made.returncode == 0, made.stderr
    engine = sa.create_engine(trained["db"])
    with engine.connect() as conn:
        members = set(
            conn.execute(
                sa.text(
                    "SELECT d.external_id FROM dataset_items d JOIN datasets s "
                    "ON s.id = d.dataset_id WHERE s.name = 'after-routing'"
                )
            ).scalars()
        )
    engine.dispose()
    assert not members & kept_out
    # Fallbacks kept for training (the first test's) are taken like any other label.
    kept = {row["external_id"] for row in _items(trained["db"]) if row["trainable"]}
    accepted = {r["external_id"] for r in _items(trained["db"]) if r["verdict"] == "accepted"}
    assert kept & accepted <= members
