"""The per-process event loop: one thread runs it, any labeling thread submits to it."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["LoopThread", "StallWatch", "event_loop_factory"]

T = TypeVar("T")


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when it is installed (about half the per-call CPU), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


class LoopThread:
    """One event loop in its own thread, shared by every thread that labels in this process."""

    def __init__(self, factory: Callable[[], asyncio.AbstractEventLoop] | None) -> None:
        self.loop = factory() if factory is not None else asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._serve, name="stillhouse-teacher-loop", daemon=True
        )
        self._thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the loop and wait for its result (from any other thread)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def cpu_s(self) -> float:
        """CPU seconds the loop thread has used (the teacher calls and nothing else)."""
        return self.run(_thread_cpu())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


async def _thread_cpu() -> float:
    return time.thread_time()


class StallWatch:
    """Notices when this process stopped running for a while (SIGSTOP, a frozen VM, a loop
    blocked by a long call): timeouts that expire during such a stall say nothing about the
    teacher, so they must not open the fleet's circuit breaker or shrink its limit."""

    def __init__(
        self,
        *,
        tick_s: float = 0.1,
        stall_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tick_s = tick_s
        self.stall_s = stall_s
        self.clock = clock
        self._last = clock()
        self._stalls: deque[tuple[float, float]] = deque(maxlen=16)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start ticking on the running loop (again, if the loop changed or it stopped)."""
        if self._task is None or self._task.done():
            self._last = self.clock()
            self._task = asyncio.get_running_loop().create_task(self._tick())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _tick(self) -> None:
        while True:
            self.beat()
            await asyncio.sleep(self.tick_s)

    def beat(self) -> None:
        now = self.clock()
        if now - self._last > self.stall_s:
            self._stalls.append((self._last, now))
        self._last = now

    def stalled_since(self, started: float) -> bool:
        """Whether the process stalled at any time after ``started`` (its clock's reading)."""
        if self.clock() - self._last > self.stall_s:
            return True  # stalled right now: the tick has not run since
        return any(end > started for _, end in self._stalls)
