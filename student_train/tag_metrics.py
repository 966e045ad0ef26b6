"""An extraction student evaluated by slice: field-level precision, recall and F1 of its
values against the known-good entities and against the teacher's answer, the teacher's own
figures against the entities on the same items beside them.

A value is one string of one array field of the answer, compared casefolded with single
spaces (as the known-good ``set`` comparison does); the counts are summed over the items of a
slice (micro-averaged), so a tweet with five entities weighs five times one with one.
Precision and recall carry Wilson intervals from their counts; F1 carries a bootstrap
interval over the slice's items (seeded, the same on every run). Slices are the spec's slice
values (``has_entities=yes``) and each field alone (``field=people``), where recall is the
analogue of a class's recall: ``student.min_recall`` may ask a minimum of a field.

The result has the shape of ``student_train.evaluate.evaluate``'s (``overall``, ``slices``,
``flagged``, ``slice_margin``), so the card and plots read it the same way.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from student_train.evaluate import DEFAULT_SLICE_MARGIN, wilson

__all__ = ["BOOTSTRAP_ROUNDS", "TagScored", "evaluate_extraction", "extraction_headline", "fold"]

BOOTSTRAP_ROUNDS = 1_000
Answer = Mapping[str, Sequence[str]]


@dataclass(frozen=True, slots=True)
class TagScored:
    """One held-out document: the student's answer, the teacher's (None: no usable answer),
    the known-good entities per field (None: no record) and the document's slice values."""

    student: Answer
    teacher: Answer | None
    gold: Answer | None
    slices: Mapping[str, str] = field(default_factory=dict)


def fold(value: object) -> str:
    """A value as it is compared: casefolded, spaces collapsed."""
    return " ".join(str(value).casefold().split())


def _counts(got: Answer | None, want: Answer | None, fields: Sequence[str]) -> list[int]:
    # True positives, false positives, false negatives of one document over ``fields``.
    tp = fp = fn = 0
    for name in fields:
        mine = {fold(v) for v in (got or {}).get(name, ()) if fold(v)}
        theirs = {fold(v) for v in (want or {}).get(name, ()) if fold(v)}
        tp += len(mine & theirs)
        fp += len(mine - theirs)
        fn += len(theirs - mine)
    return [tp, fp, fn]


def _f1(tp: float, fp: float, fn: float) -> float | None:
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None


def _bootstrap(rows: np.ndarray, seed: int) -> list[float] | None:
    """The 95 % percentile interval of micro F1 over documents drawn with replacement."""
    if len(rows) == 0 or not rows.sum():
        return None
    draws = np.random.default_rng(seed).integers(0, len(rows), (BOOTSTRAP_ROUNDS, len(rows)))
    totals = rows[draws].sum(axis=1).astype(float)
    tp, fp, fn = totals[:, 0], totals[:, 1], totals[:, 2]
    denominator = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denominator, out=np.ones_like(tp), where=denominator > 0)
    low, high = np.quantile(f1, [0.025, 0.975])
    return [round(float(low), 6), round(float(high), 6)]


def _figures(prefix: str, rows: np.ndarray, seed: int) -> dict[str, Any]:
    tp, fp, fn = (int(v) for v in rows.sum(axis=0)) if len(rows) else (0, 0, 0)
    f1 = _f1(tp, fp, fn)
    return {
        f"{prefix}_precision": round(tp / (tp + fp), 6) if tp + fp else None,
        f"{prefix}_precision_interval": wilson(tp, tp + fp),
        f"{prefix}_recall": round(tp / (tp + fn), 6) if tp + fn else None,
        f"{prefix}_recall_interval": wilson(tp, tp + fn),
        f"{prefix}_f1": None if f1 is None else round(f1, 6),
        f"{prefix}_f1_interval": _bootstrap(rows, seed),
        f"{prefix}_counts": {"tp": tp, "fp": fp, "fn": fn},
    }


