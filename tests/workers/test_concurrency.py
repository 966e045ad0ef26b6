"""A process's share of the fleet's calls in flight (``SlotPool``), the latency watch, the
stall watch, and the fleet-wide limit across real processes sharing one Redis."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import redis as sync_redis
from support import ROOT as REPO

from workers.concurrency import LatencyWatch, SlotPool
from workers.governor import GovernorLimits, LocalGovernor
from workers.loop import StallWatch


async def _hold(pool: SlotPool, seen: list[int], seconds: float, outcome: str = "ok") -> None:
    epoch = await pool.acquire()
    seen.append(pool.in_use)
    await asyncio.sleep(seconds)
    pool.release(epoch, outcome, seconds)


def test_calls_in_flight_never_exceed_the_limit() -> None:
    async def go() -> tuple[int, int]:
        pool = SlotPool(LocalGovernor(GovernorLimits(concurrency=8)), "p")
        seen: list[int] = []
        await asyncio.gather(*(_hold(pool, seen, 0.005) for _ in range(60)))
        await pool.close()
        return max(seen), len(seen)

    assert asyncio.run(go()) == (8, 60)


def test_two_pools_share_one_fleet_limit() -> None:
    async def go() -> tuple[int, int, int]:
        governor = LocalGovernor(GovernorLimits(concurrency=10))
        a, b = SlotPool(governor, "a"), SlotPool(governor, "b")
        peak = {"now": 0, "max": 0, "a": 0, "b": 0}

        async def one(pool: SlotPool, name: str) -> None:
            epoch = await pool.acquire()
            peak["now"] += 1
            peak[name] += 1
            peak["max"] = max(peak["max"], peak["now"])
            await asyncio.sleep(0.01)
            peak["now"] -= 1
            pool.release(epoch, "ok", 0.01)

        await asyncio.gather(*(one(a, "a") for _ in range(100)), *(one(b, "b") for _ in range(100)))
        await a.close()
        await b.close()
        return peak["max"], peak["a"], peak["b"]

    most, done_a, done_b = asyncio.run(go())

    assert most <= 10
    assert done_a == done_b == 100


def test_an_overload_retires_the_slot_until_the_governor_cuts_the_limit() -> None:
    async def go() -> tuple[int, int, float, int]:
        pool = SlotPool(LocalGovernor(GovernorLimits(concurrency=8)), "p")
        epochs = [await pool.acquire() for _ in range(8)]
        pool.release(epochs[0], "overload")
        held_at_once = pool.held
        waiter = asyncio.create_task(pool.acquire())
        await asyncio.sleep(0)
        granted_at_once = pool.in_use
        await asyncio.sleep(0.1)  # the renewal: the cut, then a new lease
        waiter.cancel()
        return held_at_once, granted_at_once, pool.limit, pool.epoch

    held, in_use, limit, epoch = asyncio.run(go())

    assert held == 7 and in_use == 7  # the refused call's slot did not go to the waiter
    assert epoch == 1 and limit == pytest.approx(7.0)  # min(8 * 0.95, the 7 still in flight)


def test_a_lease_that_ran_out_hands_out_nothing_before_it_is_renewed() -> None:
    now = {"s": 1000.0}
    governor = LocalGovernor(GovernorLimits(concurrency=4))

    async def go() -> tuple[bool, bool]:
        pool = SlotPool(governor, "p", clock=lambda: now["s"])
        pool.release(await pool.acquire(), "ok", 0.01)
        fresh = pool._free()
        now["s"] += 60  # the process was stopped for a minute
        stale = pool._free()
        await pool.close()
        return fresh, stale

    assert asyncio.run(go()) == (True, False)


def test_when_the_governor_is_unreachable_waiting_calls_get_the_error() -> None:
    from schemas.errors import Unavailable

    class Down(LocalGovernor):
        async def lease(self, ask):  # type: ignore[no-untyped-def, override]
            raise Unavailable("the shared rate limiter (Redis) is unreachable: refused")

    async def go() -> Exception:
        pool = SlotPool(Down(GovernorLimits(concurrency=4)), "p")
        with pytest.raises(Unavailable) as caught:
            await asyncio.wait_for(pool.acquire(), timeout=5)
        assert pool._task is not None
        pool._task.cancel()
        return caught.value

    assert "unreachable" in str(asyncio.run(go()))


def test_latency_watch_flags_a_sudden_rise_and_learns_a_lasting_one() -> None:
    watch = LatencyWatch(2.0, min_window=4)
    windows = [0.2] * 4 + [0.21] * 4 + [0.5] * 4 + [0.5] * 4 + [0.5] * 4 + [0.5] * 4 + [0.5] * 4
    flags = [watch.add(latency, 4) for latency in windows]
    closing = [flags[i] for i in range(3, len(flags), 4)]

    assert closing == [False, False, True, False, False, False, False]  # once, then learned


def test_latency_watch_off_never_flags() -> None:
    watch = LatencyWatch(None)
    assert not any(watch.add(latency, 1) for latency in [0.1] * 20 + [5.0] * 20)


def test_stall_watch_notices_a_stopped_process() -> None:
    now = {"s": 100.0}
    watch = StallWatch(clock=lambda: now["s"])
    watch.beat()
    sent = now["s"]
    now["s"] += 0.05
    watch.beat()
    assert not watch.stalled_since(sent)
    now["s"] += 30  # SIGSTOP, then SIGCONT: the tick has not run yet
    assert watch.stalled_since(sent)
    watch.beat()
    assert watch.stalled_since(sent)
    later = now["s"]
    now["s"] += 0.1
    watch.beat()
    assert not watch.stalled_since(later)


# --- the fleet: real processes, one Redis ----------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import asyncio, sys
    import redis.asyncio as aredis
    from workers.concurrency import SlotPool
    from workers.governor import GovernorLimits, RedisGovernor

    async def main(url, key, name, calls, hold_s):
        client = aredis.Redis.from_url(url)
        pool = SlotPool(RedisGovernor(client, key, GovernorLimits(concurrency=12)), name)

        async def one():
            epoch = await pool.acquire()
            now = await client.incr(key + ":now")
            await client.eval(
                "if tonumber(ARGV[1]) > tonumber(redis.call('GET', KEYS[1]) or 0) then "
                "redis.call('SET', KEYS[1], ARGV[1]) end", 1, key + ":max", now)
            await asyncio.sleep(hold_s)
            await client.decr(key + ":now")
            pool.release(epoch, "ok", hold_s)

        await client.incr(key + ":ready")
        while int(await client.get(key + ":ready")) < 2:
            await asyncio.sleep(0.005)
        await asyncio.gather(*(one() for _ in range(calls)))
        await pool.close()
        await client.aclose()
        print("done")

    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])))
    """
)


