"""The ingest API over a real socket (uvicorn), on real Postgres (and SQLite where cheap)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, func, select, text, update
from support import ROOT
from support.ingest_tools import OTHER_TOKEN, TOKEN, row, running_api, triage_spec

from schemas.errors import ConfigError
from stillhouse.servers.ingest.server import build_app
from stillhouse.servers.teacher.process import free_port
from stillhouse.settings import Settings
from storage.intake import daily_count
from storage.models import Item, ItemState
from workers.sampling import SamplingRules, sample_point

ITEMS = "/v1/items"


def post(api: Any, body: Any, **kwargs: Any) -> httpx.Response:
    headers = {**api.headers, **kwargs.pop("headers", {})}
    return httpx.post(api.root + ITEMS, json=body, headers=headers, timeout=30, **kwargs)


# --- auth ------------------------------------------------------------------------------------


def test_token_missing_wrong_and_right(postgres_url: str) -> None:
    with running_api(postgres_url) as api:
        body = {"spec": "triage", "item": row(1)}
        missing = httpx.post(api.root + ITEMS, json=body)
        wrong = httpx.post(api.root + ITEMS, json=body, headers={"Authorization": "Bearer nope"})
        basic = httpx.post(api.root + ITEMS, json=body, headers={"Authorization": f"Basic {TOKEN}"})
        right = post(api, body)
        second = post(
            api,
            {"spec": "triage", "item": row(2)},
            headers={"Authorization": f"Bearer {OTHER_TOKEN}"},
        )
        limits = httpx.get(api.root + "/v1/limits")

        assert missing.status_code == 401
        assert missing.headers["www-authenticate"].startswith("Bearer")
        assert "Authorization: Bearer" in missing.json()["error"]["message"]
        assert (
            wrong.status_code == 401
            and 'error="invalid_token"' in wrong.headers["www-authenticate"]
        )
        assert basic.status_code == 401
        assert right.status_code == 200 and right.json()["counts"]["inserted"] == 1
        assert second.status_code == 200  # every configured token is accepted
        assert limits.status_code == 401
        assert api.stored_ids() == ["doc-1", "doc-2"]  # nothing stored for the refused ones


def test_tokens_come_comma_separated_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STILLHOUSE_API_TOKENS", " alpha, beta ,")
    tokens = Settings().api_tokens
    assert [t.get_secret_value() for t in tokens] == ["alpha", "beta"]
    assert "alpha" not in repr(Settings())  # secrets are never printed


def test_no_tokens_is_refused_unless_insecure(sqlite_url: str) -> None:
    settings = Settings(database_url=sqlite_url, api_tokens="")
    with pytest.raises(ConfigError, match="STILLHOUSE_API_TOKENS"):
        build_app(settings, ["triage"], insecure_no_auth=False)
    build_app(settings, ["triage"], insecure_no_auth=True).state.engine.dispose()


def test_serve_command_refuses_no_tokens_and_open_insecure_binds(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "STILLHOUSE_DATABASE_URL": f"sqlite:///{tmp_path}/serve.db",
        "STILLHOUSE_API_TOKENS": "",
    }
    command = [sys.executable, "-m", "stillhouse", "serve", "--spec", "triage"]
    no_tokens = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    open_bind = subprocess.run(
        [*command, "--insecure-no-auth", "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert no_tokens.returncode == 2 and "STILLHOUSE_API_TOKENS" in no_tokens.stderr
    assert open_bind.returncode == 2 and "loopback" in open_bind.stderr
    assert "Traceback" not in no_tokens.stderr + open_bind.stderr


# --- limits, media type, shape ------------------------------------------------------------


def test_body_and_batch_limits(postgres_url: str) -> None:
    with running_api(postgres_url, api_max_body_bytes=4096, api_max_batch=3) as api:
        big = {"spec": "triage", "items": [row(1, body="x" * 5000)]}
        declared = post(api, big)

        def chunks() -> Iterator[bytes]:  # no Content-Length: the streamed size is checked
            yield b'{"spec": "triage", "items": [{"id": "a", "body": "'
            for _ in range(10):
                yield b"y" * 1000
            yield b'"}]}'

        streamed = httpx.post(
            api.root + ITEMS,
            content=chunks(),
            headers={**api.headers, "Content-Type": "application/json"},
        )
        batch = post(api, {"spec": "triage", "items": [row(n) for n in range(4)]})
        at_limit = post(api, {"spec": "triage", "items": [row(n) for n in range(3)]})

        assert declared.status_code == 413 and declared.json()["error"]["code"] == "body_too_large"
        assert "4096 bytes" in declared.json()["error"]["message"]
        assert streamed.status_code == 413
        assert batch.status_code == 413 and "limit of 3" in batch.json()["error"]["message"]
        assert at_limit.status_code == 200 and at_limit.json()["counts"]["inserted"] == 3


@pytest.mark.parametrize(
    ("body", "content_type", "status", "says"),
    [
        (b'{"spec": "triage", "item": {}}', "text/plain", 415, "Content-Type: application/json"),
        (b"", None, 415, "no content type"),
        (b'{"spec": "triage", "items": [', "application/json", 422, "not valid JSON"),
        (b"[1, 2]", "application/json", 422, "must be a JSON object, got list"),
        (b'{"spec": "nope", "items": [{}]}', "application/json", 422, "serves (triage)"),
        (b'{"items": [{}]}', "application/json", 422, "'spec' must name a spec"),
        (b'{"spec": "triage"}', "application/json", 422, "exactly one of 'items'"),
        (b'{"spec": "triage", "items": []}', "application/json", 422, "non-empty array"),
        (b'{"spec": "triage", "item": [1]}', "application/json", 422, "'item' must be a JSON"),
        (b'{"spec": "triage", "itmes": [{}]}', "application/json", 422, "unknown field(s) 'itmes'"),
    ],
)
def test_bad_requests_say_what_to_fix(
    sqlite_url: str, body: bytes, content_type: str | None, status: int, says: str
) -> None:
    with running_api(sqlite_url) as api:
        headers = dict(api.headers)
        if content_type:
            headers["Content-Type"] = content_type
        response = httpx.post(api.root + ITEMS, content=body, headers=headers)
        assert response.status_code == status
        assert says in response.json()["error"]["message"]
        assert api.stored_ids() == []


# --- rows: mixed batches, dedupe, known-good ----------------------------------------------


def test_mixed_batch_keeps_the_valid_rows(database_url: str) -> None:
    with running_api(database_url) as api:
        rows: list[Any] = [
            row(1),
            {"headline": "no id", "body": "text"},
            "not an object",
            {"id": "blank", "headline": " ", "body": "\u00a0"},
            row(2, queue="tech", meta={"tags": ["Zürich", "✓"], "n": 1.5, "nul": "a\u0000b"}),
            row(1),  # repeated in the batch
        ]
        response = post(api, {"spec": "triage", "items": rows})
        again = post(api, {"spec": "triage", "items": [row(2, queue="tech"), row(3)]})
        single_bad = post(api, {"spec": "triage", "item": {"id": "x"}})

        assert response.status_code == 200
        results = response.json()["results"]
        assert [r["outcome"] for r in results] == [
            "inserted",
            "invalid",
            "invalid",
            "invalid",
            "inserted",
            "duplicate",
        ]
        assert [r["index"] for r in results] == list(range(6))
        assert "id field 'id'" in results[1]["reason"]
        assert "got str" in results[2]["reason"]
        assert "empty" in results[3]["reason"]
        assert response.json()["counts"] == {
            "inserted": 2,
            "duplicate": 1,
            "sampled_out": 0,
            "capped": 0,
            "invalid": 3,
        }
        assert [r["outcome"] for r in again.json()["results"]] == ["duplicate", "inserted"]
        assert single_bad.status_code == 422  # nothing valid: the outcomes say why
        assert single_bad.json()["results"][0]["outcome"] == "invalid"
        with api.sessions() as session:
            items = session.scalars(select(Item).order_by(Item.external_id)).all()
            assert [(i.external_id, i.state) for i in items] == [
                ("doc-1", ItemState.PENDING),
                ("doc-2", ItemState.PENDING),
                ("doc-3", ItemState.PENDING),
            ]
            assert items[1].slices == {"length": None, "queue": "tech"}
            assert items[1].payload["meta"] == {"tags": ["Zürich", "✓"], "n": 1.5, "nul": "ab"}
            # The same normalization as a backfill: the spec's template, NFC, trimmed.
            assert items[0].text == "Headline 1\n\nShares in firm 1 rose after strong profits."
            known = session.scalars(select(Item.known_good).order_by(Item.id)).all()
            assert known == [{"label": "business"}, {"label": "tech"}, {"label": "business"}]


# --- sampling -----------------------------------------------------------------------------


def test_sampling_rate_slices_and_determinism() -> None:
    rules = SamplingRules(rate=0.2, slices={"queue": {"tech": 1.0, "sport": 0.0}})
    ids = [f"id-{n}" for n in range(20000)]
    kept = [i for i in ids if rules.keeps("triage", i, {"queue": "business"})]

    assert 0.19 < len(kept) / len(ids) < 0.21
    assert all(rules.keeps("triage", i, {"queue": "tech"}) for i in ids[:500])
    assert not any(rules.keeps("triage", i, {"queue": "sport"}) for i in ids[:500])
    # Retries get the same answer; raising the rate only adds items.
    assert kept == [i for i in ids if rules.keeps("triage", i, {"queue": "business"})]
    wider = SamplingRules(rate=0.5)
    assert all(wider.keeps("triage", i, {}) for i in kept)
    assert sample_point("triage", "id-1") != sample_point("other", "id-1")


def test_highest_matching_slice_rate_wins() -> None:
    rules = SamplingRules(rate=0.1, slices={"queue": {"tech": 0.5}, "urgent": {"true": 0.9}})
    assert rules.rate_for({"queue": "tech", "urgent": True}) == 0.9
    assert rules.rate_for({"queue": "tech", "urgent": False}) == 0.5
    assert rules.rate_for({"queue": "politics"}) == 0.1


def test_sampling_through_the_api_oversamples_the_rare_slice(postgres_url: str) -> None:
    spec = triage_spec({"rate": 0.1, "slices": {"queue": {"tech": 1.0}}})
    with running_api(postgres_url, [spec]) as api:
        common = [row(f"b{n}") for n in range(300)]
        rare = [row(f"t{n}", queue="tech") for n in range(30)]
        first = post(api, {"spec": "triage", "items": common + rare}).json()
        retry = post(api, {"spec": "triage", "items": common + rare}).json()

        outcomes = [r["outcome"] for r in first["results"]]
        assert outcomes[300:] == ["inserted"] * 30  # the rare slice is always kept
        kept_common = outcomes[:300].count("inserted")
        assert 15 <= kept_common <= 50  # about 10 % of 300
        assert outcomes[:300].count("sampled_out") == 300 - kept_common
        # A retried submission gets the same decisions: sampled out again, or a duplicate.
        assert [r["outcome"] for r in retry["results"]] == [
            "duplicate" if o == "inserted" else o for o in outcomes
        ]
        assert len(api.stored_ids()) == kept_common + 30


def test_daily_cap_counts_only_new_items_per_utc_day(database_url: str) -> None:
    day = [date(2026, 11, 28)]
    spec = triage_spec({"daily_cap": 3})
    with running_api(database_url, [spec], today=lambda: day[0]) as api:
        first = post(api, {"spec": "triage", "items": [row(n) for n in range(5)]}).json()
        repeat = post(api, {"spec": "triage", "items": [row(0), row(1), row(9)]}).json()
        day[0] = date(2026, 11, 29)
        next_day = post(api, {"spec": "triage", "items": [row(3), row(4)]}).json()

        assert [r["outcome"] for r in first["results"]] == ["inserted"] * 3 + ["capped"] * 2
        assert [r["outcome"] for r in repeat["results"]] == ["duplicate", "duplicate", "capped"]
        assert [r["outcome"] for r in next_day["results"]] == ["inserted", "inserted"]
        with api.sessions() as session:
            assert daily_count(session, "triage", date(2026, 11, 28)) == 3
            assert daily_count(session, "triage", date(2026, 11, 29)) == 2


# --- backpressure, health, metrics --------------------------------------------------------


def test_backlog_over_the_limit_gets_429_with_retry_after(postgres_url: str) -> None:
    with running_api(postgres_url, api_max_backlog=3, api_retry_after_s=7) as api:
        assert post(api, {"spec": "triage", "items": [row(n) for n in range(4)]}).status_code == 200
        time.sleep(1.05)  # the backlog count is cached for a second
        busy = post(api, {"spec": "triage", "item": row(9)})
        with api.sessions.begin() as session:  # the workers catch up
            session.execute(update(Item).values(state=ItemState.ACCEPTED))
        time.sleep(1.05)
        after = post(api, {"spec": "triage", "item": row(9)})

        assert busy.status_code == 429
        assert busy.headers["retry-after"] == "7"
        assert "4 items waiting" in busy.json()["error"]["message"]
        assert after.status_code == 200 and after.json()["counts"]["inserted"] == 1


def test_healthz_follows_the_database(postgres_url: str) -> None:
    with running_api(postgres_url, api_retry_after_s=2) as api:
        up = httpx.get(api.root + "/healthz")
        name = postgres_url.rsplit("/", 1)[1]
        admin = create_engine(
            postgres_url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT"
        )
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()
        down = httpx.get(api.root + "/healthz")
        refused = post(api, {"spec": "triage", "item": row(1)})
        metrics = httpx.get(api.root + "/metrics")

        assert up.status_code == 200 and up.json()["database"] == "ok"
        assert down.status_code == 503 and down.json()["status"] == "unavailable"
        assert refused.status_code == 503 and refused.headers["retry-after"] == "2"
        assert metrics.status_code == 200  # still scrapable in an outage


def _samples(text_body: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text_body):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_metrics_count_requests_items_backlog_and_latency(postgres_url: str) -> None:
    with running_api(postgres_url, backlog_ttl_s=0.0) as api:
        post(api, {"spec": "triage", "items": [row(1), row(2), {"id": "bad"}, row(1)]})
        post(api, {"spec": "triage", "item": row(1)})
        httpx.post(api.root + ITEMS, json={"spec": "triage", "item": row(3)})  # 401
        metrics = httpx.get(api.root + "/metrics")

        assert metrics.headers["content-type"].startswith("text/plain")
        samples = _samples(metrics.text)
        requests = "stillhouse_api_requests_total"
        assert samples[(requests, (("route", "/v1/items"), ("status", "200")))] == 2
        assert samples[(requests, (("route", "/v1/items"), ("status", "401")))] == 1
        items = "stillhouse_api_items_total"
        assert samples[(items, (("outcome", "inserted"), ("spec", "triage")))] == 2
        assert samples[(items, (("outcome", "duplicate"), ("spec", "triage")))] == 2
        assert samples[(items, (("outcome", "invalid"), ("spec", "triage")))] == 1
        assert samples[("stillhouse_api_backlog_items", (("spec", "triage"),))] == 2
        latency = "stillhouse_api_request_duration_seconds_count"
        assert samples[(latency, (("route", "/v1/items"),))] == 3


# --- the fault test: one document, many concurrent submissions, real processes ------------


@pytest.fixture
def served_by_processes(postgres_url: str, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """`stillhouse serve --workers 2` in a child process, with a daily cap of 1 on `capped`."""
    capped = tmp_path / "capped.yaml"
    body = (ROOT / "examples/specs/triage.yaml").read_text().replace("name: triage", "name: capped")
    capped.write_text(body + "\nsampling: {daily_cap: 1}\n")
    port = free_port()
    env = {**os.environ, "STILLHOUSE_DATABASE_URL": postgres_url, "STILLHOUSE_API_TOKENS": TOKEN}
    command = [sys.executable, "-m", "stillhouse", "serve", "--spec", "triage", "--spec"]
    server = subprocess.Popen(
        [*command, str(capped), "--port", str(port), "--workers", "2"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    root = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(root, server)
        yield root, postgres_url
    finally:
        server.terminate()
        server.wait(timeout=30)
        assert server.stderr is not None
        server.stderr.close()


def _wait_healthy(root: str, server: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"stillhouse serve exited: {server.stderr and server.stderr.read()}")
        try:
            if httpx.get(root + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError("stillhouse serve did not become healthy")


def _concurrently(root: str, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    barrier = threading.Barrier(len(bodies))
    responses: list[httpx.Response | None] = [None] * len(bodies)

    def submit(n: int) -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as client:
            client.get(root + "/healthz")  # connect first, so the posts start together
            barrier.wait()
            responses[n] = client.post(root + ITEMS, json=bodies[n])

    threads = [threading.Thread(target=submit, args=(n,)) for n in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert all(r is not None for r in responses)
    return [r for r in responses if r is not None]


def test_same_document_submitted_concurrently_is_stored_once(
    served_by_processes: tuple[str, str],
) -> None:
    root, database_url = served_by_processes
    engine = create_engine(database_url)
    try:
        for round_ in range(3):  # three races, each on a fresh document
            document = row(f"race-{round_}")
            responses = _concurrently(root, [{"spec": "triage", "item": document}] * 8)
            outcomes = [r.json()["results"][0]["outcome"] for r in responses]
            assert all(r.status_code == 200 for r in responses)
            assert outcomes.count("inserted") == 1, outcomes
            assert outcomes.count("duplicate") == 7, outcomes
        # Different documents racing for the last place under a daily cap of 1: one wins.
        bodies = [{"spec": "capped", "item": row(f"cap-{n}")} for n in range(8)]
        capped = [r.json()["results"][0]["outcome"] for r in _concurrently(root, bodies)]
        assert capped.count("inserted") == 1 and capped.count("capped") == 7, capped
        with engine.connect() as conn:
            per_id = conn.execute(
                select(Item.spec_name, Item.external_id, func.count()).group_by(
                    Item.spec_name, Item.external_id
                )
            ).all()
            assert sorted((s, e) for s, e, _ in per_id if s == "triage") == [
                ("triage", f"doc-race-{n}") for n in range(3)
            ]
            assert all(n == 1 for _, _, n in per_id)
            assert sum(1 for s, _, _ in per_id if s == "capped") == 1
    finally:
        engine.dispose()


def test_many_batches_through_the_api(postgres_url: str) -> None:
    """Throughput smoke: 20 batches of 250 rows, each stored once (figure in the report)."""
    with (
        running_api(postgres_url, api_max_batch=250) as api,
        httpx.Client(headers=api.headers, timeout=60) as client,
    ):
        started = time.perf_counter()
        for batch in range(20):
            rows = [row(batch * 250 + n) for n in range(250)]
            response = client.post(api.root + ITEMS, json={"spec": "triage", "items": rows})
            assert response.json()["counts"]["inserted"] == 250
        elapsed = time.perf_counter() - started
        assert len(api.stored_ids()) == 5000
        print(json.dumps({"items": 5000, "seconds": round(elapsed, 2), "per_s": 5000 / elapsed}))


def test_metrics_add_up_across_server_processes(served_by_processes: tuple[str, str]) -> None:
    # Two server processes share the requests; a scrape, whichever process answers it, counts
    # all of them (prometheus_client's multiprocess mode), not just its own.
    root, _ = served_by_processes
    bodies = [{"spec": "triage", "item": row(f"m-{n % 12}")} for n in range(16)]
    responses = _concurrently(root, bodies)
    assert all(r.status_code == 200 for r in responses)
    items = "stillhouse_api_items_total"
    inserted = (items, (("outcome", "inserted"), ("spec", "triage")))
    duplicate = (items, (("outcome", "duplicate"), ("spec", "triage")))
    posts = ("stillhouse_api_requests_total", (("route", "/v1/items"), ("status", "200")))
    for _ in range(6):  # new connections: the scrapes land on both processes
        samples = _samples(httpx.get(root + "/metrics", timeout=10).text)
        assert (samples[inserted], samples[duplicate]) == (12, 4)
        assert samples[posts] == 16
        # The backlog is read at most once per TTL, so a scrape may show an earlier reading.
        assert 0 <= samples[("stillhouse_api_backlog_items", (("spec", "triage"),))] <= 12
