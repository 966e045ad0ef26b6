"""Backfills through the providers' batch APIs: submit, follow, download, release, resubmit.

Every step is written to the database before the next network call, so a crash or restart
resumes from what was recorded (``storage.models.TeacherBatch`` lists the steps):

1. **submit**: the spec's pending items are rendered into the very requests a live call would
   send (same bytes, same hash); an item whose request the cache already answers stays
   pending (a cache hit costs nothing); one whose request is already in an open batch joins
   it; the rest are split at the provider's limits (``labeling.batch.max_requests`` and
   ``max_bytes`` lower them). In one transaction per batch: the items go ``batched``, one
   row per item (``custom_id`` = the request hash), the budget reserved at the batch price.
2. **upload** (OpenAI) and **create**, marked ``creating`` first: a restart that finds a
   batch in that step looks for it at the provider (OpenAI by the key in its metadata,
   Anthropic by creation time and size) before creating one, so no batch is paid twice.
3. **follow** until the provider says it ended; **download** its results in chunks, each chunk
   one transaction that fills only rows still waiting (a result seen again changes nothing; an
   unknown ``custom_id`` is logged and ignored).
4. **release**: answered items go back to pending, with the answer waiting for the pipeline,
   which labels them as it does live calls (cache, ledger at the batch price, checks, label
   writes: ``storage.batches.batch_answers``); failed and expired requests go back to pending
   for the next batch (or a live call, ``labeling.batch.retry: live``), at most
   ``max_resubmits`` times; a 4xx fails its item. The reservation is settled at what the
   answered requests cost.

The dispatcher never hands out items of a spec in batch mode (``specs.labeling_mode``): its
labeling is :func:`tick`'s, from ``stillhouse batches poll`` or the beat schedule.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any

from sqlalchemy import and_, func, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from schemas.errors import BudgetExhausted, ConfigError
from storage.batches import OPEN_STEPS, batch_answers, batch_call_id
from storage.budget import budget_state, current_budget, reserve, settle
from storage.dialect import db_now
from storage.models import (
    CallStatus,
    Item,
    ItemState,
    SpecRow,
    TeacherBatch,
    TeacherBatchRequest,
    TeacherCall,
)
from storage.results import cached_responses
from workers.batch_api import PROVIDER_LIMITS, BatchAPI, BatchInfo, BatchResult, batch_api_for
from workers.prompt import render_messages
from workers.spec import Spec, TeacherConfig
from workers.teacher import build_request, teacher_key

__all__ = [
    "BatchRunner",
    "TickSummary",
    "poll_interval",
    "set_labeling_mode",
    "wait_until_done",
]

log = logging.getLogger(__name__)

RESULT_CHUNK = 500  # result lines per transaction
# A batch left in ``creating`` this long by a poller that stopped is looked up and remade.
CREATE_GRACE_S = 120.0
# A reservation outlives the provider's 24-hour window by this much.
RESERVE_MARGIN_S = 2 * 3600
WINDOW_S = {"24h": 24 * 3600}


@dataclass(slots=True)
class TickSummary:
    """What one pass did."""

    submitted_batches: int = 0
    submitted_requests: int = 0
    joined_open: int = 0
    cached: int = 0
    advanced: int = 0
    ended: int = 0
    received: int = 0
    unknown_results: int = 0
    labeled: int = 0
    live_labeled: int = 0
    failed_items: int = 0
    open_batches: int = 0
    budget_error: str | None = None
    errors: list[str] = field(default_factory=list)


def set_labeling_mode(session: Session, spec_id: int, mode: str) -> None:
    """Record a spec version's labeling mode (``backfill --mode`` overrides the spec's)."""
    session.execute(update(SpecRow).where(SpecRow.id == spec_id).values(labeling_mode=mode))


class BatchRunner:
    """Submits and follows one spec version's batches (one teacher: the spec's primary; jury
    teachers and repair re-asks are called live by the pipeline)."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        spec_id: int,
        spec: Spec,
        *,
        teacher_base_url: str | None = None,
        api: BatchAPI | None = None,
        label: Callable[[list[int]], Any] | None = None,
    ) -> None:
        self.sessions, self.spec_id, self.spec = sessions, spec_id, spec
        config = spec.teacher
        if teacher_base_url:
            config = dataclasses.replace(config, base_url=teacher_base_url)
        self.config: TeacherConfig = config
        self.settings = spec.batch
        self.api = api or batch_api_for(config, teacher_key(config))
        # label(item_ids): the pipeline's label_batch over those items (answers waiting).
        self.label = label

    def close(self) -> None:
        self.api.close()

    # -- submission ----------------------------------------------------------------------

    def submit(self, *, include_cancelled: bool = False) -> TickSummary:
        """Put the spec's ready pending items into new batches (or open ones)."""
        summary = TickSummary()
        spec, settings = self.spec, self.settings
        with self.sessions.begin() as session:
            summary.failed_items += self._fail_spent(session)
        with self.sessions() as session:
            candidates = self._candidates(session, include_cancelled)
        if not candidates:
            return summary
        requests = {}
        for item_id, text in candidates:
            request = build_request(
                self.config, render_messages(spec, text), spec.output_schema, spec.schema_name
            )
            requests[item_id] = request
        hashes = [r.request_hash for r in requests.values()]
        with self.sessions() as session:
            cached = set(cached_responses(session, hashes)) | set(batch_answers(session, hashes))
            open_rows = self._open_requests(session, hashes)
        summary.cached = sum(1 for r in requests.values() if r.request_hash in cached)
        joining: dict[int, list[tuple[int, str]]] = {}
        fresh: dict[str, list[int]] = {}
        for item_id, request in requests.items():
            rhash = request.request_hash
            if rhash in cached:
                continue  # labeled from the cache, free
            if rhash in open_rows:
                joining.setdefault(open_rows[rhash], []).append((item_id, rhash))
            else:
                fresh.setdefault(rhash, []).append(item_id)
        for batch_id, members in joining.items():
            with self.sessions.begin() as session:
                taken = _mark_batched(session, [i for i, _ in members])
                _add_rows(session, batch_id, [(i, h) for i, h in members if i in taken])
            summary.joined_open += len(taken)
        bodies = {r.request_hash: r for r in requests.values()}
        max_requests, max_bytes = PROVIDER_LIMITS[self.config.provider]
        max_requests = min(max_requests, settings.max_requests or max_requests)
        max_bytes = min(max_bytes, settings.max_bytes or max_bytes)
        for chunk in _split(
            fresh, lambda h: len(self.api.line(h, bodies[h].body)), max_requests, max_bytes
        ):
            made = self._prepare(chunk, bodies)
            if made is None:
                summary.budget_error = self._budget_message()
                break
            batch_id, count = made
            summary.submitted_batches += 1
            summary.submitted_requests += count
            self._drive(batch_id, summary)
            if count < len(chunk):  # the budget covered only part of it: the rest waits
                summary.budget_error = self._budget_message()
                break
        return summary

    def _candidates(self, session: Session, include_cancelled: bool) -> list[tuple[int, str]]:
        """Ready pending items, without those past their resubmits, those that go live after
        a failure (``retry: live``), and, unless asked, those whose last batch was cancelled."""
        settings = self.settings
        tries = (
            select(TeacherBatchRequest.item_id, func.count().label("n"))
            .where(TeacherBatchRequest.state.in_(["failed", "expired", "cancelled"]))
            .group_by(TeacherBatchRequest.item_id)
            .subquery()
        )
        limit = 0 if settings.retry == "live" else settings.max_resubmits
        stmt = (
            select(Item.id, Item.text)
            .outerjoin(tries, tries.c.item_id == Item.id)
            .where(
                Item.spec_id == self.spec_id,
                Item.state == ItemState.PENDING,
                (Item.retry_at.is_(None)) | (Item.retry_at <= db_now(session)),
                func.coalesce(tries.c.n, 0) <= limit,
            )
            .order_by(Item.id)
        )
        rows = [(int(i), str(t)) for i, t in session.execute(stmt)]
        if include_cancelled or not rows:
            return rows
        cancelled = set(
            session.scalars(
                select(TeacherBatchRequest.item_id).where(
                    TeacherBatchRequest.state == "cancelled",
                    TeacherBatchRequest.item_id.in_([i for i, _ in rows]),
                )
            )
        )
        return [(i, t) for i, t in rows if i not in cancelled]

    def _fail_spent(self, session: Session) -> int:
        """Under ``retry: batch``, a pending item whose request failed or expired in more
        than ``1 + max_resubmits`` batches fails, with its last error."""
        if self.settings.retry != "batch":
            return 0
        tries = (
            select(TeacherBatchRequest.item_id)
            .where(TeacherBatchRequest.state.in_(["failed", "expired"]))
            .group_by(TeacherBatchRequest.item_id)
            .having(func.count() > self.settings.max_resubmits)
        )
        done = session.execute(
            update(Item)
            .where(
                Item.spec_id == self.spec_id,
                Item.state == ItemState.PENDING,
                Item.id.in_(tries),
            )
            .values(state=ItemState.FAILED, last_error_kind="batch_failed")
            .execution_options(synchronize_session=False)
        )
        return int(getattr(done, "rowcount", 0) or 0)

    def _open_requests(self, session: Session, hashes: list[str]) -> dict[str, int]:
        """Request hash → the open batch already asking it."""
        found: dict[str, int] = {}
        for start in range(0, len(hashes), 5000):
            part = hashes[start : start + 5000]
            rows = session.execute(
                select(TeacherBatchRequest.request_hash, TeacherBatchRequest.batch_id)
                .join(TeacherBatch, TeacherBatch.id == TeacherBatchRequest.batch_id)
                .where(
                    TeacherBatchRequest.request_hash.in_(part),
                    TeacherBatchRequest.state == "waiting",
                    TeacherBatch.step.in_(OPEN_STEPS[:-1]),
                )
            )
            found.update({h: int(b) for h, b in rows})
        return found

    def _prepare(
        self, chunk: dict[str, list[int]], bodies: dict[str, Any]
    ) -> tuple[int, int] | None:
        """One transaction: the items batched, their rows, the budget reserved, the batch
        recorded; None when the budget covers none of it."""
        spec, factor = self.spec, self.settings.price_factor
        per_call = (
            max(
                self.config.cost_usd(bodies[h].prompt_tokens_estimate, bodies[h].max_output_tokens)
                for h in chunk
            )
            * factor
        )
        window = self.settings.completion_window
        with self.sessions.begin() as session:
            hashes = list(chunk)
            reservation, limit = None, current_budget(session, self.spec_id)
            if limit is not None:
                ttl = WINDOW_S[window] + RESERVE_MARGIN_S
                allowed, reservation = reserve(
                    session, spec.name, limit, per_call, len(hashes), ttl
                )
                hashes = hashes[:allowed]
                if not hashes:
                    return None
            members = [(i, h) for h in hashes for i in chunk[h]]
            taken = _mark_batched(session, [i for i, _ in members])
            members = [(i, h) for i, h in members if i in taken]
            asked = sorted({h for _, h in members})
            if not asked:
                return None
            batch = TeacherBatch(
                spec_id=self.spec_id,
                spec_name=spec.name,
                provider=self.config.provider,
                base_url=self.config.base_url,
                model=self.config.model,
                key=uuid.uuid4().hex,
                step="prepared",
                requests=len(asked),
                size_bytes=sum(len(self.api.line(h, bodies[h].body)) for h in asked),
                succeeded=0,
                failed=0,
                expired=0,
                price_factor=factor,
                reserved_usd=per_call * len(asked),
                reservation_id=reservation,
                spent_usd=0.0,
            )
            session.add(batch)
            session.flush()
            _add_rows(session, batch.id, members)
            return batch.id, len(asked)

    def _budget_message(self) -> str:
        with self.sessions() as session:
            state = budget_state(session, self.spec.name)
            limit = current_budget(session, self.spec_id)
        return str(
            BudgetExhausted(
                f"spec {self.spec.name!r} has spent ${state.spent_usd:.4f} of its budget_usd "
                f"${limit or 0:g} (${state.reserved_usd:.4f} reserved, batches included); the "
                f"remaining items stay pending. Raise budget_usd in the spec file to go on"
            )
        )

    # -- following -------------------------------------------------------------------------

    def open_batch_ids(self) -> list[int]:
        with self.sessions() as session:
            return list(
                session.scalars(
                    select(TeacherBatch.id)
                    .where(TeacherBatch.spec_id == self.spec_id, TeacherBatch.step.in_(OPEN_STEPS))
                    .order_by(TeacherBatch.id)
                )
            )

    def _drive(self, batch_id: int, summary: TickSummary) -> None:
        """Take one batch as far as it goes now, one recorded step at a time."""
        for _ in range(8):
            with self.sessions() as session:
                batch = session.get(TeacherBatch, batch_id)
                assert batch is not None
                step = batch.step
                snapshot = _Snapshot.of(batch)
            if step == "done":
                return
            try:
                moved = self._step(snapshot, summary)
            except ConfigError:
                raise
            except Exception as exc:  # the provider or network is away: next pass retries
                log.warning("batch %s (%s): %s", batch_id, step, exc)
                summary.errors.append(f"batch {batch_id} ({step}): {exc}")
                with self.sessions.begin() as session:
                    _set(session, batch_id, error=str(exc)[:2000])
                return
            summary.advanced += int(moved)
            if not moved:
                return

    def _step(self, b: _Snapshot, summary: TickSummary) -> bool:
        api = self.api
        if b.step == "prepared":
            content = self._content(b.id)
            file_id = api.upload(content, f"stillhouse-{b.key}.jsonl")
            with self.sessions.begin() as session:
                return _set(
                    session,
                    b.id,
                    expect="prepared",
                    step="uploaded",
                    input_file_id=file_id,
                    error=None,
                )
        if b.step in ("uploaded", "creating"):
            info = None
            if b.step == "creating":
                # Another poller may be creating it right now: only a creation that has had
                # time to be recorded is looked for, and made again if the provider has none.
                if b.creating_at is not None and time.time() - b.creating_at < CREATE_GRACE_S:
                    return False
                info = api.find(b.key, b.creating_at or 0.0, b.requests)
                with self.sessions.begin() as session:
                    if not _set(session, b.id, expect="creating", creating_at=func.now()):
                        return False
            else:
                with self.sessions.begin() as session:
                    if not _set(
                        session, b.id, expect="uploaded", step="creating", creating_at=func.now()
                    ):
                        return False
            if info is None:
                info = api.create(
                    self._content(b.id), b.input_file_id, b.key, self.settings.completion_window
                )
            with self.sessions.begin() as session:
                _set(
                    session,
                    b.id,
                    expect="creating",
                    step="submitted",
                    provider_batch_id=info.id,
                    status=info.status,
                    submitted_at=func.now(),
                    error=None,
                )
            return True
        if b.step == "submitted":
            assert b.provider_batch_id is not None
            info = api.get(b.provider_batch_id)
            values: dict[str, Any] = {"status": info.status, "error": None}
            if info.ended:
                values.update(
                    step="downloading",
                    output_file_id=info.output_file_id,
                    error_file_id=info.error_file_id,
                    results_url=info.results_url,
                    ended_at=func.now(),
                )
                summary.ended += 1
            with self.sessions.begin() as session:
                _set(session, b.id, **values)
            return info.ended
        if b.step == "downloading":
            info = BatchInfo(
                b.provider_batch_id or "",
                b.status or "",
                True,
                output_file_id=b.output_file_id,
                error_file_id=b.error_file_id,
                results_url=b.results_url,
            )
            size = int(os.environ.get("STILLHOUSE_BATCH_RESULT_CHUNK") or RESULT_CHUNK)
            for chunk in _chunks(api.results(info), size):
                with self.sessions.begin() as session:
                    got, unknown = _store_results(session, b.id, chunk)
                summary.received += got
                summary.unknown_results += unknown
            with self.sessions.begin() as session:
                _set(session, b.id, step="received")
            return True
        if b.step == "received":
            with self.sessions.begin() as session:
                summary.failed_items += self._release(session, b)
            return True
        return False

    def _content(self, batch_id: int) -> bytes:
        """The batch's request file, rebuilt from its items (the same bytes each time)."""
        spec = self.spec
        with self.sessions() as session:
            rows = session.execute(
                select(TeacherBatchRequest.request_hash, func.min(Item.text))
                .join(Item, Item.id == TeacherBatchRequest.item_id)
                .where(TeacherBatchRequest.batch_id == batch_id)
                .group_by(TeacherBatchRequest.request_hash)
                .order_by(TeacherBatchRequest.request_hash)
            ).all()
        lines = []
        for rhash, text in rows:
            request = build_request(
                self.config, render_messages(spec, text), spec.output_schema, spec.schema_name
            )
            if request.request_hash != rhash:
                raise ConfigError(
                    f"batch {batch_id}: the request for an item no longer hashes to what was "
                    f"recorded ({rhash[:12]}): the spec's teacher changed under the same "
                    f"version; cancel the batch (`stillhouse batches cancel {batch_id}`)"
                )
            lines.append(self.api.line(rhash, request.body))
        return b"".join(lines)

    def _release(self, session: Session, b: _Snapshot) -> int:
        """Every result is stored: items back to pending (answered, or for another try),
        4xx failures failed, failed requests on the ledger, the reservation settled."""
        if not _set(session, b.id, expect="received", step="done"):
            return 0  # another poller released it
        rows = session.execute(
            select(
                TeacherBatchRequest.item_id,
                TeacherBatchRequest.request_hash,
                TeacherBatchRequest.state,
                TeacherBatchRequest.http_status,
                TeacherBatchRequest.error,
                TeacherBatchRequest.prompt_tokens,
                TeacherBatchRequest.completion_tokens,
            ).where(TeacherBatchRequest.batch_id == b.id)
        ).all()
        cancelled = (b.status or "") in ("cancelled", "canceling", "cancelling") or b.cancel_asked
        # A request the provider never reported on counts as expired.
        session.execute(
            update(TeacherBatchRequest)
            .where(TeacherBatchRequest.batch_id == b.id, TeacherBatchRequest.state == "waiting")
            .values(state="cancelled" if cancelled else "expired", error="no result")
        )
        spent, failed_calls, counts = 0.0, {}, {"succeeded": 0, "failed": 0, "expired": 0}
        seen: set[str] = set()
        answered, retry, failed_items = [], [], []
        for item_id, rhash, state, status, error, prompt, completion in rows:
            state = state if state != "waiting" else ("cancelled" if cancelled else "expired")
            first = rhash not in seen
            seen.add(rhash)
            if state == "succeeded":
                answered.append(item_id)
                if first:
                    counts["succeeded"] += 1
                    spent += self.config.cost_usd(prompt, completion) * b.price_factor
            elif state == "failed":
                if first:
                    counts["failed"] += 1
                    failed_calls[rhash] = (item_id, status, error)
                if status is not None and 400 <= status < 500 and status not in (408, 429):
                    failed_items.append(
                        (
                            item_id,
                            f"batch {b.id}: the teacher refused the request ({status}): {error}",
                        )
                    )
                else:
                    retry.append((item_id, f"batch {b.id}: failed ({status}): {error}"))
            else:
                counts["expired"] += int(first)
                retry.append((item_id, f"batch {b.id}: {state} before it ran"))
        for rhash, (item_id, status, _error) in failed_calls.items():
            exists = session.scalar(
                select(TeacherCall.id).where(
                    TeacherCall.client_request_id == batch_call_id(b.id, rhash)
                )
            )
            if exists is None:
                session.add(
                    TeacherCall(
                        item_id=item_id,
                        spec_id=self.spec_id,
                        request_hash=rhash,
                        attempt=1,
                        status=CallStatus.ERROR,
                        error_kind="batch_failed",
                        http_status=status,
                        prompt_tokens=0,
                        completion_tokens=0,
                        cost_usd=0.0,
                        latency_ms=0.0,
                        client_request_id=batch_call_id(b.id, rhash),
                    )
                )
        batched = and_(Item.state == ItemState.BATCHED)
        if answered:
            session.execute(
                update(Item)
                .where(Item.id.in_(answered), batched)
                .values(state=ItemState.PENDING, retry_at=None, last_error=None)
                .execution_options(synchronize_session=False)
            )
        for item_id, message in retry:
            session.execute(
                update(Item)
                .where(Item.id == item_id, batched)
                .values(state=ItemState.PENDING, retry_at=None, last_error=message[:2000])
                .execution_options(synchronize_session=False)
            )
        for item_id, message in failed_items:
            session.execute(
                update(Item)
                .where(Item.id == item_id, batched)
                .values(
                    state=ItemState.FAILED,
                    attempts=Item.attempts + 1,
                    last_error=message[:2000],
                    last_error_kind="rejected",
                )
                .execution_options(synchronize_session=False)
            )
        settle(session, self.spec.name, b.reservation_id, spent)
        _set(
            session,
            b.id,
            spent_usd=spent,
            reservation_id=None,
            succeeded=counts["succeeded"],
            failed=counts["failed"],
            expired=counts["expired"],
        )
        return len(failed_items)

    # -- the pass ----------------------------------------------------------------------------

    def tick(self, *, submit: bool = True, include_cancelled: bool = False) -> TickSummary:
        """One pass: follow every open batch, label what came back (and, under ``retry:
        live``, what failed), submit what is pending."""
        summary = TickSummary()
        for batch_id in self.open_batch_ids():
            self._drive(batch_id, summary)
        self._label_ready(summary)
        if submit:
            made = self.submit(include_cancelled=include_cancelled)
            for name in ("submitted_batches", "submitted_requests", "joined_open", "cached"):
                setattr(summary, name, getattr(summary, name) + getattr(made, name))
            summary.budget_error = made.budget_error
            summary.errors += made.errors
            self._label_ready(summary)  # the cache hits submit left pending
        summary.open_batches = len(self.open_batch_ids())
        return summary

    def _label_ready(self, summary: TickSummary) -> None:
        """Label the pending items whose answer is waiting (a batch's or the cache's), and,
        under ``retry: live``, those a batch failed."""
        if self.label is None:
            return
        answered, live = self._ready_items()
        for ids, live_call in ((answered, False), (live, True)):
            for start in range(0, len(ids), self.spec.labeling["batch_size"]):
                part = ids[start : start + self.spec.labeling["batch_size"]]
                done = self.label(part)
                count = int(getattr(done, "labeled", 0))
                if live_call:
                    summary.live_labeled += count
                else:
                    summary.labeled += count

    def _ready_items(self) -> tuple[list[int], list[int]]:
        spec = self.spec
        with self.sessions() as session:
            rows = session.execute(
                select(Item.id, Item.text).where(
                    Item.spec_id == self.spec_id, Item.state == ItemState.PENDING
                )
            ).all()
            if not rows:
                return [], []
            hashes = {
                item_id: build_request(
                    self.config, render_messages(spec, text), spec.output_schema, spec.schema_name
                ).request_hash
                for item_id, text in rows
            }
            known = set(cached_responses(session, list(hashes.values())))
            known |= set(batch_answers(session, list(hashes.values())))
            answered = sorted(i for i, h in hashes.items() if h in known)
            live: list[int] = []
            if self.settings.retry == "live":
                tried = set(
                    session.scalars(
                        select(TeacherBatchRequest.item_id).where(
                            TeacherBatchRequest.item_id.in_(list(hashes)),
                            TeacherBatchRequest.state.in_(["failed", "expired"]),
                        )
                    )
                )
                live = sorted(i for i in hashes if i in tried and i not in set(answered))
        return answered, live

    def cancel(self, batch_id: int) -> dict[str, Any]:
        """Ask the provider to cancel; the poller follows the batch to its end, keeps what
        was answered, and leaves the rest pending (not resubmitted until the next
        ``backfill``)."""
        with self.sessions.begin() as session:
            batch = session.get(TeacherBatch, batch_id)
            if batch is None or batch.spec_id != self.spec_id:
                raise ConfigError(f"no batch {batch_id} for spec {self.spec.name!r}")
            provider_id, step = batch.provider_batch_id, batch.step
            batch.error = "cancel asked"
        if step in ("prepared", "uploaded") or provider_id is None:
            with self.sessions.begin() as session:
                _set(session, batch_id, step="received", status="cancelled")
            summary = TickSummary()
            self._drive(batch_id, summary)
            return {"id": batch_id, "status": "cancelled", "step": "done"}
        info = self.api.cancel(provider_id)
        with self.sessions.begin() as session:
            _set(session, batch_id, status=info.status)
        return {"id": batch_id, "status": info.status, "step": step}


