"""Read-side queries for `stillhouse status` and the accuracy summaries, and the statistics
they share with the student's evaluation: the Wilson interval and the ranking metrics."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from storage.models import Item, ItemState, Label, SpecRow, TeacherCall, Verdict

__all__ = [
    "Z_ONE_SIDED_95",
    "Z_TWO_SIDED_95",
    "LabelStats",
    "Status",
    "kendall_tau_graded",
    "label_stats",
    "ndcg_at_k",
    "status",
    "wilson",
]

# One-sided 95 %: the threshold's accuracy is at least the target with 95 % confidence.
Z_ONE_SIDED_95 = 1.6449
Z_TWO_SIDED_95 = 1.96


def wilson(hits: int, n: int, z: float = Z_TWO_SIDED_95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (sound at 0 and 1, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    p = hits / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(slots=True)
class Status:
    items: int
    by_state: dict[str, int]
    by_verdict: dict[str, int]
    calls: dict[str, int]
    spend_usd: float
    labeled_per_s: float | None
    spec: str | None = None
    specs: list[dict[str, Any]] = field(default_factory=list)
    # The newest error on an item not yet labeled (a teacher that cannot be reached, a
    # worker's configuration): what to fix, where users look first.
    last_error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def status(session: Session, spec_name: str | None = None) -> Status:
    """Counts by state and verdict, spend, and labeling rate, for one spec name or all."""
    item_filter = [Item.spec_name == spec_name] if spec_name else []
    spec_ids = select(SpecRow.id).where(SpecRow.name == spec_name) if spec_name else None
    by_state = {s.value: 0 for s in ItemState}
    for state, n in session.execute(
        select(Item.state, func.count()).where(*item_filter).group_by(Item.state)
    ):
        by_state[ItemState(state).value] = n
    label_q = select(Label.verdict, func.count())
    call_q = select(
        TeacherCall.status, func.count(), func.coalesce(func.sum(TeacherCall.cost_usd), 0)
    )
    rate_q = select(func.count(), func.min(Label.created_at), func.max(Label.created_at))
    if spec_ids is not None:
        label_q = label_q.where(Label.spec_id.in_(spec_ids))
        call_q = call_q.where(TeacherCall.spec_id.in_(spec_ids))
        rate_q = rate_q.where(Label.spec_id.in_(spec_ids))
    by_verdict = {v.value: 0 for v in Verdict}
    for verdict, n in session.execute(label_q.group_by(Label.verdict)):
        by_verdict[Verdict(verdict).value] = n
    calls: dict[str, int] = {}
    spend = 0.0
    for call_status, n, cost in session.execute(call_q.group_by(TeacherCall.status)):
        calls[str(getattr(call_status, "value", call_status))] = n
        spend += float(cost or 0)
    n_labels, first, last = session.execute(rate_q).one()
    rate = None
    if n_labels and first and last and last > first:
        rate = round(n_labels / (last - first).total_seconds(), 2)
    specs = [
        {"name": r.name, "version": r.version, "kind": r.kind}
        for r in session.scalars(select(SpecRow).order_by(SpecRow.name, SpecRow.version))
        if spec_name is None or r.name == spec_name
    ]
    unfinished = [ItemState.PENDING, ItemState.QUEUED, ItemState.LEASED, ItemState.FAILED]
    error = session.scalar(
        select(Item.last_error)
        .where(*item_filter, Item.state.in_(unfinished), Item.last_error.is_not(None))
        .order_by(Item.updated_at.desc())
        .limit(1)
    )
    return Status(
        items=sum(by_state.values()),
        by_state=by_state,
        by_verdict=by_verdict,
        calls=calls,
        spend_usd=round(spend, 6),
        labeled_per_s=rate,
        spec=spec_name,
        specs=specs,
        last_error=error,
    )


@dataclass(slots=True)
class LabelStats:
    """How the teacher's labels compare with the known-good records for one spec version."""

    labels: int
    with_known_good: int
    teacher_accuracy: float | None
    accepted: int
    accepted_accuracy: float | None  # over the accepted labels whose record was checked
    accepted_checked: int = 0  # accepted, with a known-good record compared
    needs_review: int = 0


def label_stats(session: Session, spec_id: int) -> LabelStats:
    rows = session.execute(
        select(Label.verdict, Label.known_good_match).where(Label.spec_id == spec_id)
    ).all()
    with_kg = [(v, m) for v, m in rows if m is not None]
    accepted = [m for v, m in with_kg if v == Verdict.ACCEPTED]
    return LabelStats(
        labels=len(rows),
        with_known_good=len(with_kg),
        teacher_accuracy=_mean([m for _, m in with_kg]),
        accepted=sum(1 for v, _ in rows if v == Verdict.ACCEPTED),
        accepted_accuracy=_mean(accepted),
        accepted_checked=len(accepted),
        needs_review=sum(1 for v, _ in rows if v == Verdict.NEEDS_REVIEW),
    )


def _mean(flags: list[bool]) -> float | None:
    return round(sum(flags) / len(flags), 4) if flags else None


# Ranking metrics: pure functions shared by the known-good checks (``workers.compare``) and
# the ranking student's evaluation (``student_train``), which may not import workers.


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def kendall_tau_graded(order: Sequence[str], grades: Mapping[str, float]) -> float:
    """Kendall's tau of an ordering against graded relevance (missing ids grade 0), over the
    pairs the grades order.

    A pair the grades tie (two candidates equally relevant) counts neither way, as in tau-b:
    swapping equally graded candidates costs nothing. Unlike tau-b, whose denominator keeps
    the tied pairs (so that even the graded order itself scores below 1.0), the score is
    normalized by the ordered pairs: the graded order scores 1.0 and its reverse -1.0. With
    no pair the grades order, 1.0.
    """
    values = [float(grades.get(item, 0.0)) for item in _unique(order)]
    n = len(values)
    concordant = discordant = tied = 0
    for i in range(n):
        for j in range(i + 1, n):
            if values[i] > values[j]:
                concordant += 1  # the more relevant one first: right
            elif values[i] < values[j]:
                discordant += 1
            else:
                tied += 1
    pairs = n * (n - 1) // 2
    if pairs - tied == 0:
        return 1.0
    return (concordant - discordant) / (pairs - tied)


def _dcg(gains: Iterable[float]) -> float:
    return sum((math.pow(2.0, rel) - 1.0) / math.log2(i + 2) for i, rel in enumerate(gains))


def ndcg_at_k(order: Sequence[str], relevance: Mapping[str, float], k: int) -> float:
    """NDCG@k of an ordering against graded relevance (missing ids count as 0).

    Uses gains ``2**rel - 1`` discounted by ``log2(i + 2)``, normalized by the ideal ordering
    of ``relevance``. When nothing is relevant there is nothing to get wrong: 1.0.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    ideal = _dcg(sorted(relevance.values(), reverse=True)[:k])
    if ideal <= 0:
        return 1.0
    return _dcg(relevance.get(item, 0.0) for item in _unique(order)[:k]) / ideal
