"""How far a teacher's signal (its stated confidence, its agreement) can be trusted, learned on
the items that have a known-good record and applied to the ones that do not.

- :func:`isotonic` fits P(label right | score) as a non-decreasing step function (pool
  adjacent violators), so a score of 0.8 means what the records say it means.
- :func:`curve` is coverage against accuracy: for each threshold, the share of labels at or
  above it and how many of those agree with their record, with a Wilson interval.
- :func:`threshold_for` picks the lowest threshold whose accuracy reaches a target *with its
  lower confidence bound*, not its point estimate: on 40 calibration items, 39 right is not
  yet evidence of 97 %.
- :func:`estimate` says how accurate the labels above a threshold are likely to be on items
  without a record, from the fitted curve, with an interval from refitting on resamples of
  the calibration items.

Pure Python: the calibration sets are thousands of items, not millions.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from storage.stats import Z_ONE_SIDED_95, wilson

__all__ = [
    "Calibration",
    "CurvePoint",
    "Estimate",
    "IsotonicFit",
    "Outcome",
    "calibrate_spec",
    "curve",
    "estimate",
    "estimate_kept",
    "fit_calibration",
    "isotonic",
    "outcomes",
    "plot_curve",
    "threshold_for",
    "wilson",
    "withheld_measure",
]


@dataclass(frozen=True, slots=True)
class IsotonicFit:
    """A non-decreasing step function: ``values[k]`` for scores from ``edges[k]`` up."""

    edges: tuple[float, ...]
    values: tuple[float, ...]

    def predict(self, score: float) -> float:
        k = bisect.bisect_right(self.edges, score) - 1
        return self.values[max(k, 0)]

    def as_dict(self) -> dict[str, Any]:
        return {"edges": list(self.edges), "values": list(self.values)}


def isotonic(scores: Sequence[float], correct: Sequence[bool]) -> IsotonicFit:
    """P(correct | score) by pool adjacent violators over the scores in increasing order."""
    if len(scores) != len(correct) or not scores:
        raise ValueError("isotonic needs as many outcomes as scores, and at least one")
    pairs = sorted(zip(scores, correct, strict=True))
    # Blocks of equal scores first: ties share one value.
    blocks: list[list[float]] = []  # [lowest score, sum of outcomes, count]
    for score, hit in pairs:
        if blocks and blocks[-1][0] == score:
            blocks[-1][1] += hit
            blocks[-1][2] += 1
        else:
            blocks.append([score, float(hit), 1.0])
    merged: list[list[float]] = []
    for block in blocks:
        merged.append(block)
        while len(merged) > 1 and merged[-2][1] / merged[-2][2] > merged[-1][1] / merged[-1][2]:
            last = merged.pop()
            merged[-1][1] += last[1]
            merged[-1][2] += last[2]
    return IsotonicFit(
        edges=tuple(b[0] for b in merged), values=tuple(round(b[1] / b[2], 6) for b in merged)
    )


@dataclass(frozen=True, slots=True)
class CurvePoint:
    """The labels whose score is at least ``threshold``: their share and their accuracy."""

    threshold: float
    coverage: float
    accepted: int
    accuracy: float
    lower: float  # one-sided lower bound (95 %)
    upper: float  # two-sided upper bound (95 %)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def curve(
    scores: Sequence[float], correct: Sequence[bool], *, points: int | None = None
) -> list[CurvePoint]:
    """Coverage against accuracy, from the highest threshold down: one point per distinct
    score, or about ``points`` of them evenly spread over coverage."""
    if len(scores) != len(correct):
        raise ValueError("curve needs as many outcomes as scores")
    pairs = sorted(zip(scores, correct, strict=True), key=lambda p: -p[0])
    total = len(pairs)
    out: list[CurvePoint] = []
    hits = 0
    for k, (score, hit) in enumerate(pairs):
        hits += hit
        if k + 1 < total and pairs[k + 1][0] == score:
            continue  # a threshold takes every label with that score
        n = k + 1
        lower = wilson(hits, n, Z_ONE_SIDED_95)[0]
        upper = wilson(hits, n)[1]
        out.append(CurvePoint(score, n / total, n, hits / n, lower, upper))
    if points is not None and len(out) > points:
        step = len(out) / points
        out = [out[min(len(out) - 1, math.ceil((i + 1) * step) - 1)] for i in range(points)]
    return out


def threshold_for(
    target: float,
    scores: Sequence[float],
    correct: Sequence[bool],
    *,
    min_items: int = 30,
) -> CurvePoint | None:
    """The lowest threshold (the most coverage) whose accepted labels reach ``target``
    accuracy at the 95 % lower bound, with at least ``min_items`` of them; None if none does."""
    if not 0.0 < target < 1.0:
        raise ValueError(f"target accuracy {target}: a share between 0 and 1")
    best = None
    for point in curve(scores, correct):
        if point.accepted >= min_items and point.lower >= target:
            best = point
    return best


@dataclass(frozen=True, slots=True)
class Estimate:
    """What the labels at or above a threshold are likely to be worth on items without a
    record: their share and their accuracy, with a 95 % interval."""

    coverage: float
    accepted: int
    accuracy: float | None
    lower: float | None
    upper: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def estimate(
    threshold: float,
    calibration: tuple[Sequence[float], Sequence[bool]],
    live: Sequence[float],
    *,
    resamples: int = 200,
    seed: int = 0,
) -> Estimate:
    """The expected accuracy of the live labels at or above ``threshold``: the mean of the
    isotonic fit over them, its interval from refitting on bootstrap resamples of the
    calibration items (the uncertainty of what the records say)."""
    scores, correct = calibration
    seen = [Outcome(s, c, None) for s, c in zip(scores, correct, strict=True)]
    kept = [(s, None) for s in live if s >= threshold]
    return estimate_kept(seen, kept, len(live), resamples=resamples, seed=seed)


@dataclass(frozen=True, slots=True)
class Outcome:
    """One label with a known-good record: the teacher's signal, whether the label agrees
    with the record, and its class (classification specs; None otherwise)."""

    score: float
    correct: bool
    cls: str | None = None


# A class gets a threshold (and a fit) of its own from this many labels with a record.
CLASS_MIN_ITEMS = 200


def estimate_kept(
    seen: Sequence[Outcome],
    kept: Sequence[tuple[float, str | None]],
    total: int,
    *,
    class_min_items: int | None = CLASS_MIN_ITEMS,
    resamples: int = 200,
    seed: int = 0,
) -> Estimate:
    """The expected accuracy of ``kept`` labels without a record (score, class), ``total``
    labels in all: the mean of P(right | score) fitted on ``seen`` (per class where a class
    has ``class_min_items``), its 95 % interval from refitting on bootstrap resamples."""
    coverage = len(kept) / total if total else 0.0
    if not kept or not seen:
        return Estimate(coverage, len(kept), None, None, None)
    point = _mean_fit(_fits(seen, class_min_items), kept)
    rng = random.Random(seed)
    draws = []
    for _ in range(resamples):
        sample = [seen[rng.randrange(len(seen))] for _ in seen]
        draws.append(_mean_fit(_fits(sample, class_min_items), kept))
    draws.sort()
    lower = draws[int(0.025 * (resamples - 1))]
    upper = draws[math.ceil(0.975 * (resamples - 1))]
    return Estimate(coverage, len(kept), round(point, 6), round(lower, 6), round(upper, 6))


def _fits(
    seen: Sequence[Outcome], class_min_items: int | None
) -> tuple[IsotonicFit, dict[str | None, IsotonicFit]]:
    """The overall fit, and one per class with enough outcomes."""
    overall = isotonic([o.score for o in seen], [o.correct for o in seen])
    own: dict[str | None, IsotonicFit] = {}
    if class_min_items is not None:
        for cls, members in _by_class(seen).items():
            if cls is not None and len(members) >= class_min_items:
                own[cls] = isotonic([o.score for o in members], [o.correct for o in members])
    return overall, own


def _mean_fit(
    fits: tuple[IsotonicFit, dict[str | None, IsotonicFit]] | IsotonicFit,
    kept: Sequence[tuple[float, str | None]],
) -> float:
    overall, own = fits if isinstance(fits, tuple) else (fits, {})
    return sum(own.get(cls, overall).predict(score) for score, cls in kept) / len(kept)


def _by_class(seen: Sequence[Outcome]) -> dict[str | None, list[Outcome]]:
    groups: dict[str | None, list[Outcome]] = {}
    for outcome in seen:
        groups.setdefault(outcome.cls, []).append(outcome)
    return groups


@dataclass(frozen=True, slots=True)
class Calibration:
    """The thresholds a target accuracy needs, as labeling applies them: one overall and one
    per class that has enough labels with a record (a class the overall threshold would
    let through at a lower accuracy gets a stricter one, an easy class a looser one).

    A threshold of None: the records do not (yet) show any threshold reaching the target.
    ``final``: no item with a record was still to be labeled when it was fitted."""

    target: float
    items: int
    accuracy: float | None
    threshold: float | None
    point: dict[str, Any] | None
    classes: dict[str, dict[str, Any]]
    final: bool
    signal: str = "confidence"
    id: int | None = None

    def threshold_of(self, cls: str | None) -> float | None:
        """The threshold a label of class ``cls`` is held to."""
        own = self.classes.get(cls) if cls is not None else None
        return self.threshold if own is None else own["threshold"]

    def fit_json(self) -> dict[str, Any]:
        """What the ``calibrations.fit`` column keeps."""
        return {"point": self.point, "classes": self.classes}

    def describe(self, cls: str | None) -> str:
        """Where a class's threshold comes from, in words, for a rejection's message."""
        own = self.classes.get(cls) if cls is not None else None
        if own is not None:
            return f"{own['items']} labels of class {cls!r} with a record"
        return f"{self.items} labels with a record"


def fit_calibration(
    seen: Sequence[Outcome],
    target: float,
    *,
    min_items: int = 30,
    class_min_items: int | None = CLASS_MIN_ITEMS,
    final: bool = False,
) -> Calibration:
    """The lowest thresholds whose accepted labels reach ``target`` at the 95 % lower bound:
    overall, and for each class with ``class_min_items`` outcomes (None: no class thresholds)."""
    chosen = threshold_for(
        target, [o.score for o in seen], [o.correct for o in seen], min_items=min_items
    )
    classes: dict[str, dict[str, Any]] = {}
    if class_min_items is not None:
        for cls, members in sorted(_by_class(seen).items(), key=lambda kv: str(kv[0])):
            if cls is None or len(members) < class_min_items:
                continue
            own = threshold_for(
                target,
                [o.score for o in members],
                [o.correct for o in members],
                min_items=min_items,
            )
            classes[cls] = {
                "items": len(members),
                "accuracy": round(sum(o.correct for o in members) / len(members), 6),
                "threshold": None if own is None else own.threshold,
                "point": None if own is None else own.as_dict(),
            }
    return Calibration(
        target=target,
        items=len(seen),
        accuracy=round(sum(o.correct for o in seen) / len(seen), 6) if seen else None,
        threshold=None if chosen is None else chosen.threshold,
        point=None if chosen is None else chosen.as_dict(),
        classes=classes,
        final=final,
    )


def outcomes(spec: Any, rows: Sequence[Any]) -> tuple[list[Outcome], list[Outcome]]:
    """The labels with a record, split into those whose record the checks saw and those on
    the withheld share, each compared with its record field by field as the checks compare
    (``rows``: ``storage.training.CalibrationRow``). Labels without a signal are left out."""
    from workers.checks import field_matches
    from workers.review import record_rules
    from workers.spec import is_withheld

    share = float(spec.checks["withhold_share"])
    rules = record_rules(spec)  # a spec without records has those its review decisions wrote
    field = spec.class_field
    seen: list[Outcome] = []
    held: list[Outcome] = []
    for row in rows:
        score = row.confidence if row.confidence is not None else row.agreement
        record = row.known_good or {}
        compared = {name: rule for name, rule in rules.items() if name in record}
        if score is None or row.output is None or not compared:
            continue
        correct = all(
            field_matches(row.output.get(name), record[name], rule)
            for name, rule in compared.items()
        )
        cls = row.output.get(field) if field is not None else None
        outcome = Outcome(float(score), correct, cls if isinstance(cls, str) else None)
        (held if is_withheld(row.external_id, share) else seen).append(outcome)
    return seen, held


def calibrate_spec(
    spec: Any,
    rows: Sequence[Any],
    *,
    target: float | None = None,
    points: int = 10,
    png: Any = None,
) -> dict[str, Any]:
    """A spec's labels against their records: the curve of the teacher's confidence on the
    items whose record the checks saw, the thresholds a ``target`` needs (overall and per
    class), and, on the withheld share (the checks never saw those records), the estimate
    next to the measurement, so the estimate can be judged; with ``png``, the curve drawn
    there. ``rows`` are ``storage.training.CalibrationRow``."""
    from schemas.errors import ConfigError

    seen, held = outcomes(spec, rows)
    if not seen:
        raise ConfigError(
            f"no labels of {spec.name} v{spec.version} have both a confidence and a "
            f"known-good record the checks saw: nothing to calibrate on yet"
        )
    scores, right = [o.score for o in seen], [o.correct for o in seen]
    fitted = fit_calibration(seen, target) if target is not None else None
    result: dict[str, Any] = {
        "spec": spec.name,
        "version": spec.version,
        "kind": spec.kind,
        "signal": "confidence",
        "calibration_items": len(seen),
        "raw_accuracy": round(sum(right) / len(right), 6),
        "curve": [p.as_dict() for p in curve(scores, right, points=points)],
        "target": target,
        "threshold": None if fitted is None else fitted.point,
        "classes": {} if fitted is None else fitted.classes,
        "withheld": withheld_measure(fitted, seen, held),
    }
    if png is not None:
        plot_curve(result, [p.as_dict() for p in curve(scores, right, points=200)], png)
        result["png"] = str(png)
    return result


def withheld_measure(
    fitted: Calibration | None, seen: Sequence[Outcome], held: Sequence[Outcome]
) -> dict[str, Any]:
    """On the withheld share: the raw teacher's accuracy and, with thresholds, the estimate
    of the labels they keep next to what their records measure."""
    out: dict[str, Any] = {
        "items": len(held),
        "raw_accuracy": round(sum(o.correct for o in held) / len(held), 6) if held else None,
    }
    if fitted is None or not held:
        return out
    kept = [o for o in held if _passes(fitted, o.score, o.cls)]
    out["estimated"] = estimate_kept(seen, [(o.score, o.cls) for o in kept], len(held)).as_dict()
    hits = sum(o.correct for o in kept)
    out["measured"] = {
        "coverage": round(len(kept) / len(held), 6),
        "accuracy": round(hits / len(kept), 6) if kept else None,
        "interval": list(wilson(hits, len(kept))) if kept else None,
    }
    return out


def _passes(fitted: Calibration, score: float, cls: str | None) -> bool:
    threshold = fitted.threshold_of(cls)
    return threshold is not None and score >= threshold


def plot_curve(result: dict[str, Any], points: Sequence[dict[str, Any]], path: Any) -> None:
    """A PNG of the curve (``points``: ``CurvePoint.as_dict()``, finer than the printed ones)
    with what :func:`calibrate_spec` found: accuracy and its interval against coverage, the
    target, the chosen threshold and the withheld share's measurement."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        from schemas.errors import ConfigError

        raise ConfigError("--png needs matplotlib: pip install 'stillhouse[plots]'") from exc
    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    coverage = [p["coverage"] for p in points]
    axes.fill_between(
        coverage,
        [p["lower"] for p in points],
        [p["upper"] for p in points],
        alpha=0.2,
        label="95 % interval",
    )
    axes.plot(coverage, [p["accuracy"] for p in points], label="accuracy of the labels kept")
    if result["target"] is not None:
        axes.axhline(result["target"], linestyle="--", color="grey", label="target")
    chosen = result["threshold"]
    if chosen is not None:
        axes.plot(
            [chosen["coverage"]],
            [chosen["accuracy"]],
            "o",
            color="black",
            label=f"confidence >= {chosen['threshold']:.3f}",
        )
    measured = result["withheld"].get("measured")
    if measured and measured["accuracy"] is not None:
        axes.plot(
            [measured["coverage"]],
            [measured["accuracy"]],
            "s",
            color="tab:red",
            label="withheld share, measured",
        )
    axes.set_xlabel("coverage (share of labels kept)")
    axes.set_ylabel("accuracy against known-good records")
    axes.set_title(f"{result['spec']} v{result['version']}: teacher confidence")
    axes.set_xlim(0, 1.0)
    axes.legend(loc="lower left")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
