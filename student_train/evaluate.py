"""A classification student evaluated by slice: overall, per slice value and per class, the
student and the teacher against the known-good records, each with a Wilson interval from the
slice's size, and the slices that fall too far below the aggregate flagged.

A student can look fine on average and fail a rare class, which is how distilled moderation
models fail in practice: a flagged slice is named in ``metrics.json`` and makes
``stillhouse train --fail-on-flag`` exit non-zero.

Slices are named as the report names them: ``queue=sport`` for a spec slice field, and
``class=sport`` for the items whose known-good record is that class (there the accuracy is the
class's recall).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from storage.stats import wilson as _wilson
from student_train.data import Example

__all__ = [
    "DEFAULT_SLICE_MARGIN",
    "Scored",
    "confusion",
    "evaluate",
    "headline",
    "macro_f1",
    "scored_items",
    "wilson",
]

DEFAULT_SLICE_MARGIN = 0.05
Z_95 = 1.959964


@dataclass(frozen=True, slots=True)
class Scored:
    """One held-out item: the student's and the teacher's label, its record and slices."""

    student: str
    teacher: str  # "" when the teacher gave no usable label
    known_good: str | None
    slices: Mapping[str, str] = field(default_factory=dict)


def wilson(hits: int, n: int) -> list[float] | None:
    """The 95 % Wilson score interval of ``hits`` of ``n``, rounded (None for no items)."""
    if n == 0:
        return None
    low, high = _wilson(hits, n, Z_95)
    return [round(low, 6), round(high, 6)]


def macro_f1(pairs: Sequence[tuple[str, str]], classes: Sequence[str]) -> float | None:
    """The mean over ``classes`` of F1 of (predicted, true) pairs; a class neither predicted
    nor present is left out (its F1 is undefined), as scikit-learn's zero-division rule
    would count it otherwise."""
    scores = []
    for name in classes:
        tp = sum(p == name and t == name for p, t in pairs)
        fp = sum(p == name and t != name for p, t in pairs)
        fn = sum(p != name and t == name for p, t in pairs)
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return round(sum(scores) / len(scores), 6) if scores else None


def _scores(items: Sequence[Scored], classes: Sequence[str]) -> dict[str, Any]:
    known = [i for i in items if i.known_good is not None]
    student_hits = sum(i.student == i.known_good for i in known)
    teacher_hits = sum(i.teacher == i.known_good for i in known)
    student = student_hits / len(known) if known else None
    teacher = teacher_hits / len(known) if known else None
    return {
        "items": len(items),
        "with_record": len(known),
        "student_accuracy": None if student is None else round(student, 6),
        "student_interval": wilson(student_hits, len(known)),
        "teacher_accuracy": None if teacher is None else round(teacher, 6),
        "teacher_interval": wilson(teacher_hits, len(known)),
        "retention": round(student / teacher, 6) if student is not None and teacher else None,
        "student_macro_f1": macro_f1([(i.student, i.known_good or "") for i in known], classes),
        "teacher_macro_f1": macro_f1([(i.teacher, i.known_good or "") for i in known], classes),
        "agreement": round(sum(i.student == i.teacher for i in items) / len(items), 6)
        if items
        else None,
    }


def evaluate(
    items: Sequence[Scored],
    classes: Sequence[str],
    *,
    margin: float = DEFAULT_SLICE_MARGIN,
    min_recall: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """``overall``, ``slices`` (each slice value, and each known-good class as
    ``class=NAME``) and ``flagged``: a slice whose student accuracy is more than ``margin``
    below the overall one, and a class whose recall is below its ``min_recall``."""
    minimums = dict(min_recall or {})
    unknown = sorted(set(minimums) - set(classes))
    if unknown:
        raise ValueError(
            f"student.min_recall names {', '.join(unknown)}: not a class of the spec "
            f"({', '.join(classes)})"
        )
    groups: dict[str, list[Scored]] = defaultdict(list)
    for item in items:
        for name, value in item.slices.items():
            groups[f"{name}={value}"].append(item)
        if item.known_good is not None:
            groups[f"class={item.known_good}"].append(item)
    overall = _scores(items, classes)
    slices = {name: _scores(members, classes) for name, members in sorted(groups.items())}
    flagged = []
    aggregate = overall["student_accuracy"]
    for name, scores in slices.items():
        accuracy = scores["student_accuracy"]
        if accuracy is None:
            continue
        if aggregate is not None and accuracy < aggregate - margin:
            flagged.append(
                {
                    "slice": name,
                    "student_accuracy": accuracy,
                    "interval": scores["student_interval"],
                    "with_record": scores["with_record"],
                    "why": f"{accuracy:.1%} is more than {margin:.0%} below the overall "
                    f"{aggregate:.1%} (student.slice_margin)",
                }
            )
        cls = name.removeprefix("class=") if name.startswith("class=") else None
        if cls in minimums and accuracy < minimums[cls]:
            flagged.append(
                {
                    "slice": name,
                    "student_accuracy": accuracy,
                    "interval": scores["student_interval"],
                    "with_record": scores["with_record"],
                    "why": f"recall {accuracy:.1%} is below the {minimums[cls]:.0%} "
                    f"student.min_recall asks for {cls}",
                }
            )
    missing = sorted(c for c in minimums if f"class={c}" not in slices)
    for cls in missing:
        flagged.append(
            {
                "slice": f"class={cls}",
                "student_accuracy": None,
                "interval": None,
                "with_record": 0,
                "why": f"student.min_recall asks for {cls}, but no held-out item has that "
                f"record: its recall cannot be measured",
            }
        )
    return {"overall": overall, "slices": slices, "flagged": flagged, "slice_margin": margin}


def confusion(items: Sequence[Scored], classes: Sequence[str]) -> dict[str, Any]:
    """Counts of known-good record (rows) against the student's answer (columns), over the
    items with a record of one of ``classes``: the run's confusion plot."""
    index = {name: k for k, name in enumerate(classes)}
    matrix = [[0] * len(classes) for _ in classes]
    for item in items:
        if item.known_good in index and item.student in index:
            matrix[index[item.known_good]][index[item.student]] += 1
    return {"labels": list(classes), "matrix": matrix}


def headline(overall: Mapping[str, Any]) -> dict[str, Any]:
    """The figure to read first: the student's accuracy against the records beside the
    teacher's, and their ratio (the retention); slices are drawn by the same figure."""
    return {
        "metric": "accuracy",
        "student": overall.get("student_accuracy"),
        "teacher": overall.get("teacher_accuracy"),
        "ratio": overall.get("retention"),
        "slice_key": "student_accuracy",
    }


def scored_items(
    predicted: Sequence[str], held: Sequence[Example]
) -> tuple[list[Scored], str, str]:
    """The items evaluated by slice (the test split, else every held-out one), which split
    that is, and what they are measured against: the known-good records, or, for a spec that
    has none (moderation of live text), the teacher's labels, so a class's recall is then
    how much of what the teacher called that class the student finds."""
    tested = [(p, e) for p, e in zip(predicted, held, strict=False) if e.split == "test"]
    evaluated_on = "test" if tested else "held-out"
    pairs = tested or list(zip(predicted, held, strict=False))
    if any(e.known_good is not None for _, e in pairs):
        return (
            [Scored(p, e.label, e.known_good, e.slices) for p, e in pairs],
            evaluated_on,
            "records",
        )
    items = [Scored(p, e.label, e.label or None, e.slices) for p, e in pairs]
    return items, evaluated_on, "teacher"
