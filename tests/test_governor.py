"""The rate governor: buckets, AIMD on 429, Retry-After, the circuit breaker, shared limits.

The behaviour tests run on both implementations: ``LocalGovernor`` (Python, embedded mode) and
``RedisGovernor`` (the same algorithm as Lua on a real Redis). The Redis client is built inside
the test's event loop. Tests that need the clock to jump call the Python algorithm directly
with explicit ``now`` values (milliseconds).
"""

from __future__ import annotations

import asyncio
import copy
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import redis.asyncio as aredis

from schemas.errors import RateLimited
from workers.governor import (
    PROBE_MS,
    Governor,
    GovernorLimits,
    LocalGovernor,
    RedisGovernor,
    _acquire,
    _report,
    governor_key,
    wait_for_slot,
)
from workers.spec import TeacherConfig
from workers.teacher import TeacherClient, build_request, make_http_client

T = TypeVar("T")
NewGovernor = Callable[[GovernorLimits], Governor]
REPO = Path(__file__).resolve().parent.parent


class Governors:
    """Builds governors of one kind inside a scenario's event loop."""

    def __init__(self, redis_url: str | None) -> None:
        self.redis_url = redis_url

    def run(self, scenario: Callable[[NewGovernor], Awaitable[T]]) -> T:
        async def go() -> T:
            client = None if self.redis_url is None else aredis.Redis.from_url(self.redis_url)

            def new(limits: GovernorLimits) -> Governor:
                if client is None:
                    return LocalGovernor(limits)
                key = f"stillhouse:governor:test-{uuid.uuid4().hex}"
                return RedisGovernor(client, key, limits)

            try:
                return await scenario(new)
            finally:
                if client is not None:
                    await client.aclose()

        return asyncio.run(go())


@pytest.fixture(params=["local", pytest.param("redis", marks=pytest.mark.redis)])
def governors(request: pytest.FixtureRequest) -> Governors:
    if request.param == "local":
        return Governors(None)
    return Governors(request.getfixturevalue("redis_url"))


async def burst(governor: Governor, tokens: int = 1, limit: int = 100) -> int:
    """How many acquires go through right now, before the first one that must wait."""
    taken = 0
    while taken < limit:
        wait, _ = await governor.acquire(tokens)
        if wait > 0:
            return taken
        taken += 1
    return taken


# --- buckets --------------------------------------------------------------------------------


def test_no_limits_never_wait(governors: Governors) -> None:
    async def scenario(new: NewGovernor) -> list[tuple[float, bool]]:
        governor = new(GovernorLimits())
        return [await governor.acquire(10_000) for _ in range(50)]

    assert governors.run(scenario) == [(0.0, False)] * 50


def test_rpm_allows_one_second_burst_then_paces(governors: Governors) -> None:
    async def scenario(new: NewGovernor) -> tuple[list[float], float, float]:
        governor = new(GovernorLimits(rpm=600))  # 10/s, a burst of 10
        first = [(await governor.acquire(1))[0] for _ in range(10)]
        eleventh, _ = await governor.acquire(1)
        await asyncio.sleep(eleventh + 0.01)
        after_wait, _ = await governor.acquire(1)
        return first, eleventh, after_wait

    first, eleventh, after_wait = governors.run(scenario)

    assert first == [0.0] * 10
    assert 0.07 < eleventh <= 0.1
    assert after_wait == 0.0


def test_tpm_waits_for_tokens_left(governors: Governors) -> None:
    async def scenario(new: NewGovernor) -> tuple[float, float]:
        governor = new(GovernorLimits(tpm=6000))  # 100 tokens/s, a bucket of 100
        taken, _ = await governor.acquire(80)
        wait, _ = await governor.acquire(50)  # 20 left, 30 more at 100/s
        return taken, wait

    taken, wait = governors.run(scenario)

    assert taken == 0.0
    assert 0.25 < wait <= 0.3


def test_request_larger_than_bucket_borrows(governors: Governors) -> None:
    async def scenario(new: NewGovernor) -> tuple[float, float]:
        governor = new(GovernorLimits(tpm=6000))
        big, _ = await governor.acquire(250)  # 2.5 buckets: goes through, bucket at -150
        wait, _ = await governor.acquire(1)
        return big, wait

    big, wait = governors.run(scenario)

    assert big == 0.0
    assert wait == pytest.approx(1.51, abs=0.03)


# --- 429: Retry-After and AIMD --------------------------------------------------------------


