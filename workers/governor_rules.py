"""The governor's algorithm over one teacher's state, in Python (``governor_lua`` is the same
algorithm for Redis, where every worker of the fleet shares the state).

State is a flat dict of numbers (a Redis hash in the fleet), times in milliseconds:

- **Rates** (``rpm``, ``tpm``): two token buckets refilled at ``limit / 60`` per second that
  hold one second's worth; a request larger than a bucket borrows (the bucket goes
  negative). The limit is the spec's, or 0.97 of what the teacher's ``x-ratelimit-limit-*``
  headers say when that is lower (``learned_rpm``/``learned_tpm``): the spec's ``rpm``/``tpm``
  stay hard ceilings. The teacher's ``remaining`` counts pull the buckets down when they are
  lower than ours (we pace from what it says, before a 429 happens).
- **Concurrency**: ``limit`` is the number of calls in flight the fleet may have, between
  ``min_concurrency`` and ``concurrency``. It grows by one per ``limit`` answers that came
  back fine while callers were waiting for a slot (about one per round trip; one per four
  once it is past the point of the last overload, so it dwells where the teacher's capacity
  was found). On an overload (a 429 that is not a rate bucket running dry, or a latency
  rise) it shrinks to ``backoff`` of itself, or to the calls the fleet still has in flight
  when fewer (at most by half), once per ``epoch``: a call carries the epoch it was sent
  in, and only an overload from the current epoch counts, so one wave of 429s shrinks it
  once (as TCP halves its window once per loss event). Each process *leases* slots:
  ``holders`` maps a process token to (held, wanted, expiry); a lease grants at most what
  the others leave and at least a fair share of what they want; a lost process's slots
  come back at expiry.
- **Breaker**: failures (5xx, resets, timeouts) and successes are counted with a half-life
  of ``window_s``; the circuit opens when at least ``failures`` failures make at least
  ``failure_ratio`` of what came back. An open circuit waits ``cooldown_s``, then lets one
  probe through: its success closes the circuit, its failure opens it again. Failures
  reported while it is open (calls sent before it opened) change nothing.
- **Blocks**: ``blocked_until`` holds every new call while the teacher says nothing is left
  and no bucket can pace for it (its remaining count is 0 and we do not know its rate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "LEARNED_PACE",
    "PROBE_MS",
    "GovernorLimits",
    "Lease",
    "Slot",
    "acquire",
    "lease",
    "observe",
    "overload",
    "report",
]

PROBE_MS = 30_000  # a half-open probe that never reports back frees the slot after this
LEARNED_PACE = 0.97  # pace a little under a limit learned from headers: arrivals jitter
PROBE_WINDOWS = 4  # past the last overload point, the limit grows one per four windows


@dataclass(frozen=True, slots=True)
class GovernorLimits:
    """One teacher's limits, as the spec sets them."""

    rpm: int | None = None
    tpm: int | None = None
    failures: int = 5
    cooldown_s: float = 30.0
    concurrency: int = 16
    min_concurrency: int = 1
    backoff: float = 0.95
    failure_ratio: float = 0.5
    window_s: float = 10.0


@dataclass(frozen=True, slots=True)
class Slot:
    """The answer to ``acquire``: wait this long (0: go), whether this call is the breaker's
    probe (its outcome must be reported), and why it waits (``open``, ``probe``,
    ``blocked``, ``rate``)."""

    wait_s: float
    probe: bool = False
    why: str = ""


@dataclass(frozen=True, slots=True)
class Lease:
    """A process's share of the fleet's calls in flight, and the state it was cut from."""

    granted: int
    limit: float
    epoch: int
    open_until_ms: float = 0.0


State = dict[str, float]
Holders = dict[str, tuple[int, int, float]]  # token -> (held, wanted, expires at, ms)


def _effective(ceiling: int | None, learned: float) -> float:
    found = [float(ceiling)] if ceiling else []
    if learned > 0:
        found.append(learned * LEARNED_PACE)
    return min(found) if found else 0.0


