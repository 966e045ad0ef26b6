"""The local teacher's own rate limits: in flight, per minute, tokens, as hosted providers do."""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

import httpx
import pytest

from stillhouse.servers.teacher import create_app, make_backend
from stillhouse.servers.teacher.limits import LimitsConfig, RateLimits, format_reset

BODY: dict[str, Any] = {
    "model": "fixed",
    "max_tokens": 50,
    "messages": [{"role": "user", "content": "<document>\nticket one two\n</document>"}],
    "response_format": {
        "type": "json_schema",
        "json_schema": {
            "name": "t",
            "schema": {
                "type": "object",
                "properties": {"label": {"type": "string", "enum": ["a", "b"]}},
                "required": ["label"],
            },
        },
    },
}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_over_the_in_flight_cap_is_refused_until_one_is_released() -> None:
    limits = RateLimits(LimitsConfig(max_concurrency=2, concurrency_retry_after_s=1))
    assert limits.admit(10).admitted and limits.admit(10).admitted
    refused = limits.admit(10)
    assert not refused.admitted and refused.reason == "concurrency"
    assert refused.headers["retry-after"] == "1" and refused.headers["retry-after-ms"] == "1000"
    limits.release()
    assert limits.admit(10).admitted
    assert limits.max_in_flight == 2


def test_rpm_holds_one_seconds_worth_and_refills_continuously() -> None:
    clock = Clock()
    limits = RateLimits(LimitsConfig(rpm=600), clock=clock)  # 10 a second, 10 at once
    for _ in range(10):
        assert limits.admit(1).admitted
        limits.release()
    refused = limits.admit(1)
    assert refused.reason == "requests"
    assert refused.retry_after_s == pytest.approx(0.1)
    assert refused.headers["retry-after-ms"] == "100"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"] == "1s"
    clock.now += 0.1
    admitted = limits.admit(1)
    assert admitted.admitted
    assert admitted.headers["x-ratelimit-limit-requests"] == "600"


def test_tpm_counts_the_prompt_and_the_completion_allowance() -> None:
    clock = Clock()
    limits = RateLimits(LimitsConfig(tpm=60_000, window_s=1), clock=clock)  # 1,000 a second
    assert limits.admit(600).admitted
    refused = limits.admit(600)
    assert refused.reason == "tokens"
    assert refused.retry_after_s == pytest.approx(0.2)
    clock.now += 0.2
    assert limits.admit(600).admitted


def test_a_request_over_the_bucket_waits_for_a_full_bucket_then_borrows() -> None:
    clock = Clock()
    limits = RateLimits(LimitsConfig(tpm=6_000), clock=clock)  # 100 a second, holds 100
    assert limits.admit(250).admitted  # full: admitted, the bucket goes to -150
    assert limits.admit(1).reason == "tokens"
    clock.now += 2.5
    assert limits.admit(250).admitted


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0, "0ms"), (0.02, "20ms"), (1.5, "1.5s"), (60, "1m0s"), (83.25, "1m23.25s")],
)
def test_reset_headers_are_written_as_openai_writes_them(seconds: float, text: str) -> None:
    assert format_reset(seconds) == text


async def _app_client(limits: LimitsConfig, latency_ms: float) -> httpx.AsyncClient:
    app = create_app(make_backend("fixed", latency_ms=latency_ms), limits=limits)
    app.state.routes.ready = True
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t/v1")


def test_the_server_answers_429s_with_headers_and_counts_them() -> None:
    async def scenario() -> tuple[list[httpx.Response], dict[str, Any], dict[str, Any]]:
        client = await _app_client(LimitsConfig(max_concurrency=3, rpm=6000), 100)
        async with client:
            payload = json.dumps(BODY).encode()
            replies = await asyncio.gather(
                *(
                    client.post(
                        "/chat/completions",
                        content=payload,
                        headers={"x-client-request-id": f"r{i}"},
                    )
                    for i in range(5)
                )
            )
            stats = (await client.get("/stats")).json()
            log = (await client.get("/requests")).json()
        return replies, stats, log

    replies, stats, log = asyncio.run(scenario())
    codes = sorted(r.status_code for r in replies)
    assert codes == [200, 200, 200, 429, 429]
    limited = next(r for r in replies if r.status_code == 429)
    assert limited.headers["retry-after"] == "1"
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    ok = next(r for r in replies if r.status_code == 200)
    assert ok.headers["x-ratelimit-limit-requests"] == "6000"
    assert int(ok.headers["x-ratelimit-remaining-requests"]) < 100
    assert stats["rate_limited"] == 2 and stats["rate_limited_by"]["concurrency"] == 2
    assert stats["completions"] == 3 and stats["requests"] == 5 and stats["max_in_flight"] == 3
    # The log holds every POST, with the hash stillhouse's ledger keys requests by.
    expected = hashlib.sha256(b"openai\n" + json.dumps(BODY).encode()).hexdigest()
    assert log["total"] == 5
    assert {e["request_hash"] for e in log["entries"]} == {expected}
    assert sorted(e["client_request_id"] for e in log["entries"]) == [f"r{i}" for i in range(5)]
    assert sorted(e["status"] for e in log["entries"]) == codes


def test_stats_reset_clears_the_log_and_the_buckets() -> None:
    async def scenario() -> tuple[int, int, int]:
        client = await _app_client(LimitsConfig(rpm=60), 0)  # one a second
        async with client:
            first = await client.post("/chat/completions", json=BODY)
            second = await client.post("/chat/completions", json=BODY)
            await client.post("/stats/reset")
            third = await client.post("/chat/completions", json=BODY)
            total = (await client.get("/requests")).json()["total"]
        return first.status_code, second.status_code, third.status_code * 1000 + total

    assert asyncio.run(scenario()) == (200, 429, 200_001)