def test_rate_limited_blocks_for_retry_after(governors: Governors) -> None:
    async def scenario(new: NewGovernor) -> tuple[float, RateLimited]:
        governor = new(GovernorLimits(rpm=600))
        await governor.report("rate_limited", 2.0)
        wait, _ = await governor.acquire(1)
        with pytest.raises(RateLimited) as caught:
            await wait_for_slot(governor, 1, 0.5)
        return wait, caught.value

    wait, error = governors.run(scenario)

    assert 1.9 < wait <= 2.0
    assert error.retry_after_s is not None
    assert 1.9 < error.retry_after_s <= 2.0


def test_rate_limited_without_retry_after_blocks_one_second(governors: Governors) -> None:
    async def scenario(new: NewGovernor) -> float:
        governor = new(GovernorLimits())
        await governor.report("rate_limited")
        return (await governor.acquire(1))[0]

    assert 0.9 < governors.run(scenario) <= 1.0


def test_rate_limited_halves_the_rate(governors: Governors) -> None:
    async def scenario(new: NewGovernor) -> tuple[int, int]:
        healthy = new(GovernorLimits(rpm=600))
        throttled = new(GovernorLimits(rpm=600))
        await throttled.report("rate_limited", 0.2)
        await asyncio.sleep(0.25)
        return await burst(healthy), await burst(throttled)

    assert governors.run(scenario) == (10, 5)


def test_a_burst_of_429s_halves_once(governors: Governors) -> None:
    async def scenario(new: NewGovernor) -> int:
        governor = new(GovernorLimits(rpm=600))
        for _ in range(3):
            await governor.report("rate_limited", 0.2)
        await asyncio.sleep(0.25)
        return await burst(governor)

    assert governors.run(scenario) == 5  # once: 0.5 of 10; three times would leave 1


def test_429s_a_second_apart_halve_again(governors: Governors) -> None:
    async def scenario(new: NewGovernor) -> int:
        governor = new(GovernorLimits(rpm=600))
        await governor.report("rate_limited", 0.0)
        await asyncio.sleep(1.05)
        await governor.report("rate_limited", 0.0)
        return await burst(governor)

    assert governors.run(scenario) == 2  # 10 * (0.5 + 0.02) / 2


def test_rate_recovers_linearly(governors: Governors) -> None:
    limits = GovernorLimits(rpm=600, recovery_per_s=0.5)

    async def scenario(new: NewGovernor) -> tuple[int, int]:
        now, later = new(limits), new(limits)
        await now.report("rate_limited", 0.0)
        await later.report("rate_limited", 0.0)
        at_once = await burst(now)
        await asyncio.sleep(0.6)  # factor 0.5 + 0.6 * 0.5 = 0.8
        return at_once, await burst(later)

    assert governors.run(scenario) == (5, 8)


def test_recovery_with_explicit_clock() -> None:
    limits = GovernorLimits(rpm=600)  # recovery 0.02 a second
    state: dict[str, float] = {}
    _report(state, limits, "rate_limited", 0.0, now=0.0)
    assert state["factor"] == 0.5

    def burst_at(now: float) -> int:
        s = copy.deepcopy(state)
        return next(n for n in range(100) if _acquire(s, limits, 1, now)[0] > 0)

    assert burst_at(1.0) == 5
    assert burst_at(12_500.0) == 7  # 0.5 + 12.5 * 0.02 = 0.75
    assert burst_at(30_000.0) == 10  # recovered fully, and no further
    assert burst_at(300_000.0) == 10


def test_halving_at_most_once_a_second_with_explicit_clock() -> None:
    limits = GovernorLimits(rpm=600, recovery_per_s=0.0)
    state: dict[str, float] = {}
    for now in (0.0, 400.0, 999.0):
        _report(state, limits, "rate_limited", 0.5, now)
    assert state["factor"] == 0.5
    assert state["blocked_until"] == 1499.0  # each 429 still extends the block
    _report(state, limits, "rate_limited", 0.5, now=1000.0)
    assert state["factor"] == 0.25
    for second in range(2, 12):
        _report(state, limits, "rate_limited", 0.0, now=second * 1000.0)
    assert state["factor"] == 0.05  # the floor


# --- circuit breaker ------------------------------------------------------------------------

BREAKER = GovernorLimits(failures=3, cooldown_s=0.2)


async def open_circuit(governor: Governor) -> None:
    for _ in range(BREAKER.failures):
        await governor.report("failure")


def test_failures_below_threshold_keep_circuit_closed(governors: Governors) -> None:
    async def scenario(new: NewGovernor) -> list[tuple[float, bool]]:
        governor = new(BREAKER)
        seen = [await governor.acquire(1)]
        await governor.report("failure")
        await governor.report("failure")
        seen.append(await governor.acquire(1))  # asks to hear back: a success resets the count
        await governor.report("ok")
        await governor.report("failure")
        await governor.report("failure")
        seen.append(await governor.acquire(1))
        await governor.report("ok")
        seen.append(await governor.acquire(1))
        return seen

    assert governors.run(scenario) == [(0.0, False), (0.0, True), (0.0, True), (0.0, False)]