def _scores(items: Sequence[TagScored], fields: Sequence[str], seed: int) -> dict[str, Any]:
    known = [i for i in items if i.gold is not None]
    taught = [i for i in items if i.teacher is not None]

    def table(pairs: list[tuple[Answer | None, Answer | None]]) -> np.ndarray:
        return np.array([_counts(g, w, fields) for g, w in pairs], dtype=np.int64).reshape(-1, 3)

    student = _figures("student", table([(i.student, i.gold) for i in known]), seed)
    # A document the teacher did not answer counts as an empty answer: it found nothing.
    teacher = _figures("teacher", table([(i.teacher, i.gold) for i in known]), seed + 1)
    versus = _figures("vs_teacher", table([(i.student, i.teacher) for i in taught]), seed + 2)
    ratio = None
    if student["student_f1"] is not None and teacher["teacher_f1"]:
        ratio = round(student["student_f1"] / teacher["teacher_f1"], 6)
    return {
        "items": len(items),
        "with_record": len(known),
        "with_teacher": len(taught),
        **student,
        **teacher,
        "retention": ratio,
        **versus,
    }


def evaluate_extraction(
    items: Sequence[TagScored],
    fields: Sequence[str],
    *,
    margin: float = DEFAULT_SLICE_MARGIN,
    min_recall: Mapping[str, float] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """``overall``, ``slices`` (each slice value, each field as ``field=NAME``) and
    ``flagged``: a slice whose student F1 is more than ``margin`` below the overall one, a
    field whose recall is below its ``min_recall``. Against the known-good entities where the
    held-out documents have them, else against the teacher (``evaluated_against``)."""
    minimums = dict(min_recall or {})
    unknown = sorted(set(minimums) - set(fields))
    if unknown:
        raise ValueError(
            f"student.min_recall names {', '.join(unknown)}: not an extracted field of the "
            f"spec ({', '.join(fields)})"
        )
    against = "records" if any(i.gold is not None for i in items) else "teacher"
    groups: dict[str, list[TagScored]] = defaultdict(list)
    for item in items:
        for name, value in item.slices.items():
            groups[f"{name}={value}"].append(item)
    overall = _scores(items, fields, seed)
    slices = {name: _scores(members, fields, seed) for name, members in sorted(groups.items())}
    for name in fields:
        slices[f"field={name}"] = _scores(items, [name], seed)
    key = _key(against)
    return {
        "overall": overall,
        "slices": slices,
        "flagged": _flagged(overall, slices, key, margin, minimums),
        "slice_margin": margin,
        "evaluated_against": against,
    }


def _key(against: str) -> str:
    return "student" if against == "records" else "vs_teacher"


def _flagged(
    overall: Mapping[str, Any],
    slices: Mapping[str, Mapping[str, Any]],
    key: str,
    margin: float,
    minimums: Mapping[str, float],
) -> list[dict[str, Any]]:
    aggregate = overall[f"{key}_f1"]
    size = "with_record" if key == "student" else "with_teacher"
    flagged = []
    for name, scores in slices.items():
        f1 = scores[f"{key}_f1"]
        if f1 is not None and aggregate is not None and f1 < aggregate - margin:
            flagged.append(
                {
                    "slice": name,
                    f"{key}_f1": f1,
                    "interval": scores[f"{key}_f1_interval"],
                    size: scores[size],
                    "why": f"field F1 {f1:.3f} is more than {margin:.3f} below the overall "
                    f"{aggregate:.3f} (student.slice_margin)",
                }
            )
        wanted = minimums.get(name.removeprefix("field=")) if name.startswith("field=") else None
        recall = scores[f"{key}_recall"]
        if wanted is not None and (recall is None or recall < wanted):
            shown = "not measurable (no value held out)" if recall is None else f"{recall:.1%}"
            flagged.append(
                {
                    "slice": name,
                    f"{key}_recall": recall,
                    "interval": scores[f"{key}_recall_interval"],
                    size: scores[size],
                    "why": f"recall {shown} is below the {wanted:.0%} student.min_recall "
                    f"asks for {name.removeprefix('field=')}",
                }
            )
    return flagged


def extraction_headline(overall: Mapping[str, Any], against: str) -> dict[str, Any]:
    """The figure to read first: the student's field F1 against the records beside the
    teacher's and their ratio; without records, its F1 against the teacher."""
    key = _key(against)
    return {
        "metric": "field_f1" if against == "records" else "field_f1 vs teacher",
        "student": overall.get(f"{key}_f1"),
        "teacher": overall.get("teacher_f1") if against == "records" else None,
        "ratio": overall.get("retention") if against == "records" else None,
        "slice_key": f"{key}_f1",
    }
