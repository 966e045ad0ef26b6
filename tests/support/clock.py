"""A clock the test moves: what the code under test reads instead of ``time.monotonic``, and
a ``sleep`` that moves it instead of waiting (each wait recorded, so a test asserts the
waits themselves instead of timing them)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class ManualClock:
    """Seconds, moved by hand or by :meth:`sleep`; ``on_sleep(n)`` runs after the n-th sleep
    (what the world did meanwhile: a worker caught up, a lease ran out)."""

    def __init__(self, start: float = 100.0) -> None:
        self.now = start
        self.sleeps: list[float] = []
        self.on_sleep: Callable[[int], None] | None = None

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        if self.on_sleep is not None:
            self.on_sleep(len(self.sleeps))

    async def async_sleep(self, seconds: float) -> None:
        self.sleep(seconds)
        await asyncio.sleep(0)
