"""One governor for all workers: shared rate limits, AIMD on 429, Retry-After, circuit breaker.

The state lives in Redis (one hash per teacher) and every decision is one atomic Lua script,
so any number of worker processes on any number of machines share the teacher's requests per
minute and tokens per minute. In embedded mode :class:`LocalGovernor` runs the same algorithm
in-process. The algorithm, per teacher:

- two token buckets (requests, tokens), each refilled at ``limit * factor / 60`` per second
  and holding one second's worth; a request larger than a bucket may borrow (the bucket goes
  negative and later callers wait);
- ``factor`` is the AIMD multiplier: a 429 halves it (at most once a second, so one burst of
  429s counts once, floor 0.05), and it recovers linearly by ``recovery_per_s``;
- a 429's ``Retry-After`` (1 s when absent) blocks every caller until it has passed;
- ``failures`` consecutive 5xx, resets or timeouts open the circuit for ``cooldown_s``; then a
  single probe call is let through: its success closes the circuit, its failure reopens it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Protocol

from redis.exceptions import RedisError

from schemas.errors import RateLimited, Unavailable
from workers.spec import TeacherConfig

log = logging.getLogger(__name__)

__all__ = [
    "Governor",
    "GovernorLimits",
    "LocalGovernor",
    "RedisGovernor",
    "governor_key",
    "wait_for_slot",
]

MIN_FACTOR = 0.05
REDIS_DOWN_RETRY_S = 2.0  # how long a call waits when the shared limiter cannot be reached
PROBE_MS = 30_000  # a half-open probe that never reports back frees the slot after this
DEFAULT_RETRY_AFTER_S = 1.0


@dataclass(frozen=True, slots=True)
class GovernorLimits:
    rpm: int | None = None
    tpm: int | None = None
    failures: int = 5
    cooldown_s: float = 30.0
    recovery_per_s: float = 0.02

    @classmethod
    def from_config(cls, config: TeacherConfig) -> GovernorLimits:
        return cls(config.rpm, config.tpm, config.breaker_failures, config.breaker_cooldown_s)


def governor_key(config: TeacherConfig) -> str:
    """Limits belong to an account and model at one endpoint: that is what the key names."""
    raw = f"{config.provider}|{config.base_url.rstrip('/')}|{config.model}"
    return "stillhouse:governor:" + hashlib.sha256(raw.encode()).hexdigest()[:16]


class Governor(Protocol):
    async def acquire(self, tokens: int) -> tuple[float, bool]:
        """Take a slot if one is free: (seconds to wait, 0 if taken; whether to report ok)."""
        ...

    async def report(self, outcome: str, retry_after_s: float | None = None) -> None:
        """Report a call's outcome: ``ok``, ``rate_limited`` or ``failure``."""
        ...


async def wait_for_slot(governor: Governor, tokens: int, max_wait_s: float) -> bool:
    """Wait for the governor up to ``max_wait_s``; a longer wait becomes a RateLimited
    carrying the wait, which the pipeline writes to the item as ``retry_at``."""
    waited = 0.0
    while True:
        wait, report_ok = await governor.acquire(tokens)
        if wait <= 0:
            return report_ok
        if waited + wait > max_wait_s:
            raise RateLimited(
                f"the shared teacher limit asks for a {wait:.1f} s wait", retry_after_s=wait
            )
        pause = wait + random.uniform(0, min(0.05, wait / 4))
        await asyncio.sleep(pause)
        waited += pause


# -- the algorithm, once in Python (embedded) and once in Lua (Redis) ------------------------


class LocalGovernor:
    """The governor for one process (embedded mode); same algorithm as the Redis script."""

    def __init__(self, limits: GovernorLimits) -> None:
        self.limits = limits
        self.state: dict[str, float] = {}

    async def acquire(self, tokens: int) -> tuple[float, bool]:
        return _acquire(self.state, self.limits, tokens, time.monotonic() * 1000)

    async def report(self, outcome: str, retry_after_s: float | None = None) -> None:
        _report(self.state, self.limits, outcome, retry_after_s, time.monotonic() * 1000)


