"""Review tasks a person decides: records that look wrong (``suspect_record``), and a stratified
sample of labels without a record (``sample``) whose decisions become known-good records.

Both are about the records the calibration learns from (``workers.calibration``): a wrong record
teaches it that a right label is wrong, and a spec with no records at all (moderation) has
nothing to learn from until a person decides a sample.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from schemas.errors import ConfigError
from storage.datasets import stable_unit
from storage.models import ReviewReason, Verdict
from storage.review import NewTask, SampleRow, TaskRow
from workers.calibration import wilson

__all__ = [
    "CONFIDENCE_BINS",
    "Decision",
    "decide",
    "decisions_needed",
    "progress",
    "record_rules",
    "stratified_sample",
]

CONFIDENCE_BINS = 4  # a class's labels are cut into this many equal-count confidence bands
HALF_WIDTH = 0.02  # "tight": a 95 % interval of ±2 points on the teacher's accuracy


def record_rules(spec: Any) -> dict[str, dict[str, Any]]:
    """How a decided record is compared with a label: the spec's ``known_good`` rules, or,
    for a spec without records, its class (classification) or every answer field, exactly."""
    if spec.known_good:
        return {name: dict(rule) for name, rule in spec.known_good.items()}
    if spec.class_field is not None:
        return {spec.class_field: {"compare": "exact"}}
    props = spec.output_schema.get("properties", {})
    return {name: {"compare": "exact"} for name in props if name != "confidence"}


def stratified_sample(rows: Sequence[SampleRow], n: int, field: str | None) -> list[NewTask]:
    """``n`` of ``rows`` (fewer if there are fewer) to put before a person, stratified by
    predicted class and confidence band. Classes get shares by the square root of their size,
    so a rare class is over-represented against a proportional draw (a class of 1 % of labels
    gets about 10 % of a sample over 10 equal classes' worth); within a class the draw is
    proportional across its confidence bands, so its confidences keep their spread. The draw
    is a stable hash of the ids: the same labels give the same sample. Each task carries how
    many labels it stands for (``weight``)."""
    if n <= 0:
        raise ConfigError(f"--n {n}: ask for at least one label to review")
    by_class: dict[str, list[SampleRow]] = defaultdict(list)
    for row in rows:
        cls = row.output.get(field) if field is not None else None
        by_class[str(cls) if cls is not None else "-"].append(row)
    quota = _shares({c: math.sqrt(len(r)) for c, r in by_class.items()}, n, by_class)
    tasks: list[NewTask] = []
    for cls, members in sorted(by_class.items()):
        members.sort(key=lambda r: (r.confidence, r.external_id))
        bands = [
            members[k * len(members) // CONFIDENCE_BINS : (k + 1) * len(members) // CONFIDENCE_BINS]
            for k in range(CONFIDENCE_BINS)
        ]
        bands = [b for b in bands if b]
        per_band = _shares(
            {str(k): float(len(b)) for k, b in enumerate(bands)},
            quota[cls],
            {str(k): b for k, b in enumerate(bands)},
        )
        for k, band in enumerate(bands):
            take = per_band[str(k)]
            if take == 0:
                continue
            drawn = sorted(band, key=lambda r: stable_unit(r.external_id, "review-sample"))[:take]
            stratum = f"class={cls}|confidence={band[0].confidence:.2f}-{band[-1].confidence:.2f}"
            for row in drawn:
                tasks.append(
                    NewTask(
                        item_id=row.item_id,
                        rank=1.0 - stable_unit(row.external_id, "review-order"),
                        proposed=dict(row.output),
                        stratum=stratum,
                        weight=round(len(band) / take, 6),
                        details={"confidence": row.confidence},
                    )
                )
    return tasks


def _shares(
    weights: Mapping[str, float], n: int, members: Mapping[str, Sequence[Any]]
) -> dict[str, int]:
    """``n`` split by ``weights`` (largest remainders), no stratum given more than it has;
    what a full stratum cannot take goes to the others."""
    quota = {k: 0 for k in weights}
    left = min(n, sum(len(m) for m in members.values()))
    while left > 0:
        open_ = {k: w for k, w in weights.items() if quota[k] < len(members[k]) and w > 0}
        if not open_:
            break
        total = sum(open_.values())
        exact = {k: left * w / total for k, w in open_.items()}
        given = {k: min(int(v), len(members[k]) - quota[k]) for k, v in exact.items()}
        if sum(given.values()) == 0:  # fewer left than strata: the largest remainders
            k = max(open_, key=lambda j: (exact[j] - int(exact[j]), j))
            given = {k: 1}
        for k, g in given.items():
            quota[k] += g
        left -= sum(given.values())
    return quota


@dataclass(frozen=True, slots=True)
class Decision:
    """What resolving a task writes: the decision's name, the item's record after it,
    whether the label now agrees with that record (None: there is no label to compare), and
    the verdict the label moves to: accepted when it now agrees and was held back only by its
    record (or is a confirmed sample), rejected when it disagrees."""

    decision: str
    record: dict[str, Any] | None
    label_agrees: bool | None
    label_verdict: Verdict | None = None  # where the label goes (None: it stays)


def decide(spec: Any, row: TaskRow, *, accept: bool, record: dict[str, Any] | None) -> Decision:
    """A person's decision on one task. For a suspect record, ``accept`` means the teacher
    was right: the record becomes the suggestion (or ``record``); reject keeps it. For a
    sampled label, accept means the teacher's answer is right and becomes the record; reject
    needs the right answer (``record``), except in a two-class spec, where it is the other."""
    from workers.checks import field_matches

    rules = record_rules(spec)
    if record is not None:
        unknown = sorted(set(record) - set(rules))
        if unknown or not record:
            raise ConfigError(
                f"--record {record}: give the fields a record holds ({', '.join(sorted(rules))})"
            )
        if spec.class_field in record and record[spec.class_field] not in spec.label_names:
            raise ConfigError(
                f"--record: {record[spec.class_field]!r} is not one of the spec's classes "
                f"({', '.join(spec.label_names)})"
            )
    task, item, label = row.task, row.item, row.label
    output = label.output if label is not None and isinstance(label.output, dict) else None
    reason = task.reason.value
    if reason == "suspect_record":
        after: dict[str, Any] | None
        if accept:
            after = {**(item.known_good or {}), **(record or task.proposed)}
            name = "corrected"
        elif record is not None:
            raise ConfigError("--reject keeps the record as it is: leave out --record")
        else:
            after, name = item.known_good, "kept"
    else:
        if accept:
            if output is None:
                raise ConfigError(f"item {item.external_id!r} has no parsed answer to confirm")
            if record is not None:
                raise ConfigError("--accept takes the teacher's answer: leave out --record")
            after = {name_: output.get(name_) for name_ in rules}
            name = "confirmed"
        else:
            after = record or _other_class(spec, output)
            name = "corrected"
    agrees = None
    if output is not None and after:
        compared = {k: r for k, r in rules.items() if k in after}
        agrees = all(field_matches(output.get(k), after[k], r) for k, r in compared.items())
    return Decision(name, after, agrees, _label_verdict(row, agrees))


def _label_verdict(row: TaskRow, agrees: bool | None) -> Verdict | None:
    label = row.label
    if label is None or agrees is None:
        return None
    if not agrees:
        return Verdict.REJECTED
    problems = [
        r for r in label.reasons if not str(r).startswith(("known_good_mismatch:", "reviewed:"))
    ]
    if row.task.reason == ReviewReason.SAMPLE or not problems:
        return Verdict.ACCEPTED
    return None


def _other_class(spec: Any, output: dict[str, Any] | None) -> dict[str, Any]:
    names = spec.label_names
    said = (output or {}).get(spec.class_field) if spec.class_field else None
    if spec.class_field is not None and len(names) == 2 and said in names:
        return {spec.class_field: names[1 - names.index(said)]}
    fields = ", ".join(sorted(record_rules(spec)))
    raise ConfigError(
        f"--reject says the teacher was wrong: give the right answer with --record "
        f"'{{...}}' ({fields}), so the decision can become a known-good record"
    )


def decisions_needed(right: int, decided: int, half_width: float = HALF_WIDTH) -> int:
    """How many more decisions would bring the 95 % interval on the teacher's accuracy to
    ±``half_width``, at the accuracy seen so far (0 when it is there already)."""
    p = right / decided if decided else 0.5
    p = min(max(p, 0.02), 0.98)  # a sample all one way still needs some to be sure
    total = decided
    while _half(p, total) > half_width:
        total = max(total + 1, math.ceil(total * 1.05))
    # the least total that reaches it, searched back from the step that passed
    while total > decided and _half(p, total - 1) <= half_width:
        total -= 1
    return max(0, total - decided)


def _half(p: float, n: int) -> float:
    if n == 0:
        return 1.0
    lo, hi = wilson(round(p * n), n)
    return (hi - lo) / 2


def progress(
    spec: Any, waiting: int, decided: int, right: int, *, with_record: int
) -> dict[str, Any]:
    """Where a spec's sample review stands, and what more decisions would buy: the interval
    on the teacher's accuracy, and how many more reach ±2 points and a calibration."""
    lo, hi = wilson(right, decided)
    minimum = int(spec.checks["calibration_min_items"])
    return {
        "waiting": waiting,
        "decided": decided,
        "teacher_right": right,
        "accuracy": round(right / decided, 6) if decided else None,
        "interval": [round(lo, 6), round(hi, 6)] if decided else None,
        "more_for_2_points": decisions_needed(right, decided),
        "records": with_record,
        "more_for_calibration": max(0, minimum - with_record),
    }
