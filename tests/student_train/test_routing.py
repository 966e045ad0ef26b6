"""Calibration and thresholds of the router (``student_train.routing``), on synthetic
held-out sets whose right answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from student_train.data import Example
from student_train.routing import (
    RouterConfig,
    RoutingPolicy,
    calibrate_router,
    expected_calibration_error,
    fit_temperature,
    scaled,
)

LABELS = ["a", "b", "rare"]


def _held(n: int, seed: int = 0, *, teacher_error: float = 0.02) -> tuple[np.ndarray, list]:
    """``n`` val and ``n`` test items: the student is overconfident (its probabilities are
    sharpened) and right less often where it is less sure; the teacher errs at random; the
    ``rare`` class is 5 % of the items and the student mostly calls it ``a``."""
    rng = np.random.default_rng(seed)
    rows, held = [], []
    for i in range(2 * n):
        truth = rng.choice(3, p=[0.55, 0.40, 0.05])
        sure = rng.uniform(0.3, 1.0)
        if truth == 2:
            answer = 2 if rng.random() < 0.3 else 0
            p = np.array([0.5, 0.1, 0.4]) if answer == 0 else np.array([0.2, 0.1, 0.7])
        else:
            answer = truth if rng.random() < 0.6 + 0.4 * sure else 1 - truth
            p = np.full(3, (1 - sure) / 2)
            p[answer] = sure
        rows.append(p**3 / (p**3).sum())  # overconfident
        teacher = truth if rng.random() > teacher_error else (truth + 1) % 3
        held.append(
            Example(
                item_id=i,
                external_id=f"x{i}",
                text="",
                label=LABELS[teacher],
                known_good=LABELS[truth],
                split="val" if i < n else "test",
            )
        )
    return np.array(rows), held


def test_temperature_undoes_overconfidence_and_lowers_the_calibration_error() -> None:
    probabilities, held = _held(800)
    targets = [LABELS.index(e.known_good) for e in held]
    temperature = fit_temperature(probabilities, targets)
    assert temperature > 1.5  # sharpened by a cube: the fit softens them
    right = probabilities.argmax(axis=1) == np.array(targets)
    before = expected_calibration_error(probabilities.max(axis=1), right)
    after = expected_calibration_error(scaled(probabilities, temperature).max(axis=1), right)
    assert after < before
    # Scaling never changes what the student answers.
    assert (scaled(probabilities, temperature).argmax(axis=1) == probabilities.argmax(axis=1)).all()


def test_the_threshold_reaches_the_target_with_the_fewest_teacher_calls() -> None:
    probabilities, held = _held(1500)
    result = calibrate_router(probabilities, held, LABELS, RouterConfig(target_accuracy=0.9))
    val, test = result["val"], result["test"]
    assert val["accuracy"] >= 0.9 > val["student_accuracy"]
    assert 0 < val["teacher_share"] < 1
    # One step lower (more coverage) would miss the target: the threshold is the lowest.
    policy = RoutingPolicy.from_dict(result["policy"])
    assert policy.threshold < 1
    # Measured on the test split, not where it was chosen, and close to it.
    assert test["items"] > 1000 and abs(test["accuracy"] - val["accuracy"]) < 0.03
    low, high = test["accuracy_interval"]
    assert low <= test["accuracy"] <= high
    assert result["against"] == "records" and result["ece_after"] < result["ece_before"]
    curve = result["curve"]
    assert curve[-1]["coverage"] == 1.0 and curve[-1]["accuracy"] == pytest.approx(
        val["student_accuracy"], abs=1e-6
    )


def test_default_target_is_the_teachers_accuracy_less_half_a_point() -> None:
    probabilities, held = _held(1500)
    result = calibrate_router(probabilities, held, LABELS, RouterConfig())
    teacher = result["val"]["teacher_accuracy"]
    assert result["target_accuracy"] == pytest.approx(teacher - 0.005, abs=1e-6)
    assert result["val"]["accuracy"] >= result["target_accuracy"]
    assert "less 0.5 points" in result["target_from"]


def test_a_rare_class_reaches_its_recall_through_the_fallback() -> None:
    probabilities, held = _held(1500)
    plain = calibrate_router(probabilities, held, LABELS, RouterConfig(target_accuracy=0.8))
    guarded = calibrate_router(
        probabilities, held, LABELS, RouterConfig(target_accuracy=0.8, min_recall={"rare": 0.9})
    )
    assert plain["test"]["per_class"]["rare"]["recall"] < 0.6
    rare = guarded["test"]["per_class"]["rare"]
    assert rare["recall"] >= 0.85 and rare["teacher_share"] > 0.6
    assert guarded["test"]["teacher_calls_by_reason"]["recall_guard"] > 0
    assert guarded["policy"]["recall_guards"]["rare"] > 0


def test_always_teacher_sends_every_input_called_that_class() -> None:
    probabilities, held = _held(400)
    result = calibrate_router(
        probabilities, held, LABELS, RouterConfig(target_accuracy=0.5, always_teacher=("b",))
    )
    policy = RoutingPolicy.from_dict(result["policy"])
    decisions = policy.decide_many(probabilities)
    called_b = [d for d in decisions if d.label == "b"]
    assert called_b and all(d.to_teacher == "always_teacher:b" for d in called_b)


def test_without_records_the_target_is_agreement_with_the_teacher() -> None:
    probabilities, held = _held(600)
    for example in held:
        object.__setattr__(example, "known_good", None)
    result = calibrate_router(probabilities, held, LABELS, RouterConfig())
    assert result["against"] == "teacher" and result["val"]["teacher_accuracy"] == 1.0


def test_router_config_names_the_unknown_class() -> None:
    with pytest.raises(ValueError, match="router names nope: not a class"):
        RouterConfig.from_section({"min_recall": {"nope": 0.9}}, LABELS)
    with pytest.raises(ValueError, match="target_accuracy"):
        RouterConfig.from_section({"target_accuracy": 1.5}, LABELS)