def _acquire(
    s: dict[str, float], lim: GovernorLimits, tokens: int, now: float
) -> tuple[float, bool]:
    open_until = s.get("open_until", 0.0)
    if open_until > now:
        return (open_until - now) / 1000, True
    probe_until = s.get("probe_until", 0.0)
    if s.get("half_open") and probe_until > now:
        return min(1.0, (probe_until - now) / 1000), True
    blocked = s.get("blocked_until", 0.0)
    if blocked > now:
        return (blocked - now) / 1000, True
    factor = min(
        1.0, s.get("factor", 1.0) + (now - s.get("factor_ts", now)) / 1000 * lim.recovery_per_s
    )
    wait = max(
        _bucket_wait(s, "req", lim.rpm, 1, factor, now),
        _bucket_wait(s, "tok", lim.tpm, tokens, factor, now),
    )
    if wait > 0:
        return wait, True
    _bucket_take(s, "req", lim.rpm, 1)
    _bucket_take(s, "tok", lim.tpm, tokens)
    if s.get("half_open"):
        s["probe_until"] = now + PROBE_MS  # this caller is the probe; the others wait for it
    return 0.0, bool(s.get("fails") or s.get("half_open"))


def _bucket_wait(
    s: dict[str, float], name: str, limit: int | None, need: int, factor: float, now: float
) -> float:
    if not limit:
        return 0.0
    rate = limit * factor / 60_000  # per ms
    capacity = max(1.0, limit * factor / 60)
    level = s.get(f"{name}_level", capacity)
    level = min(capacity, level + (now - s.get(f"{name}_ts", now)) * rate)
    s[f"{name}_level"], s[f"{name}_ts"] = level, now
    enough = min(float(need), capacity)
    return 0.0 if level >= enough else (enough - level) / rate / 1000


def _bucket_take(s: dict[str, float], name: str, limit: int | None, need: int) -> None:
    if limit:
        s[f"{name}_level"] -= need


def _report(
    s: dict[str, float], lim: GovernorLimits, outcome: str, retry_after_s: float | None, now: float
) -> None:
    if outcome == "ok":
        s["fails"], s["half_open"], s["probe_until"] = 0, 0, 0
        return
    if outcome == "rate_limited":
        if now - s.get("factor_ts", -1e12) >= 1000:
            current = min(
                1.0,
                s.get("factor", 1.0) + (now - s.get("factor_ts", now)) / 1000 * lim.recovery_per_s,
            )
            s["factor"], s["factor_ts"] = max(MIN_FACTOR, current / 2), now
        wait_ms = (retry_after_s if retry_after_s is not None else DEFAULT_RETRY_AFTER_S) * 1000
        s["blocked_until"] = max(s.get("blocked_until", 0.0), now + wait_ms)
        return
    s["fails"] = s.get("fails", 0) + 1
    if s.get("half_open") or s["fails"] >= lim.failures:
        s["open_until"], s["half_open"], s["fails"], s["probe_until"] = (
            now + lim.cooldown_s * 1000,
            1,
            0,
            0,
        )


_LUA_COMMON = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local key = KEYS[1]
local function get(f, d) local v = redis.call('HGET', key, f); if v then return tonumber(v) end; return d end
redis.call('PEXPIRE', key, 3600000)
"""

ACQUIRE_LUA = (
    _LUA_COMMON
    + """
local rpm, tpm, need, recovery = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local probe_ms = tonumber(ARGV[5])
local open_until = get('open_until', 0)
if open_until > now then return {tostring((open_until - now) / 1000), 1} end
local probe_until = get('probe_until', 0)
if get('half_open', 0) == 1 and probe_until > now then
  return {tostring(math.min(1.0, (probe_until - now) / 1000)), 1}
end
local blocked = get('blocked_until', 0)
if blocked > now then return {tostring((blocked - now) / 1000), 1} end
local factor = math.min(1.0, get('factor', 1.0) + (now - get('factor_ts', now)) / 1000 * recovery)
local function wait_for(name, limit, n)
  if limit <= 0 then return 0 end
  local rate = limit * factor / 60000
  local cap = math.max(1.0, limit * factor / 60)
  local level = math.min(cap, get(name .. '_level', cap) + (now - get(name .. '_ts', now)) * rate)
  redis.call('HSET', key, name .. '_level', level, name .. '_ts', now)
  local enough = math.min(n, cap)
  if level >= enough then return 0 end
  return (enough - level) / rate / 1000
