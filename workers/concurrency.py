"""This process's share of a teacher's calls in flight: an adaptive, fleet-wide limit.

``teacher.concurrency`` bounds the calls in flight to a teacher for the whole fleet. The
governor holds the learned limit (AIMD, see ``governor_rules``) and the leases; a
:class:`SlotPool` is one process's side of it. Calls take a slot locally (no round trip
while the process holds free slots); the pool renews its lease when callers wait and could
get more, when it holds more than it needs (so other workers get them), after an overload,
and every ``renew_s`` while it holds any (so the lease stays alive and the limit can grow),
every 25 ms while callers wait and the fleet may have slots to spare.
A process that dies or stalls stops renewing: its slots come back to the fleet when its
lease expires, and a stalled process does not hand out slots again before it has renewed.

A slot is released with the call's outcome: ``ok`` with its latency (answers that came back
fine grow the limit; a window whose mean latency rises past ``latency_tolerance`` times its
recent low shrinks it), ``overload`` (a 429 that is not a rate bucket running dry) or
``other``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable

from schemas.errors import StillhouseError, Unavailable
from workers.governor import Governor

__all__ = ["LatencyWatch", "SlotPool"]

log = logging.getLogger(__name__)

LEASE_VALID_S = 3.0  # hand out no slot on a lease older than this (the governor keeps 5 s)
OVERLOAD_SETTLE_S = 0.025  # how long a wave of 429s takes to come back, about
STARVED_RENEW_S = 0.025  # how often a pool with waiting callers asks for more
QUIET_UNKNOWN_S = 5.0  # the same, before any answer has shown the teacher's latency
NO_FLOOR = 1 << 30  # "calls in flight" for a cut that must not use them as a floor


class LatencyWatch:
    """Mean latency per window of answers against a slowly rising low: a teacher that
    queues work answers slower before it refuses anything."""

    def __init__(self, tolerance: float | None, *, min_window: int = 16) -> None:
        self.tolerance = tolerance
        self.min_window = min_window
        self.baseline: float | None = None
        self._n = 0
        self._total = 0.0

    def add(self, latency_s: float, window: int) -> bool:
        """Count one answer; True when it closes a window that shows congestion."""
        self._n += 1
        self._total += latency_s
        if self._n < max(self.min_window, window):
            return False
        mean, self._n, self._total = self._total / self._n, 0, 0.0
        if self.baseline is None:
            self.baseline = mean
            return False
        congested = self.tolerance is not None and mean > self.baseline * self.tolerance
        # The low rises a quarter a window toward a lasting change (longer prompts, a
        # slower model), so only a sudden rise reads as congestion.
        self.baseline = min(mean, self.baseline * 1.25)
        return congested


class SlotPool:
    """The calls in flight this process may make to one teacher, leased from the governor."""

    def __init__(
        self,
        governor: Governor,
        token: str,
        *,
        latency_tolerance: float | None = 2.0,
        renew_s: float = 0.25,
        min_interval_s: float = 0.01,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.governor = governor
        self.token = token
        self.renew_s = renew_s
        self.min_interval_s = min_interval_s
        self.clock = clock
        self.held = 0
        self.in_use = 0
        self.limit = float(governor.limits.concurrency)
        self.epoch = 0
        self.latency = LatencyWatch(latency_tolerance)
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._valid_until = 0.0
        self._successes = 0  # for the limit to grow (the next lease)
        self._oks = 0  # for the breaker (the next lease or failure report, whichever first)
        self._limited = False
        self._overloaded: set[int] = set()  # epochs with a 429 (not a dry rate bucket)
        self._slowed: set[int] = set()  # epochs whose answers came back too slowly
        self._overload_seen = 0.0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_lease = -1e9
        self._error: StillhouseError | None = None

    @property
    def quiet_s(self) -> float:
        """How long without any answer means the teacher is down: two of its usual
        latencies, and at least half a second."""
        baseline = self.latency.baseline
        return max(0.5, 2 * baseline) if baseline is not None else QUIET_UNKNOWN_S

    @property
    def ceiling(self) -> int:
        return self.governor.limits.concurrency

    def _free(self) -> bool:
        return self.in_use < self.held and self.clock() < self._valid_until

    async def acquire(self) -> int:
        """Wait for a slot; returns the epoch the call is sent in (for :meth:`release`)."""
        if not self._waiters and self._free():
            self.in_use += 1
            return self.epoch
        if self._error is not None and not self._free():
            raise self._error
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        self._limited = True
        if self.held < math.floor(self.limit) or self.clock() >= self._valid_until:
            self._kick()  # a lease could give more (or this one has run out)
        else:
            self._ensure_running()
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(self.epoch, "other")  # granted just as it was cancelled
            elif future in self._waiters:
                self._waiters.remove(future)
            raise
        return self.epoch

    def release(self, epoch: int, outcome: str, latency_s: float | None = None) -> None:
        """Give a slot back with what became of the call (``ok``, ``overload``, ``other``)."""
        self.in_use -= 1
        if outcome == "ok":
            self._successes += 1
            self._oks += 1
            if latency_s is not None and self.latency.add(latency_s, self.held):
                log.info("teacher latency rose past its tolerance: fewer calls in flight")
                self._slowed.add(epoch)  # a plain cut: the calls in flight say nothing here
                self._kick()
        if outcome == "overload":
            # The freed slot must not go straight back to a teacher that just refused one:
            # until the next lease, this process keeps only the calls it has in flight (the
            # governor's cut, which follows, learns from them where the capacity is).
            self.held = min(self.held, max(self.in_use, 1 if not self.in_use else 0))
            if not self._overloaded:
                self._overload_seen = self.clock()
            self._overloaded.add(epoch)
            self._kick()
        self._hand_out()
        if self.held > self.in_use + len(self._waiters):
            self._kick()  # give back what others may use

    def take_oks(self) -> int:
        """The answers that came back fine since the breaker last heard (and zero them)."""
        oks, self._oks = self._oks, 0
        return oks

    def _hand_out(self) -> None:
        while self._waiters and self._free():
            future = self._waiters.popleft()
            if future.done():
                continue
            self.in_use += 1
            future.set_result(None)

    def _kick(self) -> None:
        self._wake.set()
        self._ensure_running()

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            spacing = self.min_interval_s - (self.clock() - self._last_lease)
            if self._overloaded:
                # Let the rest of a wave of 429s come back first: the calls left in flight
                # then are the ones the teacher took, which is what the governor's cut uses.
                spacing = max(spacing, OVERLOAD_SETTLE_S - (self.clock() - self._overload_seen))
            if spacing > 0:
                await asyncio.sleep(spacing)
            self._wake.clear()
            try:
                await self._renew()
            except StillhouseError as exc:
                self._fail_waiters(exc)
                await asyncio.sleep(1.0)
                continue
            if not (self.held or self.in_use or self._waiters):
                return  # idle: nothing held, nothing wanted
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._next_renewal())

    def _next_renewal(self) -> float:
        """Soon while callers wait and the fleet may have slots to spare (another worker
        gives its back between batches); else every ``renew_s``."""
        starved = self._waiters and self.held < math.floor(self.limit)
        return STARVED_RENEW_S if starved else self.renew_s

    async def _renew(self) -> None:
        if self.epoch in self._overloaded or self.epoch in self._slowed:
            in_flight = self.in_use if self.epoch in self._overloaded else NO_FLOOR
            seen = (self.token, self.epoch, in_flight)
            self.limit, self.epoch = await self.governor.overload(seen)
        self._overloaded.clear()
        self._slowed.clear()
        want = min(self.ceiling, self.in_use + len(self._waiters))
        ask = (self.token, want, self.in_use, self._successes, self._limited, self.take_oks())
        self._successes, self._limited = 0, bool(self._waiters)
        self._last_lease = self.clock()
        lease = await self.governor.lease(ask)
        self.held, self.limit, self.epoch = lease.granted, lease.limit, lease.epoch
        self._valid_until = self.clock() + LEASE_VALID_S
        self._error = None
        self._hand_out()

    def _fail_waiters(self, exc: StillhouseError) -> None:
        """The governor cannot be reached: callers get the error instead of waiting on."""
        self._error = exc if isinstance(exc, Unavailable) else Unavailable(str(exc))
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_exception(self._error)

    async def close(self) -> None:
        """Stop renewing and give every slot back (the lease is renewed with nothing)."""
        if self._task is not None:
            self._task.cancel()
        with contextlib.suppress(StillhouseError):  # else the lease expires by itself
            await self.governor.lease((self.token, 0, 0, self._successes, False, self.take_oks()))
