"""The per-process event loop: one thread runs it, any labeling thread submits to it."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["LoopThread", "event_loop_factory"]

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