end
local wait = math.max(wait_for('req', rpm, 1), wait_for('tok', tpm, need))
if wait > 0 then return {tostring(wait), 1} end
if rpm > 0 then redis.call('HINCRBYFLOAT', key, 'req_level', -1) end
if tpm > 0 then redis.call('HINCRBYFLOAT', key, 'tok_level', -need) end
if get('half_open', 0) == 1 then redis.call('HSET', key, 'probe_until', now + probe_ms) end
local report_ok = 0
if get('fails', 0) > 0 or get('half_open', 0) == 1 then report_ok = 1 end
return {'0', report_ok}
"""
)

REPORT_LUA = (
    _LUA_COMMON
    + """
local outcome, retry_after, failures, cooldown, recovery = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
if outcome == 'ok' then
  redis.call('HSET', key, 'fails', 0, 'half_open', 0, 'probe_until', 0)
  return 0
end
if outcome == 'rate_limited' then
  local factor_ts = get('factor_ts', -1e12)
  if now - factor_ts >= 1000 then
    local current = math.min(1.0, get('factor', 1.0) + (now - get('factor_ts', now)) / 1000 * recovery)
    redis.call('HSET', key, 'factor', math.max(tonumber(ARGV[6]), current / 2), 'factor_ts', now)
  end
  redis.call('HSET', key, 'blocked_until', math.max(get('blocked_until', 0), now + retry_after * 1000))
  return 0
end
local fails = redis.call('HINCRBY', key, 'fails', 1)
if get('half_open', 0) == 1 or fails >= failures then
  redis.call('HSET', key, 'open_until', now + cooldown * 1000, 'half_open', 1, 'fails', 0, 'probe_until', 0)
end
return 0
"""
)


class RedisGovernor:
    """The governor shared by every worker through Redis (atomic Lua scripts).

    Without rpm/tpm limits there is nothing to count per call, only blocks (Retry-After, an
    open circuit) to notice: then a clear answer from Redis is trusted for ``clear_ttl_s``, so
    a busy process asks Redis a few times a second rather than once per call. A 429 or a
    failure seen locally ends that trust at once.
    """

    def __init__(
        self, redis: Any, key: str, limits: GovernorLimits, *, clear_ttl_s: float = 0.1
    ) -> None:
        self.redis = redis
        self.key = key
        self.limits = limits
        self.clear_ttl_s = clear_ttl_s if not (limits.rpm or limits.tpm) else 0.0
        self._clear_until = 0.0
        self._acquire = redis.register_script(ACQUIRE_LUA)
        self._report = redis.register_script(REPORT_LUA)

    async def acquire(self, tokens: int) -> tuple[float, bool]:
        if self.clear_ttl_s and time.monotonic() < self._clear_until:
            return 0.0, False
        lim = self.limits
        try:
            wait, report_ok = await self._acquire(
                keys=[self.key],
                args=[lim.rpm or 0, lim.tpm or 0, tokens, lim.recovery_per_s, PROBE_MS],
            )
        except RedisError as exc:
            # Nothing is sent without the shared limit: the item waits like any transient error.
            raise Unavailable(
                f"the shared rate limiter (Redis) is unreachable: {exc}",
                retry_after_s=REDIS_DOWN_RETRY_S,
            ) from exc
        if float(wait) == 0 and not int(report_ok):
            self._clear_until = time.monotonic() + self.clear_ttl_s
        return float(wait), bool(int(report_ok))

    async def report(self, outcome: str, retry_after_s: float | None = None) -> None:
        if outcome != "ok":
            self._clear_until = 0.0
        lim = self.limits
        retry = retry_after_s if retry_after_s is not None else DEFAULT_RETRY_AFTER_S
        try:
            await self._report(
                keys=[self.key],
                args=[outcome, retry, lim.failures, lim.cooldown_s, lim.recovery_per_s, MIN_FACTOR],
            )
        except RedisError as exc:
            # The answer is already paid for: losing one report to the shared state must not
            # lose the answer with it.
            log.warning("cannot report %s to the shared rate limiter: %s", outcome, exc)
