"""A ranking student evaluated by slice: NDCG@k, top-1 and Kendall's tau-b of its orderings
against the known-good graded relevance and against the teacher's order, the teacher's own
figures against the relevance on the same items beside them, each with a 95 % interval from
the slice's size, and the slices whose NDCG@k falls too far below the overall flagged.

The result has the shape of ``student_train.evaluate.evaluate``'s: ``overall``, ``slices``
(``topic=sport``), ``flagged`` and ``slice_margin``, so the run's card and plots read it the
same way (the headline's ``slice_key`` is ``student_ndcg``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from storage.stats import Z_TWO_SIDED_95, ndcg_at_k
from student_train.evaluate import DEFAULT_SLICE_MARGIN, wilson

__all__ = [
    "RankScored",
    "evaluate_ranking",
    "kendall_tau_b",
    "mean_interval",
    "order_grades",
    "ranking_headline",
    "tau_b_graded",
]

# Each figure: its name in the report and the range a mean's interval is clipped to.
_RANGES = {"ndcg": (0.0, 1.0), "tau_b": (-1.0, 1.0)}


@dataclass(frozen=True, slots=True)
class RankScored:
    """One held-out query: the student's order, the teacher's (None: it gave no usable
    answer), the known-good grades (None: no record) and the query's slice values."""

    student: Sequence[str]
    teacher: Sequence[str] | None
    relevance: Mapping[str, float] | None
    slices: Mapping[str, str] = field(default_factory=dict)


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Kendall's tau-b of two paired score lists (higher is better in both), as scipy's
    ``kendalltau(x, y, variant="b")``: ``(C - D) / sqrt((n0 - n1) * (n0 - n2))``, where a
    pair tied in either list is neither concordant nor discordant, ``n0`` counts all pairs
    and ``n1``, ``n2`` those tied in ``x``, in ``y``. None when either list ties every pair
    (scipy's NaN): the correlation is undefined.
    """
    if len(x) != len(y):
        raise ValueError(f"kendall_tau_b needs paired lists, got {len(x)} and {len(y)} values")
    n = len(x)
    balance = tied_x = tied_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            tied_x += dx == 0
            tied_y += dy == 0
            balance += (dx * dy > 0) - (dx * dy < 0)
    pairs = n * (n - 1) // 2
    denominator = math.sqrt((pairs - tied_x) * (pairs - tied_y))
    return balance / denominator if denominator else None


def order_grades(order: Sequence[str], ids: Sequence[str]) -> list[float]:
    """Each of ``ids`` scored by its place in ``order`` (the first highest); ids the order
    leaves out tie below every listed one."""
    place = {item: k for k, item in enumerate(dict.fromkeys(order))}
    return [float(len(place) - place[i]) if i in place else 0.0 for i in ids]


def tau_b_graded(order: Sequence[str], grades: Mapping[str, float]) -> float | None:
    """Kendall's tau-b of an ordering against graded relevance, over the graded ids and the
    ordered ones (ids missing from ``grades`` grade 0).

    This differs from :func:`storage.stats.kendall_tau_graded` only in its denominator: both
    count pairs the grades tie neither way, but tau-b keeps them in its normalization, so a
    perfect order of grades 2, 1, 1, 0, 0, 0 scores ``11 / sqrt(15 * 11) = 0.856``, not 1.0.
    For an order without ties, ``tau_b = kendall_tau_graded * sqrt((n0 - n2) / n0)`` with
    ``n0`` pairs of which the grades tie ``n2``.
    """
    ids = list(dict.fromkeys([*order, *grades]))
    return kendall_tau_b(order_grades(order, ids), [float(grades.get(i, 0.0)) for i in ids])


def _teacher_grades(order: Sequence[str], k: int) -> dict[str, float]:
    # The teacher's top k graded k, k-1, ..., 1 (as the known-good check grades an order
    # given without grades), so NDCG against the teacher rewards its first places most.
    return {item: float(k - i) for i, item in enumerate(list(dict.fromkeys(order))[:k])}


def _top1(order: Sequence[str], grades: Mapping[str, float]) -> bool:
    best = max(grades.values(), default=0.0)
    return bool(order) and float(grades.get(order[0], 0.0)) >= best


def _figures(order: Sequence[str], grades: Mapping[str, float], k: int) -> dict[str, Any]:
    return {
        "ndcg": ndcg_at_k(order, grades, k),
        "top1": _top1(order, grades),
        "tau_b": tau_b_graded(order, grades),
    }


def mean_interval(values: Sequence[float], low: float, high: float) -> list[float] | None:
    """The normal 95 % interval of a mean, ``mean ± 1.96 sd / sqrt(n)`` (sample sd), clipped
    to ``[low, high]``; one value says nothing of its spread (the whole range), none: None."""
    n = len(values)
    if n == 0:
        return None
    if n == 1:
        return [low, high]
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = Z_TWO_SIDED_95 * sd / math.sqrt(n)
    return [round(max(low, mean - half), 6), round(min(high, mean + half), 6)]


def _summary(prefix: str, figures: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean NDCG, top-1 share and mean tau-b of some figures, each with its interval."""
    out: dict[str, Any] = {}
    for name, (low, high) in _RANGES.items():
        values = [float(f[name]) for f in figures if f[name] is not None]
        out[f"{prefix}_{name}"] = round(sum(values) / len(values), 6) if values else None
        out[f"{prefix}_{name}_interval"] = mean_interval(values, low, high)
    hits = sum(bool(f["top1"]) for f in figures)
    out[f"{prefix}_top1"] = round(hits / len(figures), 6) if figures else None
    out[f"{prefix}_top1_interval"] = wilson(hits, len(figures))
    return out


def _scores(items: Sequence[RankScored], k: int) -> dict[str, Any]:
    known = [i for i in items if i.relevance is not None]
    taught = [i for i in items if i.teacher is not None]
    student = _summary("student", [_figures(i.student, i.relevance or {}, k) for i in known])
    # A query the teacher did not answer counts as an empty order: it got nothing right.
    teacher = _summary("teacher", [_figures(i.teacher or [], i.relevance or {}, k) for i in known])
    versus = _summary(
        "vs_teacher",
        [_figures(i.student, _teacher_grades(i.teacher or [], k), k) for i in taught],
    )
    ratio = None
    if student["student_ndcg"] is not None and teacher["teacher_ndcg"]:
        ratio = round(student["student_ndcg"] / teacher["teacher_ndcg"], 6)
    return {
        "items": len(items),
        "with_record": len(known),
        "with_teacher": len(taught),
        **student,
        **teacher,
        "retention": ratio,
        **versus,
    }


def evaluate_ranking(
    items: Sequence[RankScored], k: int, *, margin: float = DEFAULT_SLICE_MARGIN
) -> dict[str, Any]:
    """``overall``, ``slices`` (each slice value) and ``flagged``: a slice whose student
    NDCG@k against the records is more than ``margin`` below the overall one."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    groups: dict[str, list[RankScored]] = defaultdict(list)
    for item in items:
        for name, value in item.slices.items():
            groups[f"{name}={value}"].append(item)
    overall = {"k": k, **_scores(items, k)}
    slices = {name: _scores(members, k) for name, members in sorted(groups.items())}
    return {
        "overall": overall,
        "slices": slices,
        "flagged": _flagged(overall, slices, k, margin),
        "slice_margin": margin,
    }


def _flagged(
    overall: Mapping[str, Any], slices: Mapping[str, Mapping[str, Any]], k: int, margin: float
) -> list[dict[str, Any]]:
    aggregate = overall["student_ndcg"]
    flagged = []
    for name, scores in slices.items():
        ndcg = scores["student_ndcg"]
        if ndcg is None or aggregate is None or ndcg >= aggregate - margin:
            continue
        flagged.append(
            {
                "slice": name,
                "student_ndcg": ndcg,
                "interval": scores["student_ndcg_interval"],
                "with_record": scores["with_record"],
                "why": f"NDCG@{k} {ndcg:.3f} is more than {margin:.3f} below the overall "
                f"{aggregate:.3f} (student.slice_margin)",
            }
        )
    return flagged


def ranking_headline(overall: Mapping[str, Any]) -> dict[str, Any]:
    """The figure to read first: the student's NDCG@k against the records beside the
    teacher's on the same items, and their ratio; slices are drawn by the same figure."""
    return {
        "metric": f"ndcg@{overall.get('k')}",
        "student": overall.get("student_ndcg"),
        "teacher": overall.get("teacher_ndcg"),
        "ratio": overall.get("retention"),
        "slice_key": "student_ndcg",
    }