def _level(s: State, name: str, per_min: float, now: float) -> float:
    """A bucket's level now (refilled), written back."""
    capacity = max(1.0, per_min / 60)
    level = s.get(f"{name}_level", capacity)
    level = min(capacity, level + (now - s.get(f"{name}_ts", now)) * per_min / 60_000)
    s[f"{name}_level"], s[f"{name}_ts"] = level, now
    return level


def _bucket_wait(s: State, name: str, per_min: float, need: float, now: float) -> float:
    if per_min <= 0:
        return 0.0
    level = _level(s, name, per_min, now)
    enough = min(need, max(1.0, per_min / 60))
    return 0.0 if level >= enough - 1e-9 else (enough - level) / (per_min / 60_000) / 1000


def acquire(s: State, lim: GovernorLimits, tokens: int, now: float) -> Slot:
    """May a call go now? Takes one request and ``tokens`` from the buckets if so."""
    if s.get("open_until", 0.0) > now:
        return Slot((s["open_until"] - now) / 1000, why="open")
    if s.get("half_open") and s.get("probe_until", 0.0) > now:
        return Slot(min(1.0, (s["probe_until"] - now) / 1000), why="probe")
    if s.get("blocked_until", 0.0) > now:
        return Slot((s["blocked_until"] - now) / 1000, why="blocked")
    rpm = _effective(lim.rpm, s.get("learned_rpm", 0.0))
    tpm = _effective(lim.tpm, s.get("learned_tpm", 0.0))
    wait = max(_bucket_wait(s, "req", rpm, 1, now), _bucket_wait(s, "tok", tpm, tokens, now))
    if wait > 0:
        return Slot(wait, why="rate")
    if rpm > 0:
        s["req_level"] -= 1
    if tpm > 0:
        s["tok_level"] -= tokens
    if s.get("half_open"):
        s["probe_until"] = now + PROBE_MS  # this caller is the probe; the others wait for it
        return Slot(0.0, probe=True)
    return Slot(0.0)


def _decay(s: State, lim: GovernorLimits, now: float) -> None:
    factor = 0.5 ** (max(0.0, now - s.get("count_ts", now)) / (lim.window_s * 1000))
    s["fails"] = s.get("fails", 0.0) * factor
    s["oks"] = s.get("oks", 0.0) * factor
    s["count_ts"] = now


def report(
    s: State,
    lim: GovernorLimits,
    outcome: str,
    probe: bool,
    now: float,
    oks: int = 0,
    quiet_ms: float = 1000.0,
) -> None:
    """A call's outcome for the breaker: ``ok`` or ``failure`` (a probe's, or any call's),
    with the answers that came back fine since the reporter last said (``oks``), and how
    long without any answer means the teacher is down (``quiet_ms``: a few of its usual
    latencies)."""
    _decay(s, lim, now)
    s["oks"] += oks
    if oks:
        s["last_ok"] = now
    if outcome == "ok":
        s["oks"] += 1
        s["last_ok"] = now
        if probe or s.get("half_open"):
            s["half_open"], s["probe_until"], s["fails"] = 0, 0, 0.0
        return
    if s.get("open_until", 0.0) > now or (s.get("half_open") and not probe):
        return  # sent before the circuit opened: the opening already counted the outage
    s["fails"] += 1
    # Decayed counts: ``failures`` failures a few seconds apart count as about that many.
    # Enough of them open the circuit when they outnumber the answers, or when no answer at
    # all came back for ``quiet_ms`` (an outage: the successes of a minute ago say nothing).
    silent = now - s.get("last_ok", now) >= quiet_ms
    dominant = s["fails"] >= lim.failure_ratio * (s["fails"] + s["oks"])
    if probe or (s["fails"] >= lim.failures - 0.5 and (dominant or silent)):
        s["open_until"], s["half_open"], s["probe_until"] = now + lim.cooldown_s * 1000, 1, 0
        s["fails"], s["oks"] = 0.0, 0.0


