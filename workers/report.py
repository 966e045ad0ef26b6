"""What the filter kept and refused, by slice and class, measured against known-good records.

Live samples have no known-good record, so the report also measures the filter without one:
on the withheld share of items (``checks.withhold_share``) the checks never saw the record,
so the accuracy of the labels they accepted there is what to expect on live traffic.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from storage.models import Verdict
from storage.training import ReportRow
from workers.calibration import (
    CLASS_MIN_ITEMS,
    Calibration,
    Outcome,
    estimate_kept,
    wilson,
)
from workers.checks import field_matches
from workers.compare import compare_ranking, ndcg_at_k, top1_agreement
from workers.spec import Spec, is_withheld

__all__ = ["build_report"]


@dataclass(slots=True)
class _Tally:
    """Counts for one group of labels."""

    labels: int = 0
    by_verdict: Counter[str] = field(default_factory=Counter)
    by_reason: Counter[str] = field(default_factory=Counter)
    compared: int = 0
    agree: int = 0
    accepted_compared: int = 0
    accepted_agree: int = 0

    def add(self, row: ReportRow, agrees: bool | None) -> None:
        self.labels += 1
        self.by_verdict[str(row.verdict)] += 1
        self.by_reason.update(
            str(r).split(":")[0] if str(r).startswith("schema:") else str(r) for r in row.reasons
        )
        if agrees is not None:
            self.compared += 1
            self.agree += int(agrees)
            if row.verdict == Verdict.ACCEPTED:
                self.accepted_compared += 1
                self.accepted_agree += int(agrees)

    def as_dict(self) -> dict[str, Any]:
        return {
            "labels": self.labels,
            "by_verdict": dict(self.by_verdict),
            "by_reason": dict(self.by_reason),
            "with_known_good": self.compared,
            "teacher_agreement": _ratio(self.agree, self.compared),
            "accepted_accuracy": _ratio(self.accepted_agree, self.accepted_compared),
        }


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _agrees(spec: Spec, row: ReportRow) -> bool | None:
    """Whether the teacher's answer matches the known-good record on every compared field."""
    if not row.known_good or row.output is None:
        return None if not row.known_good else False
    from workers.review import record_rules  # a spec without records: its review decisions'

    fields = {n: r for n, r in record_rules(spec).items() if n in row.known_good}
    if not fields:
        return None
    return all(field_matches(row.output.get(n), row.known_good[n], r) for n, r in fields.items())


@dataclass(slots=True)
class _FieldScore:
    """Micro precision and recall of list fields (extracted entities) against the record."""

    counts: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0, 0]))

    def add(self, name: str, value: Any, reference: Any) -> None:
        got, want = _folded(value), _folded(reference)
        tally = self.counts[name]
        tally[0], tally[1], tally[2] = (
            tally[0] + len(got & want),
            tally[1] + len(got),
            tally[2] + len(want),
        )

    def as_dict(self) -> dict[str, Any]:
        scores = {name: _pr(*tally) for name, tally in sorted(self.counts.items())}
        if self.counts:
            scores["all"] = _pr(*(sum(t[i] for t in self.counts.values()) for i in range(3)))
        return scores


def _folded(value: Any) -> set[str]:
    items = value if isinstance(value, list) else [] if value is None else [value]
    return {str(v).strip().casefold() for v in items if str(v).strip()}


def _pr(true_positive: int, predicted: int, gold: int) -> dict[str, Any]:
    return {
        "precision": _ratio(true_positive, predicted),
        "recall": _ratio(true_positive, gold),
        "predicted": predicted,
        "gold": gold,
    }


