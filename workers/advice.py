"""Should this task be distilled? Measured figures and stated costs in, a recommendation out.

The comparison is monthly (30 days) at a stated volume:

- **teacher only**: every input answered by the teacher, at its measured cost per item (the
  ledger's spend, retries included, over the items it labeled);
- **student plus fallback**: hosting the student, the engineers' upkeep, the build amortized
  over ``amortize_months``, and the teacher for the share of inputs the router sends back
  (measured on the latest run's test split at its chosen thresholds).

The break-even volume is where the two meet: ``fixed / (30 x cost_per_item x (1 - share))``.
The recommendation is ``do_nothing`` when the teacher costs less than keeping a student (at
that volume nothing a student does can pay for itself) or when a measured student costs more;
``not_yet`` when the volume would pay for a student but what is needed to trust one is missing
(a trained student, one within the quality tolerance of the teacher); ``distill`` otherwise.
Each reason names the figure it rests on. The task itself is scored: narrowness (few classes,
low output entropy, a small loss from teacher to student), measurability (the share of items
with a known-good record or a review) and volume.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["DAYS_PER_MONTH", "Measured", "Stated", "advise", "entropy_bits"]

DAYS_PER_MONTH = 30


@dataclass(frozen=True)
class Stated:
    """What the measurements cannot know: people's time and hosting (defaults shown)."""

    build_hours: float = 40.0  # to wire the student and its router into the application
    upkeep_hours_per_month: float = 8.0  # retraining, monitoring, reviewing flagged slices
    hourly_rate_usd: float = 100.0
    hosting_usd_per_month: float = 60.0  # one small CPU instance for the router
    amortize_months: float = 12.0
    max_quality_loss_points: float = 1.0  # how far below the teacher the routed answers may be

    def fixed_monthly_usd(self) -> float:
        """What a student costs a month before any fallback call."""
        return (
            self.hosting_usd_per_month
            + self.upkeep_hours_per_month * self.hourly_rate_usd
            + self.build_hours * self.hourly_rate_usd / self.amortize_months
        )


@dataclass(frozen=True)
class Measured:
    """What the store and the latest run say."""

    spec: str
    teacher_usd_per_item: float | None = None  # None: no teacher call in the ledger yet
    teacher_latency_ms: float | None = None
    items_labeled: int = 0
    classes: int = 0
    label_counts: Mapping[str, int] = field(default_factory=dict)
    measurable_share: float = 0.0  # items with a known-good record or a review decision
    run: str | None = None  # the latest finished run
    student_kind: str | None = None
    student_accuracy: float | None = None
    teacher_accuracy: float | None = None
    routed_accuracy: float | None = None
    fallback_share: float | None = None
    student_latency_p99_ms: float | None = None
    against: str | None = None  # "records" or "teacher"


def entropy_bits(counts: Mapping[str, int]) -> float | None:
    """Shannon entropy of a label distribution, in bits (None for no labels)."""
    total = sum(counts.values())
    if not total:
        return None
    return -sum(c / total * math.log2(c / total) for c in counts.values() if c)