def observe(
    s: State,
    lim: GovernorLimits,
    headers: tuple[float, float, float, float, float, float],
    now: float,
) -> None:
    """What the teacher's rate headers say, as (limit, remaining, reset seconds) for
    requests then tokens, -1 where a header was missing."""
    for offset, name, ceiling in ((0, "rpm", lim.rpm), (3, "tpm", lim.tpm)):
        bucket = "req" if name == "rpm" else "tok"
        limit, remaining, reset_s = headers[offset : offset + 3]
        if limit > 0:
            s[f"learned_{name}"] = limit
        per_min = _effective(ceiling, s.get(f"learned_{name}", 0.0))
        if remaining < 0:
            continue
        if per_min > 0:
            s[f"{bucket}_level"] = min(_level(s, bucket, per_min, now), remaining)
        elif remaining == 0 and reset_s > 0:
            s["blocked_until"] = max(s.get("blocked_until", 0.0), now + reset_s * 1000)


def lease(
    s: State,
    holders: Holders,
    lim: GovernorLimits,
    ask: tuple[str, int, int, int, bool, int],
    now: float,
    ttl_ms: float,
) -> Lease:
    """Renew one process's share: ``ask`` is (token, wanted, in use, answers that came back
    fine since its last lease, whether callers waited for a slot meanwhile, and the answers
    that came back fine since it last told the breaker)."""
    token, want, in_use, successes, limited, oks = ask
    _decay(s, lim, now)
    s["oks"] += oks
    if oks:
        s["last_ok"] = now
    limit = min(float(lim.concurrency), max(float(lim.min_concurrency), s.get("limit", 1e9)))
    if limited and successes > 0 and limit < lim.concurrency:
        acc = s.get("acc", 0.0) + successes
        while acc >= _window(s, limit) and limit < lim.concurrency:
            acc -= _window(s, limit)
            limit = min(float(lim.concurrency), limit + 1)
        s["acc"] = acc if limit < lim.concurrency else 0.0
    s["limit"] = limit
    for other in [t for t, (_, _, expires) in holders.items() if expires <= now]:
        del holders[other]
    others = [v for t, v in holders.items() if t != token]
    cap = math.floor(limit)
    held_by_others = sum(held for held, _, _ in others)
    wanted_by_others = sum(wanted for _, wanted, _ in others)
    active = sum(1 for _, wanted, _ in others if wanted > 0) + (1 if want > 0 else 0)
    fair = math.ceil(cap / max(1, active))
    granted = max(0, min(want, cap - held_by_others, max(fair, cap - wanted_by_others)))
    holders[token] = (max(granted, in_use), want, now + ttl_ms)
    return Lease(granted, limit, int(s.get("epoch", 0)), s.get("open_until", 0.0))


def _window(s: State, limit: float) -> float:
    """Answers per step up: one round trip's worth, or four past the last overload point
    (the limit probes slowly where the teacher refused before, and quickly below it)."""
    beyond = limit + 1 > s.get("overload_at", float("inf"))
    return math.floor(limit) * (PROBE_WINDOWS if beyond else 1)


def overload(
    s: State,
    holders: Holders,
    lim: GovernorLimits,
    ask: tuple[str, int, int],
    now: float,
) -> tuple[float, int]:
    """Shrink the limit for an overload seen by a call sent in an epoch (once per epoch):
    ``ask`` is (token, epoch, the reporter's calls still in flight). The limit drops to
    ``backoff`` of itself, or to the calls the fleet still has in flight when that is lower
    (those are the ones the teacher took: a wave of 429s shows where its capacity is), but
    never below half of itself in one cut."""
    token, epoch, in_flight = ask
    limit = min(float(lim.concurrency), max(float(lim.min_concurrency), s.get("limit", 1e9)))
    current = int(s.get("epoch", 0))
    if epoch == current:
        others = sum(held for t, (held, _, exp) in holders.items() if t != token and exp > now)
        s["overload_at"] = limit
        kept = max(others + in_flight, limit / 2)  # at most halved at once, as TCP does
        limit = max(float(lim.min_concurrency), min(limit * lim.backoff, kept))
        current += 1
        s["limit"], s["epoch"], s["acc"] = limit, current, 0.0
    return limit, current