def test_consecutive_failures_open_the_circuit(governors: Governors) -> None:
    async def scenario(new: NewGovernor) -> tuple[float, RateLimited]:
        governor = new(GovernorLimits(failures=3, cooldown_s=5.0))
        await open_circuit(governor)
        wait, _ = await governor.acquire(1)
        with pytest.raises(RateLimited) as caught:
            await wait_for_slot(governor, 1, 1.0)
        return wait, caught.value

    wait, error = governors.run(scenario)

    assert 4.9 < wait <= 5.0
    assert error.retry_after_s is not None
    assert 4.9 < error.retry_after_s <= 5.0


def test_half_open_lets_one_probe_through_and_success_closes(governors: Governors) -> None:
    async def scenario(new: NewGovernor) -> list[tuple[float, bool]]:
        governor = new(BREAKER)
        await open_circuit(governor)
        during = await governor.acquire(1)
        await asyncio.sleep(during[0] + 0.02)
        probe = await governor.acquire(1)
        other = await governor.acquire(1)
        await governor.report("ok")
        return [during, probe, other, await governor.acquire(1), await governor.acquire(1)]

    during, probe, other, first, second = governors.run(scenario)

    assert 0.15 < during[0] <= 0.2
    assert probe == (0.0, True)  # the probe must report back
    assert 0 < other[0] <= 1.0
    assert first == (0.0, False)
    assert second == (0.0, False)


def test_failed_probe_reopens_the_circuit(governors: Governors) -> None:
    async def scenario(new: NewGovernor) -> tuple[tuple[float, bool], float]:
        governor = new(BREAKER)
        await open_circuit(governor)
        await asyncio.sleep(BREAKER.cooldown_s + 0.02)
        probe = await governor.acquire(1)
        await governor.report("failure")  # one failure is enough while half-open
        return probe, (await governor.acquire(1))[0]

    probe, reopened = governors.run(scenario)

    assert probe == (0.0, True)
    assert 0.15 < reopened <= 0.2


def test_probe_that_never_reports_frees_the_slot() -> None:
    limits = GovernorLimits(failures=1, cooldown_s=10.0)
    state: dict[str, float] = {}
    _report(state, limits, "failure", None, now=0.0)
    assert _acquire(state, limits, 1, now=9_000.0)[0] == pytest.approx(1.0)
    assert _acquire(state, limits, 1, now=10_000.0) == (0.0, True)
    assert _acquire(state, limits, 1, now=10_001.0)[0] > 0
    assert _acquire(state, limits, 1, now=10_000.0 + PROBE_MS + 1) == (0.0, True)


# --- wait_for_slot --------------------------------------------------------------------------


def test_wait_for_slot_waits_inline_when_short(governors: Governors) -> None:
    async def scenario(new: NewGovernor) -> tuple[bool, float]:
        governor = new(GovernorLimits(rpm=600))
        await burst(governor)
        started = time.perf_counter()
        report_ok = await wait_for_slot(governor, 1, 1.0)
        return report_ok, time.perf_counter() - started

    report_ok, waited = governors.run(scenario)

    assert report_ok is False
    assert 0.08 < waited < 0.5


def test_wait_for_slot_hands_back_long_waits(governors: Governors) -> None:
    async def scenario(new: NewGovernor) -> RateLimited:
        governor = new(GovernorLimits(rpm=60))  # 1/s, a bucket of 1
        await governor.acquire(1)
        with pytest.raises(RateLimited) as caught:
            await wait_for_slot(governor, 1, 0.5)
        return caught.value

    error = governors.run(scenario)

    assert error.retry_after_s is not None
    assert 0.9 < error.retry_after_s <= 1.0


def test_governor_key_names_account_and_model_not_secrets() -> None:
    base = TeacherConfig(model="m", base_url="http://t.test/v1", api_key_env="SOME_KEY")

    assert governor_key(base) == governor_key(
        TeacherConfig(model="m", base_url="http://t.test/v1/")
    )
    assert governor_key(base) != governor_key(TeacherConfig(model="n", base_url="http://t.test/v1"))
    assert governor_key(base).startswith("stillhouse:governor:")
    assert "SOME_KEY" not in governor_key(base)


# --- shared across processes, and nothing secret in Redis -----------------------------------

