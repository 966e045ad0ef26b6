"""The governor: rate buckets (the spec's and learned from headers), the adaptive fleet-wide
limit on calls in flight, and the circuit breaker.

The behaviour tests run on both implementations: ``LocalGovernor`` (Python, embedded mode) and
``RedisGovernor`` (the same algorithm as Lua on a real Redis). The Redis client is built inside
the test's event loop. Tests that need the clock to jump give ``LocalGovernor`` a clock
(milliseconds) or call the rules directly.
"""

from __future__ import annotations

import asyncio
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
from support import ROOT as REPO

from schemas.errors import TeacherBusy
from workers import governor_rules as rules
from workers.governor import (
    PROBE_MS,
    Governor,
    GovernorLimits,
    LocalGovernor,
    RedisGovernor,
    Slot,
    governor_key,
    limits_of,
    shared_redis,
    wait_for_slot,
)
from workers.providers import RateHeaders
from workers.spec import TeacherConfig
from workers.teacher import TeacherClient, build_request, make_http_client, teacher_key

T = TypeVar("T")
NewGovernor = Callable[[GovernorLimits], Governor]


class Governors:
    """Builds governors of one kind inside a scenario's event loop."""

    def __init__(self, redis_url: str | None) -> None:
        self.redis_url = redis_url

    def run(self, scenario: Callable[[NewGovernor], Awaitable[T]]) -> T:
        async def go() -> T:
            client = None if self.redis_url is None else shared_redis(self.redis_url)

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


class Clock:
    """Milliseconds, moved by hand."""

    def __init__(self) -> None:
        self.ms = 1_000_000.0

    def __call__(self) -> float:
        return self.ms


async def burst(governor: Governor, tokens: int = 1, limit: int = 100) -> int:
    """How many acquires go through right now, before the first one that must wait."""
    taken = 0
    while taken < limit:
        if (await governor.acquire(tokens)).wait_s > 0:
            return taken
        taken += 1
    return taken


def headers(**values: float) -> RateHeaders:
    return RateHeaders(**{k: v for k, v in values.items()})  # type: ignore[arg-type]


# --- buckets --------------------------------------------------------------------------------


def test_no_limits_never_wait(governors: Governors) -> None:
    async def scenario(new: NewGovernor) -> list[Slot]:
        governor = new(GovernorLimits())
        return [await governor.acquire(10_000) for _ in range(50)]

    assert governors.run(scenario) == [Slot(0.0)] * 50


def test_rpm_allows_one_second_burst_then_paces(governors: Governors) -> None:
    async def scenario(new: NewGovernor) -> tuple[list[float], Slot, float]:
        governor = new(GovernorLimits(rpm=600))  # 10/s, a burst of 10
        first = [(await governor.acquire(1)).wait_s for _ in range(10)]
        eleventh = await governor.acquire(1)
        await asyncio.sleep(eleventh.wait_s + 0.01)
        return first, eleventh, (await governor.acquire(1)).wait_s

    first, eleventh, after_wait = governors.run(scenario)

    assert first == [0.0] * 10
    assert 0.07 < eleventh.wait_s <= 0.1 and eleventh.why == "rate"
    assert after_wait == 0.0


def test_tpm_waits_for_tokens_left(governors: Governors) -> None:
    async def scenario(new: NewGovernor) -> tuple[float, float]:
        governor = new(GovernorLimits(tpm=6000))  # 100 tokens/s, a bucket of 100
        taken = await governor.acquire(80)
        wait = await governor.acquire(50)  # 20 left, 30 more at 100/s
        return taken.wait_s, wait.wait_s

    taken, wait = governors.run(scenario)

    assert taken == 0.0
    assert 0.25 < wait <= 0.3


def test_request_larger_than_bucket_borrows(governors: Governors) -> None:
    async def scenario(new: NewGovernor) -> tuple[float, float]:
        governor = new(GovernorLimits(tpm=6000))
        big = await governor.acquire(250)  # 2.5 buckets: goes through, bucket at -150
        return big.wait_s, (await governor.acquire(1)).wait_s

    big, wait = governors.run(scenario)

    assert big == 0.0
    assert wait == pytest.approx(1.51, abs=0.03)


# --- pacing from the teacher's rate headers -------------------------------------------------


