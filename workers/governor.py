"""One governor per teacher for the whole fleet: rates, calls in flight, the circuit breaker.

The algorithm is in ``governor_rules`` (read its docstring); this module holds it in two
places. :class:`RedisGovernor` keeps the state in Redis, where every decision is one atomic
Lua script (``governor_lua``), so any number of worker processes on any number of machines
share the teacher's requests per minute, tokens per minute, calls in flight and breaker.
:class:`LocalGovernor` runs the same rules in-process (embedded mode, tests with a clock).

A call asks :meth:`Governor.acquire` before it is sent (rates, blocks, breaker) while holding
a slot of its process's :class:`~workers.concurrency.SlotPool`, which leases its share of
the fleet's calls in flight through :meth:`Governor.lease`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import Callable
from typing import Any, Protocol

from redis.exceptions import RedisError

from schemas.errors import TeacherBusy, Unavailable
from workers import governor_rules as rules
from workers.governor_lua import ACQUIRE_LUA, LEASE_LUA, OBSERVE_LUA, OVERLOAD_LUA, REPORT_LUA
from workers.governor_rules import PROBE_MS, GovernorLimits, Lease, Slot
from workers.providers import RateHeaders
from workers.spec import TeacherConfig

log = logging.getLogger(__name__)

__all__ = [
    "PROBE_MS",
    "Governor",
    "GovernorLimits",
    "Lease",
    "LocalGovernor",
    "RedisGovernor",
    "Slot",
    "governor_key",
    "limits_of",
    "shared_redis",
    "wait_for_slot",
]

REDIS_DOWN_RETRY_S = 2.0  # how long a call waits when the shared limiter cannot be reached
# One process's connections to the shared limiter. Calls beyond it wait for a free one (up
# to REDIS_POOL_WAIT_S): redis-py's default pool refuses the 101st concurrent command with
# "Too many connections", which read as Redis being down and cost every call past the 100th
# a 2 s wait at high concurrency.
REDIS_POOL_SIZE = 32
REDIS_POOL_WAIT_S = 10.0
LEASE_TTL_MS = 5_000.0  # a process that stops renewing gives its slots back after this

# LeaseAsk: (process token, slots wanted, slots in use, answers fine since the last lease,
# whether callers waited for a slot meanwhile, answers fine the breaker has not heard of).
LeaseAsk = tuple[str, int, int, int, bool, int]
# OverloadAsk: (process token, the epoch the overloaded call was sent in, the calls the
# process still has in flight).
OverloadAsk = tuple[str, int, int]


def shared_redis(url: str) -> Any:
    """The asyncio Redis client a process's governors share: a bounded pool whose callers
    wait their turn for a connection instead of failing (build it inside the loop it
    serves)."""
    import redis.asyncio

    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url,
        max_connections=REDIS_POOL_SIZE,
        timeout=REDIS_POOL_WAIT_S,
        socket_timeout=REDIS_POOL_WAIT_S,
        socket_connect_timeout=5,
    )
    return redis.asyncio.Redis(connection_pool=pool)


def limits_of(config: TeacherConfig) -> GovernorLimits:
    """The governor's limits from a teacher's spec section."""
    return GovernorLimits(
        rpm=config.rpm,
        tpm=config.tpm,
        failures=config.breaker_failures,
        cooldown_s=config.breaker_cooldown_s,
        concurrency=config.concurrency,
        min_concurrency=min(config.min_concurrency, config.concurrency),
        failure_ratio=config.breaker_failure_ratio,
        window_s=config.breaker_window_s,
    )


def governor_key(config: TeacherConfig) -> str:
    """Limits belong to an account and model at one endpoint: that is what the key names."""
    raw = f"{config.provider}|{config.base_url.rstrip('/')}|{config.model}"
    return "stillhouse:governor:" + hashlib.sha256(raw.encode()).hexdigest()[:16]


def _header_values(headers: RateHeaders) -> tuple[float, float, float, float, float, float]:
    """Rate headers as six numbers, -1 where one was missing (the scripts' argument form)."""

    def num(value: float | None) -> float:
        return -1.0 if value is None else float(value)

    return (
        num(headers.limit_requests),
        num(headers.remaining_requests),
        num(headers.reset_requests_s),
        num(headers.limit_tokens),
        num(headers.remaining_tokens),
        num(headers.reset_tokens_s),
    )


class Governor(Protocol):
    limits: GovernorLimits

    async def acquire(self, tokens: int) -> Slot:
        """May a call worth ``tokens`` go now? (rates, blocks, the breaker)"""
        ...

    async def report(
        self, outcome: str, *, probe: bool = False, oks: int = 0, quiet_s: float = 1.0
    ) -> None:
        """A call's outcome for the breaker: ``ok`` or ``failure``, with the answers that
        came back fine since the reporter last told it (``oks``), and how long without an
        answer means the teacher is down (``quiet_s``)."""
        ...

    async def observe(self, headers: RateHeaders) -> None:
        """What the teacher's rate-limit headers said."""
        ...

    async def lease(self, ask: LeaseAsk) -> Lease:
        """Renew a process's share of the fleet's calls in flight."""
        ...

    async def overload(self, ask: OverloadAsk) -> tuple[float, int]:
        """An overload seen by a call sent in an epoch: (the limit now, the epoch now)."""
        ...


async def wait_for_slot(governor: Governor, tokens: int, max_wait_s: float) -> bool:
    """Wait for the governor up to ``max_wait_s``; returns whether this call is the breaker's
    probe. A longer wait becomes :class:`TeacherBusy` carrying the wait, which the pipeline
    writes to the item as ``retry_at`` (the item keeps its attempt: nothing was sent)."""
    waited = 0.0
    while True:
        slot = await governor.acquire(tokens)
        if slot.wait_s <= 0:
            return slot.probe
        if waited + slot.wait_s > max_wait_s:
            raise TeacherBusy(_busy_message(slot), retry_after_s=slot.wait_s)
        pause = slot.wait_s + random.uniform(0, min(0.05, slot.wait_s / 4))
        await asyncio.sleep(pause)
        waited += pause


def _busy_message(slot: Slot) -> str:
    why = {
        "open": "the teacher's circuit breaker is open after repeated failures (5xx, "
        "resets, timeouts)",
        "probe": "the teacher's circuit breaker is letting one probe call through first",
        "blocked": "the teacher said its rate limit is used up",
        "rate": "the teacher's rate limit (rpm/tpm) is used up",
    }.get(slot.why, "the teacher's limit is used up")
    return f"{why}; waiting {slot.wait_s:.1f} s before calling it again"


class LocalGovernor:
    """The governor of one process (embedded mode); ``clock`` returns milliseconds."""

    def __init__(self, limits: GovernorLimits, *, clock: Callable[[], float] | None = None) -> None:
        self.limits = limits
        self.state: dict[str, float] = {}
        self.holders: rules.Holders = {}
        self._clock = clock or (lambda: time.monotonic() * 1000)

    async def acquire(self, tokens: int) -> Slot:
        return rules.acquire(self.state, self.limits, tokens, self._clock())

    async def report(
        self, outcome: str, *, probe: bool = False, oks: int = 0, quiet_s: float = 1.0
    ) -> None:
        now = self._clock()
        rules.report(self.state, self.limits, outcome, probe, now, oks, quiet_s * 1000)

    async def observe(self, headers: RateHeaders) -> None:
        rules.observe(self.state, self.limits, _header_values(headers), self._clock())

    async def lease(self, ask: LeaseAsk) -> Lease:
        return rules.lease(self.state, self.holders, self.limits, ask, self._clock(), LEASE_TTL_MS)

    async def overload(self, ask: OverloadAsk) -> tuple[float, int]:
        return rules.overload(self.state, self.holders, self.limits, ask, self._clock())


class RedisGovernor:
    """The governor shared by every worker through Redis (atomic Lua scripts).

    Without rpm/tpm limits (the spec's or learned from headers) there is nothing to count per
    call, only blocks and the breaker to notice: then a clear answer from Redis is trusted
    for ``clear_ttl_s``, so a busy process asks Redis a few times a second rather than once
    per call; the calls that arrive while one such check is out share its answer (one
    round trip for a burst of 256 calls, not 256). A failure or rate headers seen locally
    end that trust at once.
    """

    def __init__(
        self,
        redis: Any,
        key: str,
        limits: GovernorLimits,
        *,
        clear_ttl_s: float = 0.1,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.redis = redis
        self._clock = clock  # milliseconds; None: Redis's own clock (the fleet's one clock)
        self.key = key
        self.limits = limits
        self._paced = bool(limits.rpm or limits.tpm)
        self.clear_ttl_s = clear_ttl_s
        self._clear_until = 0.0
        self._checking: asyncio.Future[Slot] | None = None
        self._acquire = redis.register_script(ACQUIRE_LUA)
        self._report = redis.register_script(REPORT_LUA)
        self._observe = redis.register_script(OBSERVE_LUA)
        self._lease = redis.register_script(LEASE_LUA)
        self._overload = redis.register_script(OVERLOAD_LUA)

    def _args(self, args: list[Any]) -> list[Any]:
        """The script's arguments, and the clock last (empty: the script reads Redis's)."""
        return [*args, "" if self._clock is None else repr(self._clock())]

    async def _call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return await script(keys=keys, args=self._args(args))
        except RedisError as exc:
            # Nothing is sent without the shared limit: the item waits like any transient error.
            raise Unavailable(
                f"the shared rate limiter (Redis) is unreachable: {exc}",
                retry_after_s=REDIS_DOWN_RETRY_S,
            ) from exc

    async def acquire(self, tokens: int) -> Slot:
        if self._paced:
            return await self._ask(tokens)  # each call takes its own share of the buckets
        if time.monotonic() < self._clear_until:
            return Slot(0.0)
        check = self._checking
        if check is None or check.done():
            check = self._checking = asyncio.ensure_future(self._ask(tokens))
            return await asyncio.shield(check)
        slot = await asyncio.shield(check)
        # A half-open circuit's probe is one call's: the others ask for themselves (and wait).
        return await self._ask(tokens) if slot.probe else slot

    async def _ask(self, tokens: int) -> Slot:
        lim = self.limits
        wait, probe, why = await self._call(
            self._acquire, [self.key], [lim.rpm or 0, lim.tpm or 0, tokens, PROBE_MS]
        )
        slot = Slot(float(wait), bool(int(probe)), why.decode() if isinstance(why, bytes) else why)
        if slot.wait_s == 0 and not slot.probe:
            self._clear_until = time.monotonic() + self.clear_ttl_s
        return slot

    async def report(
        self, outcome: str, *, probe: bool = False, oks: int = 0, quiet_s: float = 1.0
    ) -> None:
        if outcome != "ok":
            self._clear_until = 0.0
        lim = self.limits
        args = [outcome, int(probe), lim.failures, lim.cooldown_s, lim.failure_ratio]
        args += [lim.window_s, oks, quiet_s * 1000]
        try:
            await self._report(keys=[self.key], args=self._args(args))
        except RedisError as exc:
            # The answer is already paid for: losing one report to the shared state must not
            # lose the answer with it.
            log.warning("cannot report %s to the shared rate limiter: %s", outcome, exc)

    async def observe(self, headers: RateHeaders) -> None:
        self._paced = self._paced or bool(headers.limit_requests or headers.limit_tokens)
        self._clear_until = 0.0
        lim = self.limits
        try:
            await self._observe(
                keys=[self.key],
                args=self._args([lim.rpm or 0, lim.tpm or 0, *_header_values(headers)]),
            )
        except RedisError as exc:
            log.warning("cannot share the teacher's rate headers: %s", exc)

    async def lease(self, ask: LeaseAsk) -> Lease:
        token, want, in_use, successes, limited, oks = ask
        lim = self.limits
        granted, limit, epoch, open_until = await self._call(
            self._lease,
            [self.key, self.key + ":holders"],
            [
                token,
                want,
                in_use,
                successes,
                int(limited),
                lim.concurrency,
                lim.min_concurrency,
                LEASE_TTL_MS,
                lim.window_s,
                oks,
            ],
        )
        return Lease(int(granted), float(limit), int(epoch), float(open_until))

    async def overload(self, ask: OverloadAsk) -> tuple[float, int]:
        lim = self.limits
        limit, current = await self._call(
            self._overload,
            [self.key, self.key + ":holders"],
            [*ask, lim.concurrency, lim.min_concurrency, lim.backoff],
        )
        return float(limit), int(current)
