"""Estimate calls, tokens, cost and time for a source before anything is spent.

Reads the whole source once (to count rows) and keeps a seeded reservoir sample; the sample's
prompts are rendered exactly as labeling would render them, then looked up in the store, so
rows already labeled and answers already cached count as free.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from schemas.errors import PermanentError
from storage.models import FINAL_STATES, CallStatus, Item, SpecRow, TeacherBatch, TeacherCall
from storage.results import cached_responses
from workers.ingest import SourceRow, make_item
from workers.prompt import render_messages
from workers.spec import Spec, TeacherConfig
from workers.teacher import build_request

__all__ = ["Estimate", "estimate_source"]

CHARS_PER_TOKEN = 4.0  # a typical English average; the budget reserves with 3 to be safe
DEFAULT_COMPLETION_TOKENS = 50
DEFAULT_LATENCY_S = 1.0


@dataclass(slots=True)
class Estimate:
    rows: int
    bad_rows: int
    sampled: int
    already_done_share: float
    cached_share: float
    calls: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    seconds: float
    budget_usd: float | None
    within_budget: bool | None
    assumptions: list[str] = field(default_factory=list)
    # One entry per teacher (the primary, then the jury's): model, calls, cost_usd.
    by_teacher: list[dict[str, Any]] = field(default_factory=list)
    # The same work through the provider's batch API (labeling.mode: batch): the primary
    # teacher's calls at the batch price (the jury's stay live), how many batches, how long.
    batch: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _reservoir(rows: Iterable[SourceRow], size: int, seed: int) -> tuple[list[SourceRow], int]:
    rng = random.Random(seed)
    sample: list[SourceRow] = []
    count = 0
    for count, row in enumerate(rows, start=1):
        if len(sample) < size:
            sample.append(row)
        elif (j := rng.randrange(count)) < size:
            sample[j] = row
    return sample, count


def estimate_source(
    session: Session,
    spec: Spec,
    rows: Iterable[SourceRow],
    *,
    sample_size: int = 200,
    workers: int = 1,
    seed: int = 0,
) -> Estimate:
    """Expected calls, tokens, cost and time to label ``rows`` with ``spec``."""
    sample, total = _reservoir(rows, sample_size, seed)
    items, bad = [], 0
    for source_row in sample:
        try:
            if source_row.row is None:
                raise PermanentError(source_row.error or "bad row")
            items.append(make_item(spec, source_row.row))
        except PermanentError:
            bad += 1
    done = _already_done(session, spec, [i.external_id for i in items])
    messages = [render_messages(spec, i.text) for i in items if i.external_id not in done]
    # Every item is asked of every teacher (a jury's too), each with its own cache key.
    asked = [
        (teacher, build_request(teacher, m, spec.output_schema, spec.schema_name))
        for teacher in spec.teachers
        for m in messages
    ]
    cached = cached_responses(session, [r.request_hash for _, r in asked])
    # A text that repeats another's is one call (content dedupe, then the cache): the sample's
    # share of repeats stands for the source's.
    distinct = {r.request_hash: (t, r) for t, r in asked if r.request_hash not in cached}
    paid = list(distinct.values())
    scale = (total - round(bad / max(1, len(sample)) * total)) / max(1, len(items))
    history = _history(session, spec.name)
    notes: list[str] = []
    completion = history.get("completion_tokens") or DEFAULT_COMPLETION_TOKENS
    latency = history.get("latency_s") or DEFAULT_LATENCY_S
    if "completion_tokens" not in history:
        notes.append(
            f"no calls in the ledger for {spec.name!r} yet: assumed "
            f"{DEFAULT_COMPLETION_TOKENS} completion tokens and {DEFAULT_LATENCY_S:g} s "
            f"per call"
        )
    notes.append(f"prompt tokens estimated at {CHARS_PER_TOKEN:g} characters a token")
    chars = [sum(len(m["content"]) for m in r.body.get("messages", [])) for _, r in paid]
    prompt_per_call = statistics.fmean(chars) / CHARS_PER_TOKEN if chars else 0.0
    shares = [
        _teacher_share(
            teacher,
            round(sum(1 for asked_of, _ in paid if asked_of is teacher) * scale),
            prompt_per_call,
            completion,
            _calls_per_s(teacher, latency, workers),
        )
        for teacher in spec.teachers
    ]
    calls = sum(share.calls for share in shares)
    cost = sum(share.cost_usd for share in shares)
    if spec.jury.teachers:
        notes.append(
            f"every item is asked of {len(spec.teachers)} teachers (the primary and its "
            f"jury); calls and cost add up over them: see by_teacher"
        )
    budget = spec.budget_usd
    batch = _batch_estimate(session, spec, shares)
    notes.append(batch.pop("assumed"))
    return Estimate(
        rows=total,
        bad_rows=round(bad * total / max(1, len(sample))),
        sampled=len(sample),
        already_done_share=_share(len(done), len(items)),
        cached_share=_share(len(asked) - len(paid), len(asked)),  # repeats and cache hits
        calls=calls,
        prompt_tokens=sum(share.prompt_tokens for share in shares),
        completion_tokens=sum(share.completion_tokens for share in shares),
        cost_usd=round(cost, 4),
        # The teachers are asked side by side: the slowest one sets the time.
        seconds=round(max(share.seconds for share in shares), 1),
        budget_usd=budget,
        within_budget=None if budget is None else cost <= budget,
        assumptions=notes,
        by_teacher=[
            {"model": share.model, "calls": share.calls, "cost_usd": round(share.cost_usd, 4)}
            for share in shares
        ],
        batch=batch,
    )


def _batch_estimate(session: Session, spec: Spec, shares: list[Any]) -> dict[str, Any]:
    """Cost and time in batch mode: the primary's calls at ``labeling.batch.price_factor``;
    the time from this spec's finished batches (submitted to ended), else the window."""
    from workers.batch_api import PROVIDER_LIMITS

    settings = spec.batch
    primary, jury = shares[0], shares[1:]
    cost = primary.cost_usd * settings.price_factor + sum(s.cost_usd for s in jury)
    limit = PROVIDER_LIMITS.get(spec.teacher.provider, (50_000, 0))[0]
    limit = min(limit, settings.max_requests or limit)
    batches = -(-primary.calls // limit) if primary.calls else 0
    took = session.execute(
        select(TeacherBatch.submitted_at, TeacherBatch.ended_at).where(
            TeacherBatch.spec_name == spec.name,
            TeacherBatch.submitted_at.is_not(None),
            TeacherBatch.ended_at.is_not(None),
        )
    ).all()
    durations = [(end - start).total_seconds() for start, end in took if start and end]
    if durations:
        seconds = statistics.median(durations)
        assumed = (
            f"batch time: the median of {len(durations)} finished batches of "
            f"{spec.name!r} ({seconds:.0f} s); providers promise only the 24-hour window"
        )
    else:
        seconds = 24 * 3600.0
        assumed = "batch time: no finished batch yet, so the provider's 24-hour window"
    return {
        "cost_usd": round(cost, 4),
        "price_factor": settings.price_factor,
        "batches": batches,
        "seconds": round(seconds, 1),
        "saving_usd": round(sum(s.cost_usd for s in shares) - cost, 4),
        "assumed": assumed,
    }


@dataclass(frozen=True, slots=True)
class _TeacherShare:
    """One teacher's part of an estimate."""

    model: str
    calls: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    seconds: float


def _teacher_share(
    teacher: TeacherConfig, calls: int, prompt_per_call: float, completion: float, rate: float
) -> _TeacherShare:
    prompt_tokens = round(calls * prompt_per_call)
    completion_tokens = round(calls * completion * teacher.samples)
    return _TeacherShare(
        teacher.model,
        calls,
        prompt_tokens,
        completion_tokens,
        teacher.cost_usd(prompt_tokens, completion_tokens),
        calls / rate,
    )


def _share(part: int, whole: int) -> float:
    return round(part / whole, 4) if whole else 0.0


def _calls_per_s(teacher: TeacherConfig, latency_s: float, workers: int) -> float:
    # teacher.concurrency holds for the whole fleet: more workers share it, they do not add
    # to it (they only help when one process cannot keep that many calls going).
    del workers
    rate = teacher.concurrency / max(latency_s, 1e-3)
    if teacher.rpm:
        rate = min(rate, teacher.rpm / 60)
    return max(rate, 1e-6)


def _already_done(session: Session, spec: Spec, external_ids: list[str]) -> set[str]:
    if not external_ids:
        return set()
    stmt = (
        select(Item.external_id)
        .join(SpecRow, SpecRow.id == Item.spec_id)
        .where(
            Item.spec_name == spec.name,
            SpecRow.version == spec.version,
            Item.external_id.in_(external_ids),
            Item.state.in_(FINAL_STATES),
        )
    )
    return set(session.scalars(stmt))


def _history(session: Session, spec_name: str) -> dict[str, float]:
    row = session.execute(
        select(
            func.count(), func.avg(TeacherCall.completion_tokens), func.avg(TeacherCall.latency_ms)
        )
        .join(SpecRow, SpecRow.id == TeacherCall.spec_id)
        .where(SpecRow.name == spec_name, TeacherCall.status == CallStatus.OK)
    ).one()
    if not row[0]:
        return {}
    return {
        "completion_tokens": math.ceil(float(row[1] or 0)),
        "latency_s": float(row[2] or 0) / 1000,
    }
