"""The write-ahead call ledger: every HTTP attempt is committed right before it is sent.

A teacher call awaits :meth:`WriteAhead.record` before its request goes out; one thread
writes whatever attempts are waiting in one transaction (a group commit), so a burst of calls
costs one commit, not one each. Commits: one per group, before the calls it carries are sent
(the point of the ledger: a worker killed mid-call leaves a row for every request the teacher
may have received, and one for no request it never sent, bar one killed between the commit
and the send). The batch's own transaction later replaces these rows by their request ids.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading

from sqlalchemy.orm import Session, sessionmaker

from schemas.errors import Unavailable
from storage.results import InFlight, record_in_flight

__all__ = ["WriteAhead"]

log = logging.getLogger(__name__)

_GROUP = 2000  # attempts per commit at most


Waiting = tuple[InFlight, "asyncio.Future[None]"]


class WriteAhead:
    """Group-committed write-ahead rows for HTTP attempts, from one event loop's calls."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        self._queue: queue.SimpleQueue[Waiting | None] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._serve, name="stillhouse-write-ahead", daemon=True
        )
        self._thread.start()

    async def record(self, attempt: InFlight) -> None:
        """Return once the attempt's row is committed; ``Unavailable`` if it cannot be (the
        attempt must then not be sent)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put((attempt, done))
        await done

    def _serve(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            group = [first]
            while len(group) < _GROUP:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)  # stop after this group
                    break
                group.append(more)
            error = self._commit([attempt for attempt, _ in group])
            # One wake-up of the loop for the whole group, not one per attempt.
            loop = group[0][1].get_loop()
            loop.call_soon_threadsafe(_settle, [done for _, done in group], error)

    def _commit(self, attempts: list[InFlight]) -> Unavailable | None:
        try:
            with self.sessions.begin() as session:
                record_in_flight(session, attempts)
        except Exception as exc:
            log.warning("cannot write %d teacher calls ahead: %s", len(attempts), exc)
            return Unavailable(f"cannot write the call ledger before calling the teacher: {exc}")
        return None

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)


def _settle(waiting: list[asyncio.Future[None]], error: Unavailable | None) -> None:
    for done in waiting:
        if done.done():
            continue  # its call was cancelled meanwhile
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)