def test_a_limit_learned_from_headers_paces_a_little_under_it(governors: Governors) -> None:
    async def scenario(new: NewGovernor) -> tuple[int, float]:
        governor = new(GovernorLimits())
        started = time.perf_counter()
        await governor.observe(headers(limit_requests=6000, remaining_requests=100))
        taken = await burst(governor, limit=200)
        return taken, time.perf_counter() - started

    taken, elapsed = governors.run(scenario)

    # A bucket of 0.97 * 6000 / 60 = 97, refilled at 97/s while the burst takes its time.
    assert 96 <= taken <= 98 + 97 * elapsed


def test_a_learned_limit_paces_one_request_per_its_interval() -> None:
    clock = Clock()
    governor = LocalGovernor(GovernorLimits(), clock=clock)

    async def scenario() -> tuple[int, float]:
        await governor.observe(headers(limit_requests=6000, remaining_requests=100))
        return await burst(governor, limit=200), (await governor.acquire(1)).wait_s

    taken, wait = asyncio.run(scenario())

    assert taken == 97
    assert wait == pytest.approx(60 / (0.97 * 6000))


def test_a_lower_remaining_count_pulls_the_bucket_down(governors: Governors) -> None:
    async def scenario(new: NewGovernor) -> tuple[int, Slot]:
        governor = new(GovernorLimits(rpm=600))  # ours: 10 at once
        await governor.observe(headers(limit_requests=600, remaining_requests=3))
        return await burst(governor), await governor.acquire(1)

    taken, after = governors.run(scenario)

    assert taken == 3  # the teacher knows better: it has three left
    assert after.why == "rate"


def test_the_specs_rpm_stays_a_hard_ceiling(governors: Governors) -> None:
    async def scenario(new: NewGovernor) -> int:
        governor = new(GovernorLimits(rpm=600))
        await governor.observe(headers(limit_requests=60_000, remaining_requests=60_000))
        return await burst(governor, limit=200)

    assert governors.run(scenario) == 10


def test_nothing_left_and_no_known_rate_blocks_until_the_reset(governors: Governors) -> None:
    async def scenario(new: NewGovernor) -> Slot:
        governor = new(GovernorLimits())
        await governor.observe(headers(remaining_requests=0, reset_requests_s=2.0))
        return await governor.acquire(1)

    slot = governors.run(scenario)

    assert slot.why == "blocked" and 1.9 < slot.wait_s <= 2.0


def test_a_busy_wait_names_the_teachers_rate_limit(governors: Governors) -> None:
    async def scenario(new: NewGovernor) -> TeacherBusy:
        governor = new(GovernorLimits(rpm=60))  # 1/s, a bucket of 1
        await governor.acquire(1)
        with pytest.raises(TeacherBusy) as caught:
            await wait_for_slot(governor, 1, 0.5)
        return caught.value

    error = governors.run(scenario)

    assert error.retry_after_s is not None and 0.9 < error.retry_after_s <= 1.0
    assert "rate limit" in str(error) and error.kind == "teacher_busy"


def test_wait_for_slot_waits_inline_when_short(governors: Governors) -> None:
    async def scenario(new: NewGovernor) -> tuple[bool, float]:
        governor = new(GovernorLimits(rpm=600))
        await burst(governor)
        started = time.perf_counter()
        probe = await wait_for_slot(governor, 1, 1.0)
        return probe, time.perf_counter() - started

    probe, waited = governors.run(scenario)

    assert probe is False
    assert 0.08 < waited < 0.5


# --- circuit breaker ------------------------------------------------------------------------

BREAKER = GovernorLimits(failures=3, cooldown_s=0.2)


async def open_circuit(governor: Governor) -> None:
    for _ in range(BREAKER.failures):
        await governor.report("failure")


def test_failures_that_dominate_open_the_circuit(governors: Governors) -> None:
    async def scenario(new: NewGovernor) -> tuple[Slot, TeacherBusy]:
        governor = new(GovernorLimits(failures=3, cooldown_s=5.0))
        for _ in range(3):
            await governor.report("failure")
        slot = await governor.acquire(1)
        with pytest.raises(TeacherBusy) as caught:
            await wait_for_slot(governor, 1, 1.0)
        return slot, caught.value

    slot, error = governors.run(scenario)

    assert slot.why == "open" and 4.9 < slot.wait_s <= 5.0
    assert error.retry_after_s is not None and 4.9 < error.retry_after_s <= 5.0
    assert "circuit breaker is open" in str(error)