def advise(measured: Measured, stated: Stated, volume_per_day: float) -> dict[str, Any]:
    """The monthly costs, the break-even volume, the quality difference, the task's scores
    and the recommendation (``distill``, ``do_nothing`` or ``not_yet``) with its reasons."""
    if volume_per_day <= 0:
        raise ValueError(
            f"--volume must be a positive number of inputs a day, got {volume_per_day}"
        )
    fixed = stated.fixed_monthly_usd()
    monthly_inputs = volume_per_day * DAYS_PER_MONTH
    cost = measured.teacher_usd_per_item
    share = measured.fallback_share
    reasons: list[str] = []
    missing: list[str] = []

    teacher_monthly = None if cost is None else monthly_inputs * cost
    student_monthly = None
    break_even = None
    if cost is not None:
        fallback = 1.0 if share is None else share  # unknown share: bound it by the worst case
        student_monthly = fixed + monthly_inputs * fallback * cost
        if cost > 0 and share is not None and share < 1:
            break_even = fixed / (DAYS_PER_MONTH * cost * (1 - share))
    quality_delta = None
    if measured.routed_accuracy is not None and measured.teacher_accuracy is not None:
        quality_delta = measured.routed_accuracy - measured.teacher_accuracy

    recommendation: str
    if cost is None:
        recommendation = "not_yet"
        missing.append(
            f"the teacher's cost per item: label some items first (stillhouse backfill SOURCE "
            f"--spec {measured.spec}), so the ledger measures it"
        )
    elif teacher_monthly is not None and teacher_monthly <= fixed:
        recommendation = "do_nothing"
        reasons.append(
            f"keep calling the teacher: at {volume_per_day:,.0f} a day it costs "
            f"${teacher_monthly:,.2f} a month (${cost:.6f} an item, measured), less than the "
            f"${fixed:,.2f} a month a student costs before any fallback (hosting, upkeep and "
            "the build amortized)"
        )
    elif measured.run is None:
        recommendation = "not_yet"
        missing.append(
            f"a trained student: stillhouse train --spec {measured.spec} (its accuracy and "
            "fallback share decide whether it pays)"
        )
        reasons.append(
            f"at {volume_per_day:,.0f} a day the teacher costs ${teacher_monthly:,.2f} a "
            f"month, more than a student's fixed ${fixed:,.2f}: worth measuring a student"
        )
    elif quality_delta is None or share is None:
        recommendation = "not_yet"
        missing.append(
            f"the router's figures for run {measured.run}: train a classification student "
            "again (its router.json holds the fallback share and routed accuracy)"
        )
    elif quality_delta < -stated.max_quality_loss_points / 100:
        recommendation = "not_yet"
        missing.append(
            f"a student within {stated.max_quality_loss_points} points of the teacher: "
            f"routed, run {measured.run} is {100 * -quality_delta:.1f} points below it "
            "(more labels, a stronger student kind, or a stricter router target)"
        )
    elif student_monthly is not None and teacher_monthly is not None:
        if student_monthly < teacher_monthly:
            recommendation = "distill"
            reasons.append(
                f"student plus fallback costs ${student_monthly:,.2f} a month against "
                f"${teacher_monthly:,.2f} for the teacher alone, with {share:.1%} of inputs "
                f"sent back and the routed answers {100 * quality_delta:+.1f} points from the "
                f"teacher's (run {measured.run})"
            )
        else:
            recommendation = "do_nothing"
            reasons.append(
                f"student plus fallback would cost ${student_monthly:,.2f} a month, not less "
                f"than the teacher's ${teacher_monthly:,.2f}"
            )
    else:  # pragma: no cover - every path above sets the costs
        recommendation = "not_yet"
    if break_even is not None:
        reasons.append(f"break-even at {break_even:,.0f} inputs a day")

    return {
        "spec": measured.spec,
        "volume_per_day": volume_per_day,
        "recommendation": recommendation,
        "reasons": reasons,
        "missing": missing,
        "monthly_cost_teacher_usd": _round(teacher_monthly),
        "monthly_cost_student_usd": _round(student_monthly),
        "monthly_fixed_student_usd": round(fixed, 2),
        "break_even_per_day": None if break_even is None else math.ceil(break_even),
        "quality_delta": None if quality_delta is None else round(quality_delta, 6),
        "task": _task_scores(measured, volume_per_day, break_even),
        "measured": asdict(measured),
        "stated": asdict(stated),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _task_scores(
    measured: Measured, volume_per_day: float, break_even: float | None
) -> dict[str, Any]:
    """Scores in [0, 1] (higher: a better candidate) with the figures behind them."""
    bits = entropy_bits(measured.label_counts)
    classes = measured.classes or len(measured.label_counts)
    loss = None
    if measured.student_accuracy is not None and measured.teacher_accuracy is not None:
        loss = measured.teacher_accuracy - measured.student_accuracy
    # Narrow: few classes (2 scores 1, 50 or more 0), concentrated answers, a small loss.
    parts = []
    if classes:
        parts.append(max(0.0, 1 - math.log(max(classes, 2) / 2) / math.log(25)))
    if bits is not None and classes > 1:
        parts.append(1 - bits / math.log2(classes))
    if loss is not None:
        parts.append(max(0.0, 1 - max(loss, 0.0) / 0.1))
    narrowness = sum(parts) / len(parts) if parts else None
    volume = None
    if break_even:
        volume = min(1.0, volume_per_day / (2 * break_even))
    return {
        "narrowness": None if narrowness is None else round(narrowness, 3),
        "classes": classes,
        "output_entropy_bits": None if bits is None else round(bits, 3),
        "student_loss": None if loss is None else round(loss, 6),
        "measurability": round(measured.measurable_share, 3),
        "volume": None if volume is None else round(volume, 3),
    }
