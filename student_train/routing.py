"""When the student answers and when the teacher does: calibration and thresholds.

A classifier's confidence is made to mean what it says on the run's validation split, then
thresholds are chosen there and measured on the test split:

- **temperature scaling** (Guo et al., 2017): one scalar ``T`` dividing the log-probabilities,
  fitted by minimising the negative log-likelihood of the held-out targets; it changes how
  sure the student is, never what it answers. The expected calibration error is reported
  before and after.
- **the coverage curve**: for each confidence threshold, the share of inputs the student
  answers, and the accuracy of the routed answers (the student's above the threshold, the
  teacher's below), beside the teacher's own accuracy on the same items.
- **thresholds**: the lowest threshold (the fewest teacher calls) whose routed accuracy
  reaches the target (``router.target_accuracy``, else the teacher's accuracy less
  ``router.within_points``), one per predicted class where that class has enough validation
  items to choose its own, the overall one elsewhere;
- **high-severity classes**: ``router.always_teacher`` sends every input the student calls
  that class to the teacher, and ``router.min_recall`` sends an input to the teacher whenever
  the class's calibrated probability reaches a floor, the highest floor whose routed recall of
  the class reaches the minimum (a rare class is missed by being called something else, so
  its own probability, not the top one, is what catches it).

The targets are the known-good records where the items have them, else the teacher's labels
(then the teacher's accuracy is 1 by definition, and the target is agreement with it).
NumPy only: the validation splits are hundreds to thousands of items.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from student_train.data import Example
from student_train.evaluate import wilson

__all__ = [
    "DEFAULT_WITHIN_POINTS",
    "ROUTER_FILE",
    "ROUTER_FORMAT",
    "Decision",
    "RouterConfig",
    "RoutingPolicy",
    "calibrate_router",
    "expected_calibration_error",
    "fit_temperature",
    "measure",
    "scaled",
]

Matrix = npt.NDArray[np.float64]
ROUTER_FILE = "router.json"  # in a run's folder: the policy and its figures
ROUTER_FORMAT = "stillhouse-router/1"
DEFAULT_WITHIN_POINTS = 0.5
# A class chooses its own threshold with at least this many validation items predicted as it.
DEFAULT_MIN_ITEMS = 30
# Points of the coverage curve kept in metrics.json (the plot draws them).
CURVE_POINTS = 60
_NEVER = 1.000001  # a threshold no confidence reaches: every such input goes to the teacher


@dataclass(frozen=True)
class RouterConfig:
    """The spec's ``router`` section."""

    target_accuracy: float | None = None
    within_points: float = DEFAULT_WITHIN_POINTS
    always_teacher: tuple[str, ...] = ()
    min_recall: Mapping[str, float] = field(default_factory=dict)
    min_items: int = DEFAULT_MIN_ITEMS

    @classmethod
    def from_section(cls, section: Mapping[str, Any] | None, labels: Sequence[str]) -> RouterConfig:
        """The config from a spec's ``router`` mapping, its class names checked."""
        section = dict(section or {})
        config = cls(
            target_accuracy=section.get("target_accuracy"),
            within_points=float(section.get("within_points", DEFAULT_WITHIN_POINTS)),
            always_teacher=tuple(section.get("always_teacher") or ()),
            min_recall=dict(section.get("min_recall") or {}),
            min_items=int(section.get("min_items", DEFAULT_MIN_ITEMS)),
        )
        named = [*config.always_teacher, *config.min_recall]
        unknown = sorted(set(named) - set(labels))
        if unknown:
            raise ValueError(
                f"router names {', '.join(unknown)}: not a class of the spec ({', '.join(labels)})"
            )
        if config.target_accuracy is not None and not 0 < config.target_accuracy <= 1:
            raise ValueError(
                f"router.target_accuracy must be in (0, 1], got {config.target_accuracy}"
            )
        return config


@dataclass(frozen=True)
class Decision:
    """Who answers one input: the student's label and calibrated confidence, and why the
    teacher is asked instead (None: the student answers)."""

    label: str
    confidence: float
    to_teacher: str | None  # "low_confidence", "always_teacher:CLASS", "recall_guard:CLASS"