def test_fast_failures_among_slow_successes_keep_the_circuit_closed(
    governors: Governors,
) -> None:
    """Five quick 5xx within one latency window used to read as 'five in a row'."""

    async def scenario(new: NewGovernor) -> Slot:
        governor = new(GovernorLimits(failures=5, cooldown_s=5.0))
        await governor.lease(("w", 64, 64, 60, False, 60))  # 60 answers came back fine
        for _ in range(8):
            await governor.report("failure")
        return await governor.acquire(1)

    assert governors.run(scenario) == Slot(0.0)


def test_an_outage_opens_the_circuit_whatever_came_before(governors: Governors) -> None:
    """A minute of answers must not hide an outage: failures with no answer for a while."""

    async def scenario(new: NewGovernor) -> tuple[Slot, Slot]:
        governor = new(GovernorLimits(failures=5, cooldown_s=5.0))
        await governor.lease(("w", 64, 64, 500, False, 500))  # 500 answers just now
        for _ in range(6):
            await governor.report("failure", quiet_s=10.0)
        still_closed = await governor.acquire(1)
        await asyncio.sleep(0.25)  # no answer since: the teacher is down
        for _ in range(6):
            await governor.report("failure", quiet_s=0.2)
        return still_closed, await governor.acquire(1)

    closed, opened = governors.run(scenario)

    assert closed == Slot(0.0)
    assert opened.why == "open"


def test_half_open_lets_one_probe_through_and_success_closes(governors: Governors) -> None:
    async def scenario(new: NewGovernor) -> list[Slot]:
        governor = new(BREAKER)
        await open_circuit(governor)
        during = await governor.acquire(1)
        await asyncio.sleep(during.wait_s + 0.02)
        probe = await governor.acquire(1)
        other = await governor.acquire(1)
        await governor.report("ok", probe=True)
        return [during, probe, other, await governor.acquire(1), await governor.acquire(1)]

    during, probe, other, first, second = governors.run(scenario)

    assert during.why == "open" and 0.15 < during.wait_s <= 0.2
    assert probe == Slot(0.0, probe=True)  # the probe must report back
    assert other.why == "probe" and 0 < other.wait_s <= 1.0
    assert first == second == Slot(0.0)


def test_failed_probe_reopens_the_circuit(governors: Governors) -> None:
    async def scenario(new: NewGovernor) -> tuple[Slot, Slot]:
        governor = new(BREAKER)
        await open_circuit(governor)
        await asyncio.sleep(BREAKER.cooldown_s + 0.02)
        probe = await governor.acquire(1)
        await governor.report("failure", probe=True)  # one failure is enough for a probe
        return probe, await governor.acquire(1)

    probe, reopened = governors.run(scenario)

    assert probe == Slot(0.0, probe=True)
    assert reopened.why == "open" and 0.15 < reopened.wait_s <= 0.2


def test_failures_of_calls_sent_before_the_opening_do_not_extend_it() -> None:
    clock = Clock()
    governor = LocalGovernor(GovernorLimits(failures=3, cooldown_s=10.0), clock=clock)

    async def scenario() -> tuple[Slot, Slot]:
        await open_circuit(governor)
        clock.ms += 9_000
        for _ in range(20):  # the rest of the calls in flight time out late
            await governor.report("failure")
        clock.ms += 1_001
        late = await governor.acquire(1)
        for _ in range(5):  # still late, while the probe is out: not the probe's failure
            await governor.report("failure")
        return late, await governor.acquire(1)

    probe, during_probe = asyncio.run(scenario())

    assert probe == Slot(0.0, probe=True)
    assert during_probe.why == "probe"


def test_old_failures_fade_out() -> None:
    clock = Clock()
    governor = LocalGovernor(GovernorLimits(failures=3, window_s=10.0), clock=clock)

    async def scenario() -> Slot:
        await governor.report("failure")
        await governor.report("failure")
        clock.ms += 60_000  # six half-lives
        await governor.report("failure")
        return await governor.acquire(1)

    assert asyncio.run(scenario()) == Slot(0.0)


