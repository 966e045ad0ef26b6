"""The write-ahead journal of an embedded (SQLite) run: HTTP attempts on file before they go.

Embedded mode is one process: committing each attempt to SQLite before sending it would put
every call behind the batch that holds the file's single write lock (20-40 ms). Instead an
attempt is appended to a journal file next to the store, one JSON line, before its request
is sent: ``write()`` hands the line to the operating system, which keeps it through the
process's death (``kill -9``, a crash); only a machine crash can lose the last lines. The
batch's transaction then writes the attempt's ledger row as usual.

Journals are segments of ``SEGMENT_LINES`` lines, each held with an exclusive ``flock`` by
the process writing it; a segment whose attempts all reached the ledger is deleted. Any
later run (:func:`recover_journals`, called when a runtime starts) takes the segments no
living process holds, writes their attempts that the ledger lacks as ``in_flight`` rows
(the requests the teacher may have received from the process that died), and deletes them:
the ledger then accounts for every request sent, as it does with Postgres.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import IO

import orjson
from sqlalchemy import Engine, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from storage.models import Item, TeacherCall
from storage.results import InFlight, InFlightLedger

try:
    import fcntl
except ImportError:  # Windows: journals are written, but no run can tell a dead one's apart
    fcntl = None  # type: ignore[assignment]

__all__ = ["Journal", "journal_folder", "recover_journals"]

log = logging.getLogger(__name__)

SEGMENT_LINES = 20_000


def journal_folder(engine: Engine) -> Path | None:
    """Where a SQLite store's journals live (None for an in-memory database)."""
    database = make_url(str(engine.url)).database
    if not database or database == ":memory:":
        return None
    return Path(f"{database}.calls-ahead")


class _Segment:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: IO[bytes] = path.open("ab")
        _lock(self.file, blocking=False)
        self.lines = 0
        self.open_ids: set[str] = set()

    def close(self, *, remove: bool) -> None:
        if remove:
            self.path.unlink(missing_ok=True)
        self.file.close()


class Journal:
    """This process's journal: append an attempt before it is sent, settle it once its
    ledger row is committed. Appends come from the event loop thread, settles from the
    labeling threads."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._segments: list[_Segment] = []
        self._where: dict[str, _Segment] = {}
        self._count = 0

    def _current(self) -> _Segment:
        if not self._segments or self._segments[-1].lines >= SEGMENT_LINES:
            self._count += 1
            name = f"{os.getpid()}-{os.urandom(4).hex()}-{self._count}.jsonl"
            self._segments.append(_Segment(self.folder / name))
        return self._segments[-1]

    def append(self, attempt: InFlight) -> None:
        """Put the attempt on file (in the operating system's hands) before it is sent."""
        line = orjson.dumps(
            [
                attempt.item_id,
                attempt.spec_id,
                attempt.request_hash,
                attempt.attempt,
                attempt.client_request_id,
                attempt.cost_usd,
            ]
        )
        with self._lock:
            segment = self._current()
            os.write(segment.file.fileno(), line + b"\n")
            segment.lines += 1
            segment.open_ids.add(attempt.client_request_id)
            self._where[attempt.client_request_id] = segment

    def settle(self, request_ids: list[str]) -> None:
        """These attempts' rows are in the ledger: drop segments that hold nothing else."""
        with self._lock:
            for request_id in request_ids:
                segment = self._where.pop(request_id, None)
                if segment is not None:
                    segment.open_ids.discard(request_id)
            for segment in list(self._segments):
                full = segment.lines >= SEGMENT_LINES or segment is not self._segments[-1]
                if full and not segment.open_ids:
                    self._segments.remove(segment)
                    segment.close(remove=True)

    def close(self) -> None:
        """Close the segments; those whose attempts all reached the ledger are deleted."""
        with self._lock:
            for segment in self._segments:
                segment.close(remove=not segment.open_ids)
            self._segments.clear()


def recover_journals(engine: Engine) -> int:
    """Ledger the attempts of journals no living process holds; returns how many rows.

    A segment's ``flock`` is released when its process dies, so a segment this call can
    lock belongs to nobody: its attempts missing from the ledger become ``in_flight``
    rows, and the segment is deleted.
    """
    folder = journal_folder(engine)
    if folder is None or not folder.is_dir() or fcntl is None:
        return 0
    written = 0
    for path in sorted(folder.glob("*.jsonl")):
        with path.open("rb") as handle:
            if not _lock(handle, blocking=False):
                continue  # a living process is still writing it
            attempts = _read(handle.read())
            written += _ledger_missing(engine, attempts)
            path.unlink(missing_ok=True)
    if written:
        log.warning(
            "%d teacher calls of a run that died were written to the ledger as in flight",
            written,
        )
    return written


def _lock(handle: IO[bytes], *, blocking: bool) -> bool:
    """Hold an exclusive ``flock`` on a file; False when another process holds it."""
    if fcntl is None:
        return True
    flags = fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB)
    try:
        fcntl.flock(handle.fileno(), flags)
    except BlockingIOError:
        return False
    return True


def _read(raw: bytes) -> list[InFlight]:
    attempts = []
    for line in raw.splitlines():
        try:
            item_id, spec_id, rhash, attempt, request_id, cost = orjson.loads(line)
        except (orjson.JSONDecodeError, ValueError, TypeError):
            continue  # a line cut short by the crash: its request was never sent
        attempts.append(InFlight(item_id, spec_id, rhash, attempt, request_id, cost))
    return attempts


def _ledger_missing(engine: Engine, attempts: list[InFlight]) -> int:
    if not attempts:
        return 0
    ids = [a.client_request_id for a in attempts]
    with Session(engine) as session:
        known: set[str | None] = set()
        for start in range(0, len(ids), 5000):
            known.update(
                session.scalars(
                    select(TeacherCall.client_request_id).where(
                        TeacherCall.client_request_id.in_(ids[start : start + 5000])
                    )
                )
            )
        item_ids = sorted({a.item_id for a in attempts})
        alive: set[int] = set()
        for start in range(0, len(item_ids), 5000):
            chunk = item_ids[start : start + 5000]
            alive.update(session.scalars(select(Item.id).where(Item.id.in_(chunk))))
    # Attempts of items deleted since have nothing left to account for.
    missing = [a for a in attempts if a.client_request_id not in known and a.item_id in alive]
    ledger = InFlightLedger(engine)
    try:
        for start in range(0, len(missing), 2000):
            ledger.write(missing[start : start + 2000])
    finally:
        ledger.close()
    return len(missing)