@dataclass(frozen=True)
class RoutingPolicy:
    """What :func:`calibrate_router` chose, and what the router applies to every input."""

    labels: tuple[str, ...]
    temperature: float
    threshold: float
    class_thresholds: Mapping[str, float] = field(default_factory=dict)
    always_teacher: tuple[str, ...] = ()
    recall_guards: Mapping[str, float] = field(default_factory=dict)

    def decide(self, probabilities: Sequence[float] | npt.NDArray[Any]) -> Decision:
        """The decision for one input from the student's (uncalibrated) probabilities."""
        return self.decide_many(np.asarray([probabilities], dtype=np.float64))[0]

    def decide_many(self, probabilities: Matrix) -> list[Decision]:
        """The decision for each row of the student's probabilities."""
        calibrated = scaled(probabilities, self.temperature)
        best = calibrated.argmax(axis=1)
        out = []
        for row, k in zip(calibrated, best, strict=True):
            label = self.labels[int(k)]
            confidence = float(row[k])
            out.append(Decision(label, confidence, self._why(label, confidence, row)))
        return out

    def _why(self, label: str, confidence: float, row: Matrix) -> str | None:
        if label in self.always_teacher:
            return f"always_teacher:{label}"
        for guarded, floor in self.recall_guards.items():
            if label != guarded and row[self.labels.index(guarded)] >= floor:
                return f"recall_guard:{guarded}"
        if confidence < self.class_thresholds.get(label, self.threshold):
            return "low_confidence"
        return None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready values (``metrics.json``'s ``router.policy``)."""
        values = asdict(self)
        values["labels"] = list(self.labels)
        values["always_teacher"] = list(self.always_teacher)
        values["class_thresholds"] = dict(self.class_thresholds)
        values["recall_guards"] = dict(self.recall_guards)
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RoutingPolicy:
        """A policy written by :meth:`as_dict`."""
        return cls(
            labels=tuple(values["labels"]),
            temperature=float(values["temperature"]),
            threshold=float(values["threshold"]),
            class_thresholds={k: float(v) for k, v in values["class_thresholds"].items()},
            always_teacher=tuple(values["always_teacher"]),
            recall_guards={k: float(v) for k, v in values["recall_guards"].items()},
        )


def scaled(probabilities: Matrix, temperature: float) -> Matrix:
    """Probabilities with their log divided by ``temperature`` and renormalised."""
    logits = np.log(np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1.0))
    logits = logits / temperature
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]


