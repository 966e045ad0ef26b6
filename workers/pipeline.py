"""The labeling pipeline core: lease a batch, ask the teacher (or the cache), check, record.

Used as is by the embedded mode and by the Celery task adapter. Per-process resources (the
event loop, one HTTP client per teacher, compiled validators) live in :class:`LabelRuntime`,
built after the fork.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from schemas.errors import ConfigError, PermanentError, StillhouseError
from storage.items import ClaimedItem, claim_items, known_good_for
from storage.models import CallStatus, SpecRow, TeacherCall
from storage.results import (
    BatchResult,
    CallRecord,
    LabelRecord,
    NewResponse,
    Release,
    cached_responses,
    record_batch,
)
from workers.checks import Checker
from workers.prompt import render_messages
from workers.spec import Spec, parse_spec
from workers.teacher import (
    TeacherClient,
    TeacherOutcome,
    TeacherRequest,
    build_request,
    make_http_client,
    usage_of,
)

__all__ = ["BatchSummary", "LabelRuntime", "label_until_done", "worker_id"]


def worker_id() -> str:
    """A lease owner name that is unique per process and readable in the database."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass(slots=True)
class BatchSummary:
    claimed: int = 0
    labeled: int = 0
    accepted: int = 0
    cache_hits: int = 0
    teacher_calls: int = 0
    released: int = 0
    failed: int = 0

    def add(self, other: BatchSummary) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass(slots=True)
class _Loaded:
    spec: Spec
    checker: Checker
    client: TeacherClient
    config_pause_s: float = 0.0