def test_probe_that_never_reports_frees_the_slot() -> None:
    limits = GovernorLimits(failures=1, cooldown_s=10.0)
    state: dict[str, float] = {}
    rules.report(state, limits, "failure", False, now=0.0)
    assert rules.acquire(state, limits, 1, now=9_000.0).wait_s == pytest.approx(1.0)
    assert rules.acquire(state, limits, 1, now=10_000.0) == Slot(0.0, probe=True)
    assert rules.acquire(state, limits, 1, now=10_001.0).why == "probe"
    assert rules.acquire(state, limits, 1, now=10_000.0 + PROBE_MS + 1) == Slot(0.0, probe=True)


# --- calls in flight: AIMD and leases -------------------------------------------------------

FLEET = GovernorLimits(concurrency=64, min_concurrency=2)


def test_a_first_lease_gets_what_it_wants_up_to_the_ceiling(governors: Governors) -> None:
    async def scenario(new: NewGovernor) -> list[int]:
        governor = new(FLEET)
        small = await governor.lease(("a", 10, 0, 0, False, 0))
        big = await governor.lease(("a", 500, 0, 0, False, 0))
        return [small.granted, big.granted]

    assert governors.run(scenario) == [10, 64]


def test_an_overload_shrinks_the_limit_once_per_epoch(governors: Governors) -> None:
    async def scenario(new: NewGovernor) -> list[tuple[float, int]]:
        governor = new(FLEET)
        first = await governor.overload(("a", 0, 1000))
        again = await governor.overload(("a", 0, 1000))  # a call of the same wave: no second cut
        later = await governor.overload(("a", 1, 1000))  # a call sent after the cut
        return [first, again, later]

    first, again, later = governors.run(scenario)

    assert first == (pytest.approx(60.8), 1)
    assert again == (pytest.approx(60.8), 1)
    assert later == (pytest.approx(57.76), 2)


def test_an_overload_drops_to_the_calls_the_fleet_still_has_in_flight(
    governors: Governors,
) -> None:
    """A wave of 429s shows the teacher's capacity: the calls it kept are what it takes."""

    async def scenario(new: NewGovernor) -> float:
        governor = new(GovernorLimits(concurrency=64))
        await governor.lease(("a", 64, 0, 0, False, 0))
        await governor.lease(("b", 10, 0, 0, False, 0))  # the other worker holds 0 of 10
        await governor.lease(("a", 64, 40, 0, True, 0))
        await governor.lease(("b", 12, 12, 0, True, 0))  # and now 12
        limit, _ = await governor.overload(("a", 0, 20))  # a kept 20 after the wave came back
        return limit

    assert governors.run(scenario) == 32.0


def test_the_limit_never_shrinks_below_min_concurrency(governors: Governors) -> None:
    async def scenario(new: NewGovernor) -> float:
        governor = new(FLEET)
        limit = 64.0
        for epoch in range(100):
            limit, _ = await governor.overload(("a", epoch, 1000))
        return limit

    assert governors.run(scenario) == 2.0


def test_the_limit_grows_by_one_per_limit_answers_while_callers_wait(
    governors: Governors,
) -> None:
    async def scenario(new: NewGovernor) -> list[float]:
        governor = new(GovernorLimits(concurrency=64))
        for epoch in range(3):
            await governor.overload(("a", epoch, 1000))  # 64 -> 54.87
        seen = []
        idle = await governor.lease(("a", 20, 20, 200, False, 0))  # nobody waited: no growth
        seen.append(idle.limit)
        grown = await governor.lease(("a", 64, 54, 54, True, 0))  # one window's worth: +1
        seen.append(grown.limit)
        grown = await governor.lease(("a", 64, 55, 55 * 4, True, 0))  # four windows
        seen.append(grown.limit)
        top = await governor.lease(("a", 64, 50, 100_000, True, 0))
        seen.append(top.limit)
        return seen

    idle, one, four, top = governors.run(scenario)

    assert idle == pytest.approx(54.872)
    assert one == pytest.approx(55.872)  # below the last overload point: one per window
    assert four == pytest.approx(56.872)  # past it: one per four windows
    assert top == 64.0  # the spec's concurrency is the ceiling