def fit_temperature(probabilities: Matrix, targets: Sequence[int]) -> float:
    """The temperature minimising the held-out negative log-likelihood (golden-section
    search over log T in [1/20, 20]; the NLL is convex in 1/T); 1.0 with no targets."""
    if not len(targets):
        return 1.0
    rows = np.arange(len(targets))
    index = np.asarray(targets)

    def nll(log_t: float) -> float:
        chosen = scaled(probabilities, math.exp(log_t))[rows, index]
        return float(-np.log(np.clip(chosen, 1e-12, 1.0)).mean())

    low, high = math.log(1 / 20), math.log(20)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = nll(a), nll(b)
    for _ in range(60):
        if fa <= fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = nll(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = nll(b)
    return round(math.exp((low + high) / 2), 6)


def expected_calibration_error(
    confidence: Sequence[float] | npt.NDArray[Any],
    correct: Sequence[bool] | npt.NDArray[Any],
    bins: int = 10,
) -> float | None:
    """The mean gap between confidence and accuracy over equal-width confidence bins,
    weighted by the bins' sizes (None with no items)."""
    conf = np.asarray(confidence, dtype=np.float64)
    hits = np.asarray(correct, dtype=np.float64)
    if not len(conf):
        return None
    which = np.minimum((conf * bins).astype(int), bins - 1)
    total = 0.0
    for k in range(bins):
        members = which == k
        if members.any():
            total += members.sum() * abs(conf[members].mean() - hits[members].mean())
    return round(total / len(conf), 6)


@dataclass
class _Held:
    """The held-out items of one split, as arrays."""

    probabilities: Matrix
    target: npt.NDArray[np.int64]  # -1: no target (no record and no teacher label)
    teacher_right: npt.NDArray[np.bool_]

    @property
    def scored(self) -> npt.NDArray[np.bool_]:
        return self.target >= 0


def calibrate_router(
    probabilities: Matrix,
    held: Sequence[Example],
    labels: Sequence[str],
    config: RouterConfig,
) -> dict[str, Any]:
    """Fit the temperature and thresholds on the val split of ``held`` (the student's
    ``probabilities``, row for row), and measure the routed answers on its test split:
    ``metrics.json``'s ``router`` section, with ``policy`` (:class:`RoutingPolicy`)."""
    labels = list(labels)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    against = "records" if any(e.known_good is not None for e in held) else "teacher"
    splits = {name: [i for i, e in enumerate(held) if e.split == name] for name in ("val", "test")}
    if not splits["val"] or not splits["test"]:
        half = len(held) // 2  # a dataset without its own splits: halves of the held-out
        splits = {"val": list(range(half)), "test": list(range(half, len(held)))}
    val = _arrays(probabilities, held, splits["val"], labels, against)
    test = _arrays(probabilities, held, splits["test"], labels, against)
    if not val.scored.sum():
        raise ValueError(
            "no validation item has a known-good record or a teacher label: nothing to "
            "calibrate the router on; label more items"
        )

    ok = val.scored
    temperature = fit_temperature(val.probabilities[ok], val.target[ok].tolist())
    calibrated = scaled(val.probabilities, temperature)
    teacher_accuracy = float(val.teacher_right[ok].mean())
    if config.target_accuracy is not None:
        target, target_from = float(config.target_accuracy), "router.target_accuracy"
    else:
        target = teacher_accuracy - config.within_points / 100
        target_from = f"the teacher's {teacher_accuracy:.1%} less {config.within_points} points"

    guards = {
        cls: _recall_floor(calibrated, val, labels.index(cls), minimum, config, labels)
        for cls, minimum in config.min_recall.items()
    }
    base = RoutingPolicy(tuple(labels), temperature, 0.0, {}, config.always_teacher, guards)
    routed_first = np.array(
        [d.to_teacher is not None for d in base.decide_many(val.probabilities)], dtype=bool
    )
    predicted = calibrated.argmax(axis=1)
    confidence = calibrated.max(axis=1)
    student_right = predicted == val.target
    open_ = ok & ~routed_first
    fixed_hits = float(val.teacher_right[ok & routed_first].sum())
    overall = _threshold(
        confidence[open_],
        student_right[open_],
        val.teacher_right[open_],
        target,
        fixed_hits,
        int(ok.sum()),
    )
    per_class: dict[str, float] = {}
    for k, cls in enumerate(labels):
        members = open_ & (predicted == k)
        if members.sum() >= config.min_items:
            per_class[cls] = _threshold(
                confidence[members],
                student_right[members],
                val.teacher_right[members],
                target,
                0.0,
                int(members.sum()),
            )
    policy = _reaching(
        [
            RoutingPolicy(tuple(labels), temperature, overall, own, config.always_teacher, guards)
            for own in (
                per_class,  # each class its own: fewest calls when the mixture holds
                {c: max(t, overall) for c, t in per_class.items()},
                {},
            )
        ],
        val,
        labels,
        target,
    )
    val_correct = student_right[ok]
    return {
        "fit_on": "val",
        "n_val": int(ok.sum()),
        "evaluated_on": "test",
        "against": against,
        "target_accuracy": round(target, 6),
        "target_from": target_from,
        "temperature": temperature,
        "ece_before": expected_calibration_error(
            val.probabilities[ok].max(axis=1),
            val.probabilities[ok].argmax(axis=1) == val.target[ok],
        ),
        "ece_after": expected_calibration_error(confidence[ok], val_correct),
        "policy": policy.as_dict(),
        "curve": _curve(confidence[ok], val_correct, val.teacher_right[ok]),
        "val": measure(policy, val, labels),
        "test": measure(policy, test, labels),
    }


def _reaching(
    candidates: Sequence[RoutingPolicy], val: _Held, labels: Sequence[str], target: float
) -> RoutingPolicy:
    """The first candidate whose routed val accuracy reaches ``target`` (per-class choices can
    each hold and their mixture still fall short); else the most accurate."""
    scored = [(measure(policy, val, labels)["accuracy"], policy) for policy in candidates]
    for accuracy, policy in scored:
        if accuracy >= target - 1e-9:
            return policy
    return max(scored, key=lambda pair: pair[0])[1]


def measure(policy: RoutingPolicy, held: _Held, labels: Sequence[str]) -> dict[str, Any]:
    """The routed answers on ``held``: accuracy (with its interval), the student's and the
    teacher's alone, the share sent to the teacher, and per class (by target) the recall and
    the share of that class's inputs sent to the teacher."""
    ok = held.scored
    n = int(ok.sum())
    if not n:
        return {"items": 0}
    decisions = policy.decide_many(held.probabilities[ok])
    target = held.target[ok]
    teacher_right = held.teacher_right[ok]
    to_teacher = np.array([d.to_teacher is not None for d in decisions], dtype=bool)
    student_right = np.array(
        [d.label == labels[t] for d, t in zip(decisions, target, strict=True)], dtype=bool
    )
    routed_right = np.where(to_teacher, teacher_right, student_right)
    reasons: dict[str, int] = {}
    for d in decisions:
        if d.to_teacher:
            key = d.to_teacher.split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
    per_class = {}
    for k, cls in enumerate(labels):
        members = target == k
        count = int(members.sum())
        if count:
            hits = int(routed_right[members].sum())
            per_class[cls] = {
                "items": count,
                "recall": round(hits / count, 6),
                "recall_interval": wilson(hits, count),
                "student_recall": round(float(student_right[members].mean()), 6),
                "teacher_share": round(float(to_teacher[members].mean()), 6),
            }
    hits = int(routed_right.sum())
    return {
        "items": n,
        "accuracy": round(hits / n, 6),
        "accuracy_interval": wilson(hits, n),
        "student_accuracy": round(float(student_right.mean()), 6),
        "teacher_accuracy": round(float(teacher_right.mean()), 6),
        "teacher_share": round(float(to_teacher.mean()), 6),
        "teacher_calls_by_reason": reasons,
        "per_class": per_class,
    }


def _arrays(
    probabilities: Matrix,
    held: Sequence[Example],
    rows: Sequence[int],
    labels: Sequence[str],
    against: str,
) -> _Held:
    index = {label: k for k, label in enumerate(labels)}
    targets, teacher_right = [], []
    for i in rows:
        example = held[i]
        truth = example.known_good if against == "records" else (example.label or None)
        targets.append(index.get(truth, -1) if truth is not None else -1)
        teacher_right.append(truth is not None and example.label == truth)
    return _Held(
        probabilities[list(rows)].reshape(len(rows), len(labels)),
        np.array(targets, dtype=np.int64),
        np.array(teacher_right, dtype=bool),
    )


def _threshold(
    confidence: Matrix,
    student_right: npt.NDArray[np.bool_],
    teacher_right: npt.NDArray[np.bool_],
    target: float,
    fixed_hits: float,
    total: int,
) -> float:
    """The lowest confidence threshold at which the routed accuracy (``fixed_hits`` from
    inputs routed otherwise, plus these: the student above it, the teacher below) reaches
    ``target`` over ``total`` inputs; if none does, the one with the best accuracy."""
    if not len(confidence) or not total:
        return _NEVER
    order = np.argsort(-confidence, kind="stable")
    conf = confidence[order]
    student = np.concatenate([[0.0], np.cumsum(student_right[order])])
    teacher = np.concatenate([[0.0], np.cumsum(teacher_right[order])])
    covered = np.arange(len(conf) + 1)
    # Only cut where the confidence changes: a threshold takes every input at its value.
    cuts = covered[np.r_[True, conf[1:] != conf[:-1], True]]
    accuracy = (fixed_hits + student[cuts] + teacher[-1] - teacher[cuts]) / total
    reaching = cuts[accuracy >= target - 1e-12]
    best = int(reaching.max()) if len(reaching) else int(cuts[int(np.argmax(accuracy))])
    return _NEVER if best == 0 else round(float(conf[best - 1]), 6)


def _recall_floor(
    calibrated: Matrix,
    val: _Held,
    k: int,
    minimum: float,
    config: RouterConfig,
    labels: Sequence[str],
) -> float:
    """The highest floor on class ``k``'s probability at which sending to the teacher every
    input not called ``k`` whose probability reaches it recalls ``minimum`` of the class on
    the val split; 0.0 (all but the inputs called ``k``) when none does."""
    members = val.target == k
    if not members.any():
        return 0.0
    predicted = calibrated.argmax(axis=1)
    always = np.isin(predicted, [labels.index(c) for c in config.always_teacher])
    student_hit = (predicted == k) & ~always
    teacher_hit = val.teacher_right
    p = calibrated[:, k]
    for floor in sorted({float(v) for v in p[members]}, reverse=True):
        routed = always | ((predicted != k) & (p >= floor))
        recall = np.where(routed, teacher_hit, student_hit)[members].mean()
        if recall >= minimum:
            return round(floor, 6)
    return 0.0


def _curve(
    confidence: Matrix, student_right: npt.NDArray[np.bool_], teacher_right: npt.NDArray[np.bool_]
) -> list[dict[str, float]]:
    """Coverage against routed accuracy with one overall threshold, highest first."""
    order = np.argsort(-confidence, kind="stable")
    conf = confidence[order]
    student = np.cumsum(student_right[order])
    teacher = np.cumsum(teacher_right[order])
    n = len(conf)
    points = []
    step = max(1, n // CURVE_POINTS)
    for covered in [*range(step, n, step), n]:
        accuracy = (student[covered - 1] + teacher[-1] - teacher[covered - 1]) / n
        points.append(
            {
                "threshold": round(float(conf[covered - 1]), 6),
                "coverage": round(covered / n, 6),
                "accuracy": round(float(accuracy), 6),
                "student_accuracy_covered": round(float(student[covered - 1] / covered), 6),
            }
        )
    return points
