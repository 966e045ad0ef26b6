"""Writing what a batch of teacher calls produced: cache, ledger, labels and item states.

Everything for one batch goes in one transaction that the caller commits. The writes are
fenced by the claim: labels and item states are written only for items this claim still
holds (same owner, same attempt, still leased). A worker that comes back after its lease
expired (stopped, or stalled past ``lease_s``) keeps what costs nothing to keep (the answers
it paid for, in the cache, and their ledger rows, which are real spend) and drops the rest,
so it never overwrites the work of the worker that took the items over.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, case, delete, select, update
from sqlalchemy.orm import Session

from storage.dialect import db_now_plus, insert_for
from storage.leases import held_by
from storage.models import CallStatus, Item, ItemState, Label, TeacherCall, TeacherResponse, Verdict
from storage.pgcopy import copy_rows
from storage.session import is_postgres

__all__ = [
    "BatchResult",
    "CallRecord",
    "Fence",
    "InFlight",
    "InFlightLedger",
    "LabelRecord",
    "NewResponse",
    "Release",
    "cached_responses",
    "record_batch",
]


@dataclass(frozen=True, slots=True)
class NewResponse:
    request_hash: str
    provider: str
    model: str
    request: dict[str, Any]
    response: dict[str, Any]
    prompt_tokens: int
    completion_tokens: int
    replayable: bool = True  # false: kept for its label, never replayed by the cache


@dataclass(frozen=True, slots=True)
class CallRecord:
    item_id: int
    request_hash: str
    attempt: int
    status: CallStatus
    error_kind: str | None = None
    http_status: int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    client_request_id: str | None = None


@dataclass(frozen=True, slots=True)
class InFlight:
    """An HTTP attempt about to be sent: its write-ahead ledger row."""

    item_id: int
    spec_id: int
    request_hash: str
    attempt: int
    client_request_id: str
    cost_usd: float


@dataclass(frozen=True, slots=True)
class LabelRecord:
    item_id: int
    output: dict[str, Any] | None
    verdict: Verdict
    reasons: list[str]
    confidence: float | None
    known_good_match: bool | None
    request_hash: str | None
    agreement: float | None = None
    problems: list[dict[str, Any]] | None = None
    threshold: float | None = None
    calibration_id: int | None = None


@dataclass(frozen=True, slots=True)
class Release:
    """An item that got no label this time: back to pending (after a wait) or failed."""

    item_id: int
    error: str
    retry_after_s: float | None
    failed: bool
    refund_attempt: bool = False  # not the item's fault (a bad key, a spent budget)
    kind: str | None = None  # the error's kind (schemas.errors), beside its message


@dataclass(frozen=True, slots=True)
class Fence:
    """The claim a batch's writes belong to: the lease owner, and each item's attempt number
    as the claim set it (a later claim of the same item, even by the same owner, has another)."""

    owner: str
    attempts: dict[int, int]


@dataclass(slots=True)
class BatchResult:
    responses: list[NewResponse]
    calls: list[CallRecord]
    labels: list[LabelRecord]
    releases: list[Release]
    replaces_in_flight: bool = True  # the attempts were written ahead as ledger rows
    fence: Fence | None = None  # None: write every item (tests, tools that hold no lease)


def cached_responses(session: Session, hashes: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Stored raw responses worth replaying for these request hashes (only successes are
    stored, and a refused, truncated or unparseable one is not replayed)."""
    if not hashes:
        return {}
    rows = session.execute(
        select(TeacherResponse.request_hash, TeacherResponse.response).where(
            TeacherResponse.request_hash.in_(list(set(hashes))),
            TeacherResponse.replayable.is_(True),
        )
    )
    return dict(rows.all())


_IN_FLIGHT_COLUMNS = (
    "item_id",
    "spec_id",
    "request_hash",
    "attempt",
    "status",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "latency_ms",
    "client_request_id",
)