@dataclass(frozen=True, slots=True)
class _Snapshot:
    id: int
    key: str
    step: str
    status: str | None
    requests: int
    input_file_id: str | None
    provider_batch_id: str | None
    output_file_id: str | None
    error_file_id: str | None
    results_url: str | None
    creating_at: float | None
    reservation_id: int | None
    price_factor: float
    cancel_asked: bool

    @classmethod
    def of(cls, b: TeacherBatch) -> _Snapshot:
        return cls(
            b.id,
            b.key,
            b.step,
            b.status,
            b.requests,
            b.input_file_id,
            b.provider_batch_id,
            b.output_file_id,
            b.error_file_id,
            b.results_url,
            _epoch(b.creating_at),
            b.reservation_id,
            b.price_factor,
            (b.error or "") == "cancel asked",
        )


def _epoch(when: Any) -> float | None:
    """Seconds since the epoch of a stored time (SQLite gives it back without a zone: UTC)."""
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return float(when.timestamp())


def _set(session: Session, batch_id: int, *, expect: str | None = None, **values: Any) -> bool:
    """Update a batch; with ``expect``, only while it is still in that step (two pollers on
    one batch: one moves it, the other sees it moved). Returns whether it was updated."""
    stmt = update(TeacherBatch).where(TeacherBatch.id == batch_id)
    if expect is not None:
        stmt = stmt.where(TeacherBatch.step == expect)
    done = session.execute(stmt.values(**values).execution_options(synchronize_session=False))
    return bool(getattr(done, "rowcount", 0))