def _field_scores(spec: Spec, rows: list[ReportRow], share: float) -> dict[str, Any]:
    """Per known-good list field: precision/recall of accepted labels and of all raw labels."""
    accepted, raw = _FieldScore(), _FieldScore()
    list_fields = [n for n, r in spec.known_good.items() if r.get("compare") == "set"]
    for row in rows:
        if not list_fields or not row.known_good or row.output is None:
            continue
        if is_withheld(row.external_id, share):
            continue
        for name in list_fields:
            if name in row.known_good:
                raw.add(name, row.output.get(name), row.known_good[name])
                if row.verdict == Verdict.ACCEPTED:
                    accepted.add(name, row.output.get(name), row.known_good[name])
    return {"accepted": accepted.as_dict(), "raw": raw.as_dict()} if list_fields else {}


@dataclass(slots=True)
class _RankingScore:
    """Kendall's tau, top-1 agreement and NDCG@k of orderings against the known-good order."""

    k: int
    taus: list[float] = field(default_factory=list)
    top1: int = 0
    ndcgs: list[float] = field(default_factory=list)

    def add(self, order: list[str], reference: Any) -> None:
        reference_order, relevance = _reference(reference, self.k)
        self.taus.append(compare_ranking(order, reference_order, relevance, {}).score or 0.0)
        self.top1 += int(top1_agreement(order, reference_order))
        self.ndcgs.append(ndcg_at_k(order, relevance, self.k))

    def as_dict(self) -> dict[str, Any]:
        count = len(self.taus)
        return {
            "count": count,
            "mean_tau": _mean(self.taus),
            "top1_agreement": _ratio(self.top1, count),
            "mean_ndcg": _mean(self.ndcgs),
            "k": self.k,
        }


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def _reference(reference: Any, k: int) -> tuple[list[str], dict[str, float]]:
    """The known-good order and its graded relevance, from either form the record takes.

    Graded relevance (``{id: grade}``) is read best first with ties by id, so the order does
    not depend on how the database keeps JSON keys. A bare order grades its top k as k, k-1,
    ..., 1, as :func:`workers.compare.compare_ranking` does for NDCG.
    """
    if isinstance(reference, dict):
        grades = {str(key): float(grade) for key, grade in reference.items()}
        return sorted(grades, key=lambda key: (-grades[key], key)), grades
    order = list(dict.fromkeys(str(item) for item in reference or []))
    return order, {item: float(k - i) for i, item in enumerate(order[:k])}


def _ranking_scores(spec: Spec, rows: list[ReportRow], share: float) -> dict[str, Any]:
    """Per known-good ranking field: order quality of accepted labels and of all raw labels.

    Like ``fields``, only items whose record the checks saw count, and only answers that
    give an ordering (a list) for the field.
    """
    rules = {n: r for n, r in spec.known_good.items() if r.get("compare") == "ranking"}
    if not rules:
        return {}
    accepted = {name: _RankingScore(int(rule.get("k", 5))) for name, rule in rules.items()}
    raw = {name: _RankingScore(int(rule.get("k", 5))) for name, rule in rules.items()}
    for row in rows:
        if not row.known_good or row.output is None:
            continue
        if is_withheld(row.external_id, share):
            continue
        for name in rules:
            value = row.output.get(name)
            if name not in row.known_good or not isinstance(value, list):
                continue
            order = [str(v) for v in value]
            raw[name].add(order, row.known_good[name])
            if row.verdict == Verdict.ACCEPTED:
                accepted[name].add(order, row.known_good[name])
    return {
        "accepted": {name: score.as_dict() for name, score in accepted.items()},
        "raw": {name: score.as_dict() for name, score in raw.items()},
    }


def _groups(spec: Spec, row: ReportRow) -> Iterable[str]:
    for name in spec.slice_fields:
        yield f"{name}={row.slices.get(name)}"
    if spec.kind == "classification" and row.output is not None:
        yield f"class={row.output.get('label')}"