WORKER = textwrap.dedent(
    """
    import asyncio, sys, time
    import redis.asyncio as aredis
    from workers.governor import GovernorLimits, RedisGovernor, wait_for_slot

    async def main(url, key, seconds):
        client = aredis.Redis.from_url(url)
        governor = RedisGovernor(client, key, GovernorLimits(rpm=1200))
        # Start together: both processes count over the same window.
        await client.incr(key + ":ready")
        while int(await client.get(key + ":ready")) < 2:
            await asyncio.sleep(0.002)
        end = time.monotonic() + seconds
        count = 0
        while True:
            await wait_for_slot(governor, 1, 5.0)
            if time.monotonic() > end:
                break
            count += 1
        await client.aclose()
        print(count)

    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
    """
)


@pytest.mark.slow
@pytest.mark.redis
def test_two_processes_share_one_limit(redis_url: str, tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER, encoding="utf-8")
    key, seconds = f"stillhouse:governor:test-{uuid.uuid4().hex}", 6.0
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    workers = [
        subprocess.Popen(
            [sys.executable, str(script), redis_url, key, str(seconds)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    counts = []
    for worker in workers:
        out, err = worker.communicate(timeout=30)
        assert worker.returncode == 0, err
        counts.append(int(out.strip()))

    expected = 20 * seconds + 20  # 20/s over the window, plus the initial burst
    assert all(count > 0 for count in counts), counts
    assert abs(sum(counts) - expected) <= 0.1 * expected, counts


@pytest.mark.redis
def test_api_key_leaves_no_trace_in_redis(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = f"sk-test-{uuid.uuid4().hex}"
    monkeypatch.setenv("STILLHOUSE_TEST_TEACHER_KEY", secret)
    config = TeacherConfig(
        model="m",
        base_url="http://teacher.test/v1",
        api_key_env="STILLHOUSE_TEST_TEACHER_KEY",
        rpm=600,
        tpm=100_000,
        max_retries=2,
    )
    seen_auth: list[str] = []
    ok_body = {
        "choices": [{"finish_reason": "stop", "message": {"content": '{"label": "a"}'}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2},
    }

    def handler(request: httpx.Request) -> httpx.Response:
        auth = request.headers.get("authorization", "")
        seen_auth.append(auth)
        if len(seen_auth) == 1:  # some servers echo the key they refused
            return httpx.Response(500, json={"error": {"message": f"failed for {auth}"}})
        if len(seen_auth) == 2:
            return httpx.Response(429, headers={"retry-after": "0"}, json={"error": {}})
        return httpx.Response(200, json=ok_body)

    async def go() -> tuple[list[Any], dict[bytes, list[bytes]]]:
        client = aredis.Redis.from_url(redis_url)
        governor = RedisGovernor(client, governor_key(config), GovernorLimits.from_config(config))
        configured = make_http_client(config, transport="httpx")
        async with httpx.AsyncClient(
            base_url=configured.base_url,
            headers=configured.headers,
            transport=httpx.MockTransport(handler),
        ) as http:
            teacher = TeacherClient(config, http, governor=governor, backoff_base_s=0.001)
            outcomes = [
                await teacher.complete(
                    build_request(config, [{"role": "user", "content": f"doc {i}"}], {}, "t")
                )
                for i in range(3)
            ]
        await configured.aclose()
        stored: dict[bytes, list[bytes]] = {}
        async for key in client.scan_iter(match="*", count=100):
            kind = (await client.type(key)).decode()
            values = [await client.dump(key) or b""]
            if kind == "hash":
                for field, value in (await client.hgetall(key)).items():
                    values += [field, value]
            elif kind == "string":
                values.append(await client.get(key) or b"")
            stored[key] = values
        await client.aclose()
        return outcomes, stored

    outcomes, stored = asyncio.run(go())

    assert all(outcome.body is not None for outcome in outcomes)
    assert seen_auth and all(auth == f"Bearer {secret}" for auth in seen_auth)
    assert governor_key(config).encode() in stored  # the governor did write its state
    needle = secret.encode()
    for key, values in stored.items():
        assert needle not in key
        assert all(needle not in value for value in values), key


def test_an_unreachable_redis_governor_delays_calls_and_never_loses_an_answer() -> None:
    from schemas.errors import Unavailable

    async def go() -> None:
        # Nothing listens on port 1: every Redis command fails to connect.
        client = aredis.Redis(port=1, socket_connect_timeout=0.2)
        governor = RedisGovernor(client, "stillhouse:governor:down", GovernorLimits(rpm=60))
        with pytest.raises(Unavailable, match="shared rate limiter") as caught:
            await governor.acquire(10)
        assert caught.value.retry_after_s and caught.value.retry_after_s > 0
        await governor.report("ok")  # logged, not raised: the answer is already paid for
        await client.aclose()

    asyncio.run(go())