def _mark_batched(session: Session, item_ids: list[int]) -> set[int]:
    """Items still pending go ``batched`` (a worker that claimed one meanwhile keeps it)."""
    taken: set[int] = set()
    for start in range(0, len(item_ids), 5000):
        part = item_ids[start : start + 5000]
        rows = session.execute(
            update(Item)
            .where(Item.id.in_(part), Item.state == ItemState.PENDING)
            .values(state=ItemState.BATCHED, retry_at=None)
            .returning(Item.id)
            .execution_options(synchronize_session=False)
        )
        taken.update(int(r[0]) for r in rows)
    return taken


def _add_rows(session: Session, batch_id: int, members: Iterable[tuple[int, str]]) -> None:
    rows = [
        {
            "batch_id": batch_id,
            "item_id": item_id,
            "request_hash": rhash,
            "state": "waiting",
            "prompt_tokens": 0,
            "completion_tokens": 0,
        }
        for item_id, rhash in members
    ]
    if rows:
        session.execute(insert(TeacherBatchRequest), rows)


def _store_results(session: Session, batch_id: int, results: list[BatchResult]) -> tuple[int, int]:
    """Fill the waiting rows these results answer; returns (stored, unknown)."""
    known = set(
        session.scalars(
            select(TeacherBatchRequest.request_hash).where(
                TeacherBatchRequest.batch_id == batch_id,
                TeacherBatchRequest.request_hash.in_([r.custom_id for r in results]),
            )
        )
    )
    stored = unknown = 0
    for result in results:
        if result.custom_id not in known:
            unknown += 1
            log.warning(
                "batch %s: a result for an unknown custom_id %r (%s) is ignored",
                batch_id,
                result.custom_id[:70],
                result.outcome if result.outcome != "unreadable" else result.error,
            )
            continue
        values: dict[str, Any] = {
            "state": result.outcome,
            "http_status": result.http_status,
            "error": result.error,
        }
        if result.outcome == "succeeded" and result.body is not None:
            usage = _usage(result.body)
            values.update(response=result.body, prompt_tokens=usage[0], completion_tokens=usage[1])
        done = session.execute(
            update(TeacherBatchRequest)
            .where(
                TeacherBatchRequest.batch_id == batch_id,
                TeacherBatchRequest.request_hash == result.custom_id,
                TeacherBatchRequest.state == "waiting",
            )
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        stored += int(bool(getattr(done, "rowcount", 0)))
    return stored, unknown


def _usage(body: dict[str, Any]) -> tuple[int, int]:
    usage = body.get("usage") or {}
    prompt = usage.get("prompt_tokens", usage.get("input_tokens")) or 0
    completion = usage.get("completion_tokens", usage.get("output_tokens")) or 0
    return int(prompt), int(completion)


def _split(
    fresh: dict[str, list[int]],
    size: Callable[[str], int],
    max_requests: int,
    max_bytes: int,
) -> Iterator[dict[str, list[int]]]:
    chunk: dict[str, list[int]] = {}
    used = 0
    for rhash, items in fresh.items():
        n = size(rhash)
        if chunk and (len(chunk) >= max_requests or used + n > max_bytes):
            yield chunk
            chunk, used = {}, 0
        chunk[rhash] = items
        used += n
    if chunk:
        yield chunk


def _chunks(results: Iterator[BatchResult], n: int) -> Iterator[list[BatchResult]]:
    chunk: list[BatchResult] = []
    for result in results:
        chunk.append(result)
        if len(chunk) >= n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def poll_interval(spec: Spec) -> float:
    return float(os.environ.get("STILLHOUSE_BATCH_POLL_S") or spec.batch.poll_s)


def wait_until_done(
    runner: BatchRunner,
    *,
    timeout_s: float | None = None,
    on_tick: Callable[[TickSummary], None] | None = None,
) -> TickSummary:
    """Embedded: tick until no batch is open and nothing is left to submit or label."""
    total = TickSummary()
    started = time.monotonic()
    include_cancelled = True
    while True:
        summary = runner.tick(include_cancelled=include_cancelled)
        include_cancelled = False
        for f in dataclasses.fields(TickSummary):
            value = getattr(summary, f.name)
            if isinstance(value, int) and f.name != "open_batches":
                setattr(total, f.name, getattr(total, f.name) + value)
        total.open_batches = summary.open_batches
        total.budget_error = summary.budget_error or total.budget_error
        total.errors += summary.errors
        if on_tick is not None:
            on_tick(summary)
        # Done when no batch is open, none was submitted and the pass labeled nothing more
        # (items held for a calibration are labeled, from the cache, by later passes).
        if summary.open_batches == 0 and summary.submitted_batches == 0 and not summary.labeled:
            return total
        if timeout_s is not None and time.monotonic() - started > timeout_s:
            return total
        time.sleep(poll_interval(runner.spec))