def _calibrated(
    spec: Spec, rows: list[ReportRow], calibration: Calibration | None
) -> dict[str, Any]:
    """Under ``checks.target_accuracy``: the estimated accuracy of the accepted labels of
    items without a record the checks saw (from the labels with one), with its interval and
    the coverage; on the withheld share, the same estimate beside what the records measure."""
    share = float(spec.checks["withhold_share"])
    seen: list[Outcome] = []
    live: list[tuple[float, str | None, bool]] = []  # accepted labels without a seen record
    held: list[tuple[float, str | None, bool]] = []
    counts = Counter[str]()
    field_name = spec.class_field
    for row in rows:
        withheld = is_withheld(row.external_id, share)
        agrees = _agrees(spec, row)
        score = row.confidence if row.confidence is not None else row.agreement
        cls = (row.output or {}).get(field_name) if field_name else None
        cls = cls if isinstance(cls, str) else None
        if agrees is not None and not withheld:
            if score is not None and row.output is not None:
                seen.append(Outcome(float(score), agrees, cls))
            continue
        counts["labels"] += 1
        counts["withheld"] += int(withheld and agrees is not None)
        if row.verdict != Verdict.ACCEPTED or score is None:
            continue
        live.append((float(score), cls, bool(agrees)))
        if withheld and agrees is not None:
            held.append((float(score), cls, agrees))
    per_class = CLASS_MIN_ITEMS if spec.checks["calibration_per_class"] else None

    def estimated(kept: list[tuple[float, str | None, bool]], total: int) -> dict[str, Any]:
        found = estimate_kept(seen, [(s, c) for s, c, _ in kept], total, class_min_items=per_class)
        return {
            "coverage": round(found.coverage, 6),
            "accepted": found.accepted,
            "estimated_accuracy": found.accuracy,
            "estimated_interval": [found.lower, found.upper],
        }

    hits = sum(right for _, _, right in held)
    return {
        "target": spec.target_accuracy,
        "calibration": None
        if calibration is None
        else {
            "id": calibration.id,
            "items": calibration.items,
            "threshold": calibration.threshold,
            "classes": {k: v["threshold"] for k, v in calibration.classes.items()},
            "final": calibration.final,
        },
        "without_record": {"labels": counts["labels"], **estimated(live, counts["labels"])},
        "withheld": {
            "labels": counts["withheld"],
            **estimated(held, counts["withheld"]),
            "measured_accuracy": _ratio(hits, len(held)),
            "measured_interval": [round(b, 4) for b in wilson(hits, len(held))] if held else None,
        },
    }


def build_report(
    spec: Spec, rows: list[ReportRow], calibration: Calibration | None = None
) -> dict[str, Any]:
    """The report as one JSON-ready object: ``overall``, ``slices`` and ``withheld`` (and
    ``calibrated`` under ``checks.target_accuracy``; ``calibration`` is the latest fit)."""
    share = float(spec.checks["withhold_share"])
    overall, withheld = _Tally(), _Tally()
    slices: dict[str, _Tally] = defaultdict(_Tally)
    for row in rows:
        agrees = _agrees(spec, row)
        if is_withheld(row.external_id, share):
            withheld.add(row, agrees)
            continue
        overall.add(row, agrees)
        for group in _groups(spec, row):
            slices[group].add(row, agrees)
    held = withheld.as_dict()
    ranking = _ranking_scores(spec, rows, share)
    return {
        "spec": spec.name,
        "version": spec.version,
        "overall": {
            **overall.as_dict(),
            "fields": _field_scores(spec, rows, share),
            # Only specs with a ranking field get the key, so other reports keep their shape.
            **({"ranking": ranking} if ranking else {}),
        },
        "slices": {name: tally.as_dict() for name, tally in sorted(slices.items())},
        "withheld": {
            "share": share,
            "labels": withheld.labels,
            "accepted_share": _ratio(withheld.by_verdict[Verdict.ACCEPTED.value], withheld.labels),
            "accepted_accuracy": held["accepted_accuracy"],
            "raw_accuracy": held["teacher_agreement"],
            "by_reason": held["by_reason"],
        },
        **(
            {"calibrated": _calibrated(spec, rows, calibration)}
            if spec.target_accuracy is not None
            else {}
        ),
    }
