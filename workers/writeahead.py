"""The write-ahead call ledger: every HTTP attempt is committed right before it is sent.

A teacher call awaits :meth:`WriteAhead.record` before its request goes out; one thread
writes whatever attempts are waiting in one statement (a group commit, ``InFlightLedger``),
so a burst of calls costs one commit, not one each. Commits: one per group, before the calls
it carries are sent (the point of the ledger: a worker killed mid-call leaves a row for every
request the teacher may have received, and one for no request it never sent, bar one killed
between the commit and the send). The batch's own transaction later replaces these rows by
their request ids.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading

from sqlalchemy import Engine

from schemas.errors import Unavailable
from storage.results import InFlight, InFlightLedger
from workers.journal import Journal, journal_folder, recover_journals

__all__ = ["WriteAhead"]

log = logging.getLogger(__name__)

_GROUP = 2000  # attempts per commit at most


Waiting = tuple[InFlight, "asyncio.Future[None]"]


class WriteAhead:
    """Write-ahead rows for HTTP attempts, from one event loop's calls: group-committed to
    the database (Postgres), or appended to the run's journal file (SQLite, see
    ``workers.journal``), where a store with one writer at a time would make every call
    wait for the batch that holds it."""

    def __init__(self, engine: Engine) -> None:
        self.ledger = InFlightLedger(engine)
        self.journal: Journal | None = None
        self._queue: queue.SimpleQueue[Waiting | None] = queue.SimpleQueue()
        if engine.dialect.name == "sqlite":
            recover_journals(engine)
            folder = journal_folder(engine)
            self.journal = Journal(folder) if folder is not None else None
        self._thread = threading.Thread(
            target=self._serve, name="stillhouse-write-ahead", daemon=True
        )
        self._thread.start()

    @property
    def replaces_rows(self) -> bool:
        """Whether the batch's commit must replace written-ahead ledger rows."""
        return self.journal is None

    def settle(self, request_ids: list[str]) -> None:
        """These attempts' ledger rows are committed (the journal forgets them)."""
        if self.journal is not None:
            self.journal.settle(request_ids)

    async def record(self, attempt: InFlight) -> None:
        """Return once the attempt is on the ledger, or in the journal; ``Unavailable`` if
        it cannot be (the attempt must then not be sent)."""
        if self.journal is not None:
            self.journal.append(attempt)
            return
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
            self.ledger.write(attempts)
        except Exception as exc:
            log.warning("cannot write %d teacher calls ahead: %s", len(attempts), exc)
            return Unavailable(f"cannot write the call ledger before calling the teacher: {exc}")
        return None

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)
        self.ledger.close()
        if self.journal is not None:
            self.journal.close()


def _settle(waiting: list[asyncio.Future[None]], error: Unavailable | None) -> None:
    for done in waiting:
        if done.done():
            continue  # its call was cancelled meanwhile
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)