class LabelRuntime:
    """Everything one process needs to label: sessions, one event loop, one client per teacher."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        teacher_base_url: str | None = None,
        http_transport: str = "aiohttp",
        owner: str | None = None,
        config_pause_s: float = 0.0,
    ) -> None:
        self.sessions = sessions
        # After a configuration error (a bad API key) items wait this long before another
        # try: workers use a pause so a fleet does not hammer the teacher; embedded uses none.
        self.config_pause_s = config_pause_s
        self.teacher_base_url = teacher_base_url
        self.http_transport = http_transport
        self.owner = owner or worker_id()
        self._runner = asyncio.Runner()
        self._loaded: dict[int, _Loaded] = {}

    def close(self) -> None:
        for loaded in self._loaded.values():
            self._runner.run(loaded.client.http.aclose())
        self._loaded.clear()
        self._runner.close()

    def __enter__(self) -> LabelRuntime:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _load(self, spec_id: int) -> _Loaded:
        if spec_id not in self._loaded:
            with self.sessions() as session:
                row = session.get(SpecRow, spec_id)
                if row is None:
                    raise ConfigError(f"spec id {spec_id} is not in the database")
                spec = parse_spec(row.body, source=f"spec {row.name} v{row.version}")
            config = spec.teacher
            if self.teacher_base_url:
                config = dataclasses.replace(config, base_url=self.teacher_base_url)
            http = self._runner.run(_make_client(config, self.http_transport))
            self._loaded[spec_id] = _Loaded(
                spec, Checker(spec), TeacherClient(config, http), self.config_pause_s
            )
        return self._loaded[spec_id]

    def label_batch(
        self, spec_id: int, *, item_ids: Sequence[int] | None = None, limit: int | None = None
    ) -> BatchSummary:
        """Lease up to ``limit`` items (or exactly ``item_ids``), label them, commit once."""
        loaded = self._load(spec_id)
        labeling = loaded.spec.labeling
        size = limit or (len(item_ids) if item_ids is not None else labeling["batch_size"])
        with self.sessions.begin() as session:
            claimed = claim_items(
                session, spec_id, self.owner, labeling["lease_s"], item_ids=item_ids, limit=size
            )
        if not claimed:
            return BatchSummary()
        with self.sessions() as session:
            known = known_good_for(session, [c.id for c in claimed])
            requests = {c.id: self._request(loaded.spec, c) for c in claimed}
            cached = cached_responses(session, [r.request_hash for r in requests.values()])
        misses = {r.request_hash: r for r in requests.values() if r.request_hash not in cached}
        outcomes = self._runner.run(_call_all(loaded.client, list(misses.values())))
        batch, summary, config_error = _assemble(loaded, claimed, requests, known, cached, outcomes)
        with self.sessions.begin() as session:
            record_batch(session, spec_id, batch)
        if config_error is not None:
            raise config_error
        return summary

    @staticmethod
    def _request(spec: Spec, item: ClaimedItem) -> TeacherRequest:
        return build_request(
            spec.teacher,
            render_messages(spec, item.text),
            spec.output_schema,
            f"{spec.name}_v{spec.version}",
        )


async def _make_client(config: Any, transport: str) -> Any:
    # Built inside the runner's loop: aiohttp sessions bind to the loop that creates them.
    return make_http_client(config, transport=transport)


async def _call_all(
    client: TeacherClient, requests: list[TeacherRequest]
) -> dict[str, TeacherOutcome]:
    results = await asyncio.gather(*(client.complete(r) for r in requests))
    return {r.request_hash: outcome for r, outcome in zip(requests, results, strict=True)}


def _assemble(
    loaded: _Loaded,
    claimed: list[ClaimedItem],
    requests: dict[int, TeacherRequest],
    known: dict[int, dict[str, Any]],
    cached: dict[str, dict[str, Any]],
    outcomes: dict[str, TeacherOutcome],
) -> tuple[BatchResult, BatchSummary, ConfigError | None]:
    batch = BatchResult([], [], [], [])
    summary = BatchSummary(claimed=len(claimed))
    config_error: ConfigError | None = None
    charged: set[str] = set()  # one request answered once, even if two items asked it
    for item in claimed:
        request = requests[item.id]
        rhash = request.request_hash
        if rhash in cached or rhash in charged:
            body = cached.get(rhash) or outcomes[rhash].body
            batch.calls.append(CallRecord(item.id, rhash, 0, CallStatus.CACHE_HIT))
            summary.cache_hits += 1
        else:
            charged.add(rhash)
            outcome = outcomes[rhash]
            body = outcome.body
            _ledger(loaded.spec, item.id, request, outcome, batch, summary)
            if body is None:
                error = outcome.error or PermanentError("no answer")
                config_error = config_error or _release(loaded, item, error, batch, summary)
                continue
        _label(loaded.checker, item.id, rhash, body, known.get(item.id), batch, summary)
    return batch, summary, config_error


def _ledger(
    spec: Spec,
    item_id: int,
    request: TeacherRequest,
    outcome: TeacherOutcome,
    batch: BatchResult,
    summary: BatchSummary,
) -> None:
    rhash = request.request_hash
    for number, attempt in enumerate(outcome.attempts, start=1):
        cost = spec.teacher.cost_usd(attempt.prompt_tokens, attempt.completion_tokens)
        batch.calls.append(
            CallRecord(
                item_id,
                rhash,
                number,
                CallStatus.OK if attempt.ok else CallStatus.ERROR,
                attempt.error_kind,
                attempt.http_status,
                attempt.prompt_tokens,
                attempt.completion_tokens,
                round(cost, 10),
                attempt.latency_ms,
            )
        )
    summary.teacher_calls += len(outcome.attempts)
    if outcome.body is not None:
        prompt_tokens, completion_tokens = usage_of(outcome.body)
        batch.responses.append(
            NewResponse(
                rhash,
                request.provider,
                request.model,
                request.body,
                outcome.body,
                prompt_tokens,
                completion_tokens,
            )
        )


def _release(
    loaded: _Loaded,
    item: ClaimedItem,
    error: StillhouseError,
    batch: BatchResult,
    summary: BatchSummary,
) -> ConfigError | None:
    if isinstance(error, ConfigError):
        # Not the item's fault: give it back after a pause (a fixed key or setting lets it
        # go on) and stop this run.
        batch.releases.append(
            Release(item.id, f"config: {error}", loaded.config_pause_s or None, failed=False)
        )
        summary.released += 1
        return error
    exhausted = item.attempts >= loaded.spec.labeling["max_attempts"]
    failed = isinstance(error, PermanentError) or exhausted
    wait = getattr(error, "retry_after_s", None)
    batch.releases.append(Release(item.id, f"{error.kind}: {error}", wait, failed=failed))
    summary.failed += int(failed)
    summary.released += int(not failed)
    return None


def _label(
    checker: Checker,
    item_id: int,
    rhash: str,
    body: dict[str, Any] | None,
    known_good: dict[str, Any] | None,
    batch: BatchResult,
    summary: BatchSummary,
) -> None:
    assert body is not None
    result = checker.check(body, known_good)
    batch.labels.append(
        LabelRecord(
            item_id,
            result.output,
            result.verdict,
            result.reasons,
            result.confidence,
            result.known_good_match,
            rhash,
        )
    )
    summary.labeled += 1
    summary.accepted += int(result.verdict.value == "accepted")


def spend_usd(session: Session, spec_id: int) -> float:
    total = session.scalar(
        select(func.coalesce(func.sum(TeacherCall.cost_usd), 0.0)).where(
            TeacherCall.spec_id == spec_id
        )
    )
    return float(total or 0.0)


def label_until_done(
    runtime: LabelRuntime, spec_id: int, *, on_batch: Callable[[BatchSummary], None] | None = None
) -> BatchSummary:
    """Embedded mode: label claimable items batch after batch until none is left."""
    loaded = runtime._load(spec_id)
    budget = loaded.spec.budget_usd
    total = BatchSummary()
    while True:
        if budget is not None:
            with runtime.sessions() as session:
                spent = spend_usd(session, spec_id)
            if spent >= budget:
                raise ConfigError(
                    f"spec {loaded.spec.name!r} has spent ${spent:.4f} of its "
                    f"budget_usd ${budget:.2f}; remaining items stay pending. "
                    f"Raise budget_usd in the spec file to go on"
                )
        summary = runtime.label_batch(spec_id)
        if summary.claimed == 0:
            return total
        total.add(summary)
        if on_batch is not None:
            on_batch(summary)