class InFlightLedger:
    """Writes the ledger rows of HTTP attempts about to be sent, on a connection of its own.

    One multi-row ``INSERT`` per group, each its own transaction (autocommit): a worker
    killed mid-call leaves an ``in_flight`` row for every request the teacher may have
    received. On Postgres the commit does not wait for the WAL flush (``synchronous_commit
    off``): a worker's death loses nothing, a Postgres crash at most the last fraction of a
    second of these rows; the batch's own transaction, which replaces them, is synchronous.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._connection: Any = None
        marker = "%s" if engine.dialect.name == "postgresql" else "?"
        self._row = "(" + ", ".join([marker] * len(_IN_FLIGHT_COLUMNS)) + ")"
        self._head = f"INSERT INTO teacher_calls ({', '.join(_IN_FLIGHT_COLUMNS)}) VALUES "

    def _driver(self) -> Any:
        if self._connection is None:
            self._connection = self.engine.raw_connection()
            driver = self._connection.driver_connection
            if self.engine.dialect.name == "postgresql":
                driver.autocommit = True
                driver.execute("SET synchronous_commit TO OFF")
            else:
                driver.isolation_level = None  # autocommit
        return self._connection.driver_connection

    def write(self, attempts: Sequence[InFlight]) -> None:
        """Commit one row per attempt (raises when the database cannot take them)."""
        if not attempts:
            return
        values: list[Any] = []
        for a in attempts:
            values += [a.item_id, a.spec_id, a.request_hash, a.attempt]
            values += [CallStatus.IN_FLIGHT.value, 0, 0, a.cost_usd, 0.0, a.client_request_id]
        sql = self._head + ", ".join([self._row] * len(attempts))
        try:
            self._driver().cursor().execute(sql, values)
        except Exception:
            self.close()  # a fresh connection next time (the database may have restarted)
            raise

    def close(self) -> None:
        if self._connection is not None:
            try:
                self._connection.invalidate()
            finally:
                self._connection = None


def _insert(
    session: Session, table: Any, rows: list[dict[str, Any]], *, ignore_conflicts: bool = False
) -> None:
    if not rows:
        return
    if is_postgres(session):
        copy_rows(session, table, rows, on_conflict_do_nothing=ignore_conflicts)
        return
    stmt = insert_for(session, table)
    session.execute(stmt.on_conflict_do_nothing() if ignore_conflicts else stmt, rows)


def record_batch(session: Session, spec_id: int, batch: BatchResult) -> int:
    """Write one batch's responses, ledger rows, labels and item states (flush only);
    returns how many items its claim had lost (their labels and states are not written)."""
    held = _still_held(session, batch.fence)
    sent = [c.client_request_id for c in batch.calls if c.client_request_id]
    sent = sent if batch.replaces_in_flight else []
    for start in range(0, len(sent), 5000):
        # The write-ahead rows of exactly these attempts give way to their outcomes (rows of
        # attempts whose outcome is unknown, a killed worker's, stay in flight).
        session.execute(
            delete(TeacherCall)
            .where(
                TeacherCall.client_request_id.in_(sent[start : start + 5000]),
                TeacherCall.status == CallStatus.IN_FLIGHT,
            )
            .execution_options(synchronize_session=False)
        )
    _store_responses(session, batch.responses)
    _insert(
        session, TeacherCall.__table__, [{**_as_row(c), "spec_id": spec_id} for c in batch.calls]
    )
    labels = [lb for lb in batch.labels if held is None or lb.item_id in held]
    if labels:
        # ON CONFLICT DO NOTHING: a redelivered batch can never make a second label.
        _insert(
            session,
            Label.__table__,
            [{**_as_row(lb), "spec_id": spec_id} for lb in labels],
            ignore_conflicts=True,
        )
        _finish_labeled(session, spec_id, [lb.item_id for lb in labels])
    for release in batch.releases:
        if held is None or release.item_id in held:
            _release(session, release)
    return 0 if held is None or batch.fence is None else len(batch.fence.attempts) - len(held)


def _still_held(session: Session, fence: Fence | None) -> set[int] | None:
    """The fenced items this claim still holds, locked until the commit (so the sweeper
    cannot expire them between this check and the writes); None without a fence."""
    if fence is None:
        return None
    held: set[int] = set()
    ids = sorted(fence.attempts)
    for start in range(0, len(ids), 5000):
        stmt = select(Item.id, Item.attempts).where(held_by(fence.owner, ids[start : start + 5000]))
        if is_postgres(session):  # in id order, as every batch locks: no deadlock between them
            stmt = stmt.order_by(Item.id).with_for_update()
        held.update(i for i, attempts in session.execute(stmt) if fence.attempts[i] == attempts)
    return held


def _store_responses(session: Session, responses: list[NewResponse]) -> None:
    """Cache the answers: a new request's answer is inserted; a good answer replaces one
    kept only for its label (not replayable); a stored good answer is never replaced."""
    _insert(
        session, TeacherResponse.__table__, [_as_row(r) for r in responses], ignore_conflicts=True
    )
    good = {r.request_hash: r for r in responses if r.replayable}
    if not good:
        return
    stale = session.scalars(
        select(TeacherResponse.request_hash).where(
            TeacherResponse.request_hash.in_(list(good)), TeacherResponse.replayable.is_(False)
        )
    ).all()
    for rhash in stale:  # rare: a request asked again after a refused or cut answer
        new = good[rhash]
        session.execute(
            update(TeacherResponse)
            .where(TeacherResponse.request_hash == rhash)
            .values(
                request=new.request,
                response=new.response,
                prompt_tokens=new.prompt_tokens,
                completion_tokens=new.completion_tokens,
                replayable=True,
            )
            .execution_options(synchronize_session=False)
        )


def _as_row(record: Any) -> dict[str, Any]:
    return {name: _plain(getattr(record, name)) for name in record.__slots__}


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, (CallStatus, Verdict)) else value


def _finish_labeled(session: Session, spec_id: int, item_ids: list[int]) -> None:
    # The state follows whichever label actually won, so it is right even after a conflict.
    verdict = (
        select(Label.verdict)
        .where(Label.item_id == Item.id, Label.spec_id == spec_id)
        .scalar_subquery()
    )
    session.execute(
        update(Item)
        .where(Item.id.in_(item_ids))
        .values(
            state=case(
                (verdict == Verdict.ACCEPTED.value, ItemState.ACCEPTED.value),
                (verdict == Verdict.NEEDS_REVIEW.value, ItemState.REVIEW.value),
                else_=ItemState.REJECTED.value,
            ),
            lease_owner=None,
            lease_expires_at=None,
            retry_at=None,
            last_error=None,
            last_error_kind=None,
        )
        .execution_options(synchronize_session=False)
    )


def _release(session: Session, release: Release) -> None:
    values: dict[str, Any] = {
        "attempts": Item.attempts - int(release.refund_attempt),
        "lease_owner": None,
        "lease_expires_at": None,
        "last_error": release.error[:2000],
        "last_error_kind": release.kind,
    }
    if release.failed:
        values["state"] = ItemState.FAILED
    else:
        values["state"] = ItemState.PENDING
        wait = release.retry_after_s
        values["retry_at"] = db_now_plus(session, wait) if wait else None
    session.execute(
        update(Item)
        .where(Item.id == release.item_id, Item.state == ItemState.LEASED)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