def test_two_processes_share_the_limit_fairly(governors: Governors) -> None:
    async def scenario(new: NewGovernor) -> list[int]:
        governor = new(GovernorLimits(concurrency=64))
        a1 = await governor.lease(("a", 100, 0, 0, False, 0))  # alone: all of it
        b1 = await governor.lease(("b", 100, 0, 0, False, 0))  # nothing free yet
        a2 = await governor.lease(("a", 100, 64, 0, True, 0))  # shrinks to its fair share
        b2 = await governor.lease(("b", 100, 0, 0, True, 0))  # a still holds its 64 in flight
        a3 = await governor.lease(("a", 100, 32, 0, True, 0))  # a's calls drained to 32
        b3 = await governor.lease(("b", 100, 0, 0, True, 0))
        return [a1.granted, b1.granted, a2.granted, b2.granted, a3.granted, b3.granted]

    assert governors.run(scenario) == [64, 0, 32, 0, 32, 32]


def test_a_lost_processs_slots_come_back_when_its_lease_expires() -> None:
    clock = Clock()
    governor = LocalGovernor(GovernorLimits(concurrency=16), clock=clock)

    async def scenario() -> list[int]:
        lost = await governor.lease(("lost", 16, 0, 0, False, 0))
        before = await governor.lease(("alive", 16, 0, 0, False, 0))
        clock.ms += 5_001
        after = await governor.lease(("alive", 16, 0, 0, True, 0))
        return [lost.granted, before.granted, after.granted]

    assert asyncio.run(scenario()) == [16, 0, 16]


@pytest.mark.redis
def test_lua_and_python_agree_on_leases_and_overloads(redis_url: str) -> None:
    """The same sequence through both implementations gives the same grants and limits."""
    steps: list[tuple[str, Any]] = [
        ("lease", ("a", 40, 0, 0, False, 3)),
        ("lease", ("b", 40, 0, 0, False, 3)),
        ("overload", ("a", 0, 30)),
        ("lease", ("a", 40, 40, 12, True, 3)),
        ("lease", ("b", 40, 0, 0, True, 3)),
        ("overload", ("b", 1, 15)),
        ("lease", ("a", 40, 20, 57, True, 3)),
        ("lease", ("b", 40, 15, 20, True, 3)),
        ("lease", ("c", 5, 0, 0, False, 3)),
        ("lease", ("a", 0, 0, 0, False, 3)),
        ("lease", ("b", 40, 10, 200, True, 3)),
    ]

    async def run(governor: Governor) -> list[Any]:
        seen: list[Any] = []
        for kind, arg in steps:
            if kind == "lease":
                got = await governor.lease(arg)
                seen.append((got.granted, round(got.limit, 6), got.epoch))
            else:
                token, epoch, in_flight = arg
                limit, epoch = await governor.overload((token, epoch, in_flight))
                seen.append((round(limit, 6), epoch))
        return seen

    async def both() -> tuple[list[Any], list[Any]]:
        client = aredis.Redis.from_url(redis_url)
        limits = GovernorLimits(concurrency=48, min_concurrency=4)
        key = f"stillhouse:governor:test-{uuid.uuid4().hex}"
        try:
            return await run(LocalGovernor(limits)), await run(RedisGovernor(client, key, limits))
        finally:
            await client.aclose()

    local, shared = asyncio.run(both())

    assert local == shared


def test_limits_of_reads_the_specs_teacher() -> None:
    config = TeacherConfig(model="m", concurrency=32, min_concurrency=4, rpm=600)
    limits = limits_of(config)
    assert (limits.concurrency, limits.min_concurrency, limits.rpm) == (32, 4, 600)
    assert (
        limits_of(TeacherConfig(model="m", concurrency=2, min_concurrency=8)).min_concurrency == 2
    )


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
        governor = RedisGovernor(client, governor_key(config), limits_of(config))
        key = teacher_key(config)
        configured = make_http_client(config, api_key=key, transport="httpx")
        async with httpx.AsyncClient(
            base_url=configured.base_url,
            headers=configured.headers,
            transport=httpx.MockTransport(handler),
        ) as http:
            teacher = TeacherClient(
                config, http, api_key=key, governor=governor, backoff_base_s=0.001
            )
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


