"""The producers' client against the real ingest API on a real socket and real Postgres."""

from __future__ import annotations

import asyncio
import socket

import pytest
from sqlalchemy import update
from support.clock import ManualClock
from support.ingest_tools import TOKEN, row, running_api

from schemas.errors import StillhouseError
from stillhouse.client import (
    AsyncStillhouseClient,
    ServerBusy,
    StillhouseClient,
    SubmitRejected,
    SubmitResult,
    Unauthorized,
)
from storage.models import Item, ItemState


def test_submit_batches_to_the_server_limit_and_keeps_input_order(postgres_url: str) -> None:
    with (
        running_api(postgres_url, api_max_batch=100) as api,
        StillhouseClient(api.root, TOKEN) as client,
    ):
        rows = [row(n) for n in range(250)]
        rows[10] = {"headline": "no id"}
        rows[120] = row(5)  # a duplicate of an earlier row, in another batch
        result = client.submit("triage", rows)
        again = client.submit("triage", rows[:50])

        assert result.requests == 3  # three batches of at most 100
        assert result.counts == {
            "inserted": 248,
            "duplicate": 1,
            "sampled_out": 0,
            "capped": 0,
            "invalid": 1,
        }
        assert [r["index"] for r in result.results] == list(range(250))
        assert result.results[10]["outcome"] == "invalid"
        assert result.results[120] == {"index": 120, "id": "doc-5", "outcome": "duplicate"}
        assert again.counts["duplicate"] == 49 and again.counts["invalid"] == 1
        assert len(api.stored_ids()) == 248


def test_submit_splits_by_body_size_and_reports_oversized_rows(postgres_url: str) -> None:
    with (
        running_api(postgres_url, api_max_body_bytes=4096) as api,
        StillhouseClient(api.root, TOKEN) as client,
    ):
        rows = [row(n, body="word " * 150) for n in range(12)]  # about 800 bytes each
        rows[3] = row(3, body="x" * 5000)
        result = client.submit("triage", rows)

        assert result.counts["inserted"] == 11
        assert result.by_outcome("invalid") == [
            {"index": 3, "id": None, "outcome": "invalid", "reason": "row too large"}
        ]
        assert result.requests == 3  # four rows of ~850 bytes fill a 4 KiB body


def test_retries_after_429_honoring_retry_after(postgres_url: str) -> None:
    clock = ManualClock()
    with (
        running_api(postgres_url, api_max_backlog=2, api_retry_after_s=1, backlog_ttl_s=0.0) as api,
        StillhouseClient(api.root, TOKEN, max_wait_s=20, clock=clock, sleep=clock.sleep) as client,
    ):
        client.submit("triage", [row(n) for n in range(3)])  # backlog 3 > 2: full

        def workers_catch_up(sleeps: int) -> None:  # while the client waits its first Retry-After
            with api.sessions.begin() as session:
                session.execute(update(Item).values(state=ItemState.ACCEPTED))

        clock.on_sleep = workers_catch_up
        result = client.submit("triage", [row(99)])

        assert result.counts["inserted"] == 1
        assert result.retries == 1
        assert clock.sleeps == [1.0]  # it slept for Retry-After, not in a tight loop


def test_gives_up_when_the_wait_would_pass_the_budget(postgres_url: str) -> None:
    clock = ManualClock()
    with (
        running_api(postgres_url, api_max_backlog=1, api_retry_after_s=5, backlog_ttl_s=0.0) as api,
        StillhouseClient(api.root, TOKEN, max_wait_s=2, clock=clock, sleep=clock.sleep) as client,
    ):
        client.submit("triage", [row(1), row(2)])
        with pytest.raises(ServerBusy, match="429"):
            client.submit("triage", [row(3)])
        assert clock.sleeps == []  # a 5 s Retry-After cannot fit in 2 s: no pointless sleep


