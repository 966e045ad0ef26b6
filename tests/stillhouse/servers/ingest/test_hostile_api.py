"""The hostile-input corpus (tests/hostile_corpus.py) through the real ingest API on SQLite
and Postgres: each row's documented outcome, the good rows of the same batch kept, no 5xx,
and the server healthy after."""

from __future__ import annotations

import json
from typing import Any

import httpx
from sqlalchemy import text
from support.hostile_corpus import CASES, Case
from support.ingest_tools import running_api


def _api_rows() -> list[tuple[Case, Any]]:
    rows = []
    for case in CASES:
        if case.api is None:
            continue
        rows.append((case, case.row if case.row is not None else json.loads(case.line)))
    return rows


def test_the_corpus_through_the_ingest_api(database_url: str) -> None:
    sent = _api_rows()
    # Python's json writes NaN and a lone surrogate's escape, as many producers' libraries do.
    body = json.dumps({"spec": "triage", "items": [row for _, row in sent]}).encode()
    with running_api(database_url, api_max_body_bytes=4 << 20) as api:
        headers = {**api.headers, "Content-Type": "application/json"}
        answer = httpx.post(api.root + "/v1/items", content=body, headers=headers, timeout=60)
        assert answer.status_code == 200, answer.text[:2000]
        results = answer.json()["results"]
        assert len(results) == len(sent)
        for (case, _), result in zip(sent, results, strict=True):
            if case.api == "ok":
                assert result["outcome"] == "inserted", (case.name, result)
            else:
                assert result["outcome"] == "invalid", (case.name, result)
                assert str(result["reason"]).startswith(str(case.api)), (case.name, result)
        expected = {c.stored_id or str(row["id"]) for c, row in sent if c.api == "ok"}
        assert set(api.stored_ids()) == expected

        # A body nested deeper than the parser goes is one clear 422, not a 500.
        deep = b'{"spec": "triage", "items": [' + b"[" * 5000 + b"]" * 5000 + b"]}"
        refused = httpx.post(api.root + "/v1/items", content=deep, headers=headers, timeout=30)
        assert refused.status_code == 422 and "nested too deep" in refused.text
        # A lone surrogate in the spec name, and in an id the answer echoes, stay JSON.
        odd = b'{"spec": "triage", "items": [{"id": "x\\udc00", "headline": "h", "body": "b"}]}'
        echoed = httpx.post(api.root + "/v1/items", content=odd, headers=headers, timeout=30)
        assert echoed.status_code == 422 and echoed.json()["results"][0]["id"] == "x\\udc00"
        # The server is healthy and takes the next good batch.
        assert httpx.get(api.root + "/healthz", timeout=5).status_code == 200
        good = {"spec": "triage", "item": {"id": "after-1", "headline": "h", "body": "fine"}}
        after = httpx.post(api.root + "/v1/items", json=good, headers=api.headers, timeout=30)
        assert after.status_code == 200 and after.json()["counts"]["inserted"] == 1


def test_a_row_the_database_refuses_is_that_rows_outcome_not_a_503(database_url: str) -> None:
    # A constraint the row checks know nothing of (a site's own CHECK, a trigger): the batch
    # fails in the database, and the API stores the rows one at a time to keep the good ones.
    with running_api(database_url) as api:
        with api.sessions.begin() as session:
            if database_url.startswith("sqlite"):
                session.execute(
                    text(
                        "CREATE TRIGGER no_poison BEFORE INSERT ON items "
                        "WHEN NEW.external_id = 'poison' BEGIN SELECT RAISE(ABORT, 'poison'); END"
                    )
                )
            else:
                session.execute(
                    text(
                        "ALTER TABLE items ADD CONSTRAINT no_poison CHECK (external_id <> 'poison')"
                    )
                )
        rows = [
            {"id": rid, "headline": "h", "body": f"body of {rid}"}
            for rid in ("good-1", "poison", "good-2")
        ]
        answer = httpx.post(
            api.root + "/v1/items",
            json={"spec": "triage", "items": rows},
            headers=api.headers,
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        outcomes = [(r["index"], r["outcome"]) for r in answer.json()["results"]]
        assert outcomes == [(0, "inserted"), (1, "invalid"), (2, "inserted")]
        reason = answer.json()["results"][1]["reason"]
        assert reason.startswith("the database refused this row: ")
        assert api.stored_ids() == ["good-1", "good-2"]
