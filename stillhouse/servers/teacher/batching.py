"""Micro-batching: gather concurrent requests and run them through one blocking call.

Requests wait in a FIFO; a single drain task takes up to ``max_batch`` of them at a time and
runs the batch function in a worker thread, so the event loop keeps accepting requests while
the model works and the next batch fills up behind the current one. The drain task exists
only while work is waiting, so the batcher is never tied to a loop that has since closed.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

__all__ = ["BatchedModelBackend", "MicroBatcher"]

In = TypeVar("In")
Out = TypeVar("Out")


class MicroBatcher(Generic[In, Out]):
    """Run ``run_batch`` over whatever requests are waiting, ``max_batch`` at a time."""

    def __init__(
        self, run_batch: Callable[[Sequence[In]], Sequence[Out]], *, max_batch: int = 32
    ) -> None:
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._waiting: deque[tuple[In, asyncio.Future[Out]]] = deque()
        self._drain_task: asyncio.Task[None] | None = None
        self.batches = 0

    async def submit(self, item: In) -> Out:
        """Queue one item and wait for its result (or the batch's exception)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Out] = loop.create_future()
        self._waiting.append((item, future))
        task = self._drain_task
        if task is None or task.done() or task.get_loop() is not loop:
            self._drain_task = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        # Yield once so requests that arrive in the same tick share the first batch.
        await asyncio.sleep(0)
        while self._waiting:
            batch = [
                self._waiting.popleft() for _ in range(min(self._max_batch, len(self._waiting)))
            ]
            live = [(item, future) for item, future in batch if not future.done()]
            if live:
                await self._run([item for item, _ in live], [future for _, future in live])

    async def _run(self, items: list[In], futures: list[asyncio.Future[Out]]) -> None:
        self.batches += 1
        try:
            results = await asyncio.to_thread(self._run_batch, items)
        except Exception as exc:
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
            return
        for future, result in zip(futures, results, strict=True):
            if not future.done():  # the client may have gone away meanwhile
                future.set_result(result)


class BatchedModelBackend:
    """A backend whose model loads once, in a thread, and answers requests in micro-batches.

    Subclasses give ``_load_model`` (blocking, returns the model), ``_complete_batch`` (runs in
    the batcher's thread, may use ``self._model``) and, if needed, ``_validate`` (raises the
    caller's 400 before the request joins a batch).
    """

    def __init__(self, *, name: str, max_batch: int) -> None:
        self._name = name
        self._model: Any = None
        self._batcher: MicroBatcher[Any, Any] = MicroBatcher(
            self._complete_batch, max_batch=max_batch
        )

    @property
    def name(self) -> str:
        """The model id reported by ``/v1/models``."""
        return self._name

    async def load(self) -> None:
        """Load the model in a thread; a no-op once loaded."""
        if self._model is None:
            self._model = await asyncio.to_thread(self._load_model)

    async def complete(self, request: Any) -> Any:
        """Validate one request, then answer it as part of the next batch."""
        if self._model is None:
            raise RuntimeError(f"{type(self).__name__}.complete() called before load()")
        self._validate(request)
        return await self._batcher.submit(request)

    def _load_model(self) -> Any:
        raise NotImplementedError

    def _validate(self, request: Any) -> None:
        return None

    def _complete_batch(self, requests: Sequence[Any]) -> list[Any]:
        raise NotImplementedError
