"""Rate limits the way hosted teachers enforce them: requests in flight, per minute, tokens.

A request is admitted or answered ``429`` before the model runs. Per-minute limits are token
buckets refilled continuously at ``limit / 60`` per second that hold ``window_s`` seconds'
worth (one second by default: "60 RPM may be enforced as 1 request per second", as Anthropic
puts it), so a client has to pace, not only stay under the minute's total. A request worth
more tokens than the bucket holds is admitted when the bucket is full and takes it negative.

Every answer carries OpenAI's ``x-ratelimit-*`` headers for the limits that are set (limit,
remaining, and the time until the bucket is full again, written ``1s``/``250ms``/``1m0s``);
a 429 adds ``Retry-After`` (whole seconds) and ``retry-after-ms`` (what OpenAI's and
Azure's SDKs read first).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Admission", "LimitsConfig", "RateLimits", "format_reset"]


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """What the server allows; ``None`` is no limit of that kind."""

    max_concurrency: int | None = None
    rpm: int | None = None
    tpm: int | None = None
    window_s: float = 1.0
    # The Retry-After a request over the in-flight cap gets (nothing refills on a clock).
    concurrency_retry_after_s: float = 1.0

    @property
    def active(self) -> bool:
        return bool(self.max_concurrency or self.rpm or self.tpm)


@dataclass(slots=True)
class _Bucket:
    limit_per_min: int
    window_s: float
    level: float = -1.0
    at: float = 0.0

    @property
    def capacity(self) -> float:
        return max(1.0, self.limit_per_min * self.window_s / 60)

    @property
    def rate(self) -> float:
        return self.limit_per_min / 60

    def refill(self, now: float) -> None:
        if self.level < 0 and self.at == 0.0:
            self.level = self.capacity
        else:
            self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
        self.at = now

    def wait_for(self, need: float) -> float:
        """Seconds until ``need`` fits (a need over capacity waits for a full bucket)."""
        enough = min(need, self.capacity)
        # A nanosecond of float error must not cost a request a whole wait.
        return 0.0 if self.level >= enough - 1e-9 else (enough - self.level) / self.rate

    def reset_s(self) -> float:
        return max(0.0, (self.capacity - self.level) / self.rate)


@dataclass(frozen=True, slots=True)
class Admission:
    """The verdict on one request: admitted, or why not and for how long."""

    admitted: bool
    headers: dict[str, str]
    reason: str | None = None  # concurrency | requests | tokens
    retry_after_s: float = 0.0
    message: str = ""


@dataclass
class RateLimits:
    """The server's limits and their live state (one event loop: no locking needed)."""

    config: LimitsConfig
    clock: Callable[[], float] = time.monotonic
    in_flight: int = 0
    max_in_flight: int = 0
    _requests: _Bucket | None = field(init=False, default=None)
    _tokens: _Bucket | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.config.rpm:
            self._requests = _Bucket(self.config.rpm, self.config.window_s)
        if self.config.tpm:
            self._tokens = _Bucket(self.config.tpm, self.config.window_s)

    def admit(self, tokens: int) -> Admission:
        """Admit a request worth ``tokens`` (prompt plus the completion allowance), or not.

        An admitted request holds an in-flight slot until :meth:`release`.
        """
        now = self.clock()
        for bucket in (self._requests, self._tokens):
            if bucket is not None:
                bucket.refill(now)
        cap = self.config.max_concurrency
        if cap is not None and self.in_flight >= cap:
            wait = self.config.concurrency_retry_after_s
            return self._refuse(
                "concurrency", wait, f"{self.in_flight} requests are in flight; the limit is {cap}"
            )
        waits = [
            (bucket.wait_for(need), name, bucket)
            for name, bucket, need in (
                ("requests", self._requests, 1),
                ("tokens", self._tokens, tokens),
            )
            if bucket is not None
        ]
        for wait, name, bucket in waits:
            if wait > 0:
                return self._refuse(
                    name,
                    wait,
                    f"rate limit reached for {name} per minute: limit {bucket.limit_per_min}, "
                    f"remaining {max(0, math.floor(bucket.level))}",
                )
        if self._requests is not None:
            self._requests.level -= 1
        if self._tokens is not None:
            self._tokens.level -= tokens
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return Admission(True, self.headers())

    def release(self) -> None:
        self.in_flight -= 1

    def _refuse(self, reason: str, wait_s: float, message: str) -> Admission:
        headers = self.headers()
        headers["retry-after"] = str(max(1, math.ceil(wait_s)) if wait_s > 0 else 0)
        headers["retry-after-ms"] = str(max(1, math.ceil(wait_s * 1000)))
        return Admission(False, headers, reason, wait_s, f"Rate limit reached: {message}.")

    def headers(self) -> dict[str, str]:
        """The ``x-ratelimit-*`` headers for the per-minute limits that are set."""
        out: dict[str, str] = {}
        for name, bucket in (("requests", self._requests), ("tokens", self._tokens)):
            if bucket is None:
                continue
            out[f"x-ratelimit-limit-{name}"] = str(bucket.limit_per_min)
            out[f"x-ratelimit-remaining-{name}"] = str(max(0, math.floor(bucket.level)))
            out[f"x-ratelimit-reset-{name}"] = format_reset(bucket.reset_s())
        return out


def format_reset(seconds: float) -> str:
    """A duration the way OpenAI writes its reset headers: ``20ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text