@pytest.mark.redis
def test_a_burst_past_the_redis_pool_waits_its_turn_and_shares_one_check(redis_url: str) -> None:
    """300 calls at once, three times redis-py's default pool: every one gets its answer (the
    default pool refused the 101st with "Too many connections", read as Redis being down:
    a 2 s wait for every call past the 100th). Unpaced, the burst costs one round trip."""

    async def go() -> None:
        client = shared_redis(redis_url)
        key = f"stillhouse:governor:test-{uuid.uuid4().hex}"
        unpaced = RedisGovernor(client, key, GovernorLimits(concurrency=512))
        script, asked = unpaced._acquire, []

        async def counted(**kwargs: Any) -> Any:
            asked.append(1)
            return await script(**kwargs)

        unpaced._acquire = counted
        slots = await asyncio.gather(*(unpaced.acquire(1) for _ in range(300)))
        assert [s.wait_s for s in slots] == [0.0] * 300
        assert len(asked) == 1
        # Paced, each call takes its own request from the bucket: 300 scripts, 32 connections.
        paced = RedisGovernor(client, key + ":paced", GovernorLimits(rpm=1_000_000))
        slots = await asyncio.gather(*(paced.acquire(1) for _ in range(300)))
        assert [s.wait_s for s in slots] == [0.0] * 300
        await client.aclose()

    asyncio.run(go())


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
        with pytest.raises(Unavailable):
            await governor.lease(("a", 1, 0, 0, False, 0))
        await client.aclose()

    asyncio.run(go())


@pytest.mark.redis
def test_the_lua_scripts_decide_as_the_python_rules_do_on_the_same_clock(redis_url: str) -> None:
    """The same calls at the same clock steps, to the in-process governor and to the Redis
    one (its scripts given the clock instead of Redis's TIME): the same decisions, through
    rate buckets, the breaker opening, its probe, learned limits, leases and a cut."""
    limits = GovernorLimits(
        rpm=120, tpm=6000, failures=3, cooldown_s=2.0, concurrency=16, min_concurrency=2
    )
    steps: list[tuple[float, str, Any]] = [
        (0, "acquire", 100),
        (0, "acquire", 100),
        (10, "acquire", 100),
        (600, "acquire", 100),
        (5, "report", "failure"),
        (5, "report", "failure"),
        (5, "report", "failure"),
        (5, "acquire", 10),
        (2100, "acquire", 10),
        (1, "acquire", 10),
        (50, "report", "probe-ok"),
        (0, "observe", RateHeaders(60, 0, 5.0, 100_000, 50_000, 1.0)),
        (0, "acquire", 10),
        (1500, "acquire", 10),
        (0, "lease", ("a", 8, 0, 0, False, 0)),
        (0, "lease", ("b", 8, 0, 0, False, 0)),
        (20, "overload", ("a", 0, 4)),
        (10, "lease", ("a", 8, 4, 0, True, 0)),
        (5100, "lease", ("b", 16, 2, 20, True, 5)),
    ]

    async def run(governor: Governor, clock: Clock) -> list[Any]:
        seen: list[Any] = []
        for advance, kind, arg in steps:
            clock.ms += advance
            if kind == "acquire":
                slot = await governor.acquire(arg)
                seen.append((round(slot.wait_s, 6), slot.probe, slot.why))
            elif kind == "report":
                probe = arg == "probe-ok"
                await governor.report("ok" if probe else arg, probe=probe, quiet_s=1.0)
            elif kind == "observe":
                await governor.observe(arg)
            elif kind == "lease":
                got = await governor.lease(arg)
                seen.append((got.granted, round(got.limit, 6), got.epoch, got.open_until_ms))
            else:
                seen.append(tuple(round(v, 6) for v in await governor.overload(arg)))
        return seen

    async def both() -> tuple[list[Any], list[Any]]:
        client = shared_redis(redis_url)
        key = f"stillhouse:governor:test-{uuid.uuid4().hex}"
        local_clock, redis_clock = Clock(), Clock()
        shared = RedisGovernor(client, key, limits, clear_ttl_s=0.0, clock=redis_clock)
        try:
            return (
                await run(LocalGovernor(limits, clock=local_clock), local_clock),
                await run(shared, redis_clock),
            )
        finally:
            await client.aclose()

    local, shared = asyncio.run(both())
    assert local == shared
    # The sequence reached what it is for: a rate wait, the open circuit, the probe, the wait
    # behind it, and the pace learned from the headers.
    whys = {why for *_, why in (s for s in local if len(s) == 3 and isinstance(s[2], str))}
    assert {"rate", "open", "probe"} <= whys, local