def _holder(script: Path, redis_url: str, key: str, name: str, calls: int, hold_s: float):  # type: ignore[no-untyped-def]
    return subprocess.Popen(
        [sys.executable, str(script), redis_url, key, name, str(calls), str(hold_s)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@pytest.mark.slow
@pytest.mark.redis
def test_two_processes_never_exceed_the_fleet_limit(redis_url: str, tmp_path: Path) -> None:
    script = tmp_path / "holder.py"
    script.write_text(HOLDER, encoding="utf-8")
    key = f"stillhouse:governor:test-{uuid.uuid4().hex}"
    workers = [_holder(script, redis_url, key, name, 150, 0.02) for name in ("a", "b")]
    for worker in workers:
        out, err = worker.communicate(timeout=60)
        assert worker.returncode == 0, err
        assert out.strip() == "done"
    client = sync_redis.Redis.from_url(redis_url)
    most = int(client.get(key + ":max") or 0)
    client.close()

    assert 6 <= most <= 12  # both used the teacher, never past its concurrency together


@pytest.mark.slow
@pytest.mark.redis
def test_a_killed_processs_slots_come_back_to_the_fleet(redis_url: str, tmp_path: Path) -> None:
    script = tmp_path / "holder.py"
    script.write_text(HOLDER, encoding="utf-8")
    key = f"stillhouse:governor:test-{uuid.uuid4().hex}"
    client = sync_redis.Redis.from_url(redis_url)
    client.set(key + ":ready", 1)  # the lost one starts at once and holds every slot
    lost = _holder(script, redis_url, key, "lost", 12, 600)
    deadline = time.monotonic() + 30
    while int(client.get(key + ":now") or 0) < 12:
        assert time.monotonic() < deadline, lost.stderr.read() if lost.stderr else ""
        time.sleep(0.05)
    os.killpg(lost.pid, signal.SIGKILL)
    lost.wait()
    client.set(key + ":ready", 1)
    started = time.monotonic()
    survivor = _holder(script, redis_url, key, "survivor", 12, 0.01)
    out, err = survivor.communicate(timeout=60)
    waited = time.monotonic() - started
    client.close()

    assert survivor.returncode == 0, err
    assert out.strip() == "done"
    assert 3.0 < waited < 20  # the dead one's lease (5 s) ran out; then its slots were free