def test_4xx_raises_with_the_server_message(postgres_url: str) -> None:
    with running_api(postgres_url) as api:
        with StillhouseClient(api.root, "wrong") as client, pytest.raises(Unauthorized) as auth:
            client.submit("triage", [row(1)])
        with StillhouseClient(api.root, TOKEN) as client, pytest.raises(SubmitRejected) as spec:
            client.submit("nope", [row(1)])

        assert auth.value.status == 401 and "not valid" in str(auth.value)
        assert spec.value.status == 422 and spec.value.code == "unknown_spec"
        # One error tree: what the client raises is a StillhouseError with its own kind.
        assert isinstance(auth.value, StillhouseError) and auth.value.kind == "unauthorized"
        assert spec.value.kind == "submit_rejected"
        assert "triage" in str(spec.value)


def test_unreachable_server_is_retried_then_reported() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        clock = ManualClock()
        with StillhouseClient(
            f"http://127.0.0.1:{port}", TOKEN, max_wait_s=1.0, clock=clock, sleep=clock.sleep
        ) as client:
            with pytest.raises(ServerBusy, match=r"gave up after 2 attempts \(cannot reach"):
                client.submit("triage", [row(1)])
            # Backoff 0.5 s, then 1 s would pass the 1 s budget: reported instead of slept.
            assert clock.sleeps == [0.5]


# --- the asyncio client: the same behavior from an event loop -------------------------------


def test_async_client_batches_dedupes_and_keeps_input_order(postgres_url: str) -> None:
    async def produce(root: str) -> tuple[SubmitResult, SubmitResult]:
        async with AsyncStillhouseClient(root, TOKEN) as client:
            rows = [row(n) for n in range(150)]
            rows[7] = {"headline": "no id"}
            rows[120] = row(3)  # a duplicate of an earlier row, in the second batch
            # Two producers on one loop at once: each gets its own rows' outcomes.
            return await asyncio.gather(
                client.submit("triage", rows), client.submit("triage", [row(n) for n in (1, 500)])
            )

    with running_api(postgres_url, api_max_batch=100) as api:
        result, other = asyncio.run(produce(api.root))
        stored = api.stored_ids()

    assert result.requests == 2
    assert [r["index"] for r in result.results] == list(range(150))
    assert result.results[7]["outcome"] == "invalid"
    assert result.results[120] == {"index": 120, "id": "doc-3", "outcome": "duplicate"}
    assert [r["id"] for r in other.results] == ["doc-1", "doc-500"]
    assert result.counts["inserted"] + other.counts["inserted"] == len(stored) == 149


def test_async_client_retries_429_then_gives_up_past_its_budget(postgres_url: str) -> None:
    clock = ManualClock()

    async def produce(root: str) -> str:
        async with AsyncStillhouseClient(
            root, TOKEN, max_wait_s=2, clock=clock, sleep=clock.async_sleep
        ) as client:
            await client.submit("triage", [row(1), row(2)])
            try:
                await client.submit("triage", [row(3)])
            except ServerBusy as exc:
                return str(exc)
            return "no error"

    with running_api(
        postgres_url, api_max_backlog=1, api_retry_after_s=5, backlog_ttl_s=0.0
    ) as api:
        message = asyncio.run(produce(api.root))
    assert "429" in message and "gave up" in message
    assert clock.sleeps == []  # a 5 s Retry-After cannot fit in 2 s: no pointless sleep


def test_async_client_4xx_and_unreachable_server() -> None:
    clock = ManualClock()

    async def unreachable(port: int) -> None:
        async with AsyncStillhouseClient(
            f"http://127.0.0.1:{port}", TOKEN, max_wait_s=1.0, clock=clock, sleep=clock.async_sleep
        ) as c:
            with pytest.raises(ServerBusy, match="cannot reach the server"):
                await c.submit("triage", [row(1)])

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        asyncio.run(unreachable(sock.getsockname()[1]))
    assert clock.sleeps == [0.5]


def test_async_client_raises_the_server_message_on_4xx(postgres_url: str) -> None:
    async def submit(root: str, token: str, spec: str) -> None:
        async with AsyncStillhouseClient(root, token) as client:
            await client.submit(spec, [row(1)])

    with running_api(postgres_url) as api:
        with pytest.raises(Unauthorized) as auth:
            asyncio.run(submit(api.root, "wrong", "triage"))
        with pytest.raises(SubmitRejected) as spec:
            asyncio.run(submit(api.root, TOKEN, "nope"))
    assert auth.value.status == 401
    assert spec.value.status == 422 and spec.value.code == "unknown_spec"
