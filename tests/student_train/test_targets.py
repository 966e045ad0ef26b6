"""Soft targets, class weights and the soft cross-entropy, against figures worked by hand."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from student_train.targets import (  # noqa: E402
    class_weights,
    example_weights,
    soft_cross_entropy,
    soft_targets,
)

pytestmark = pytest.mark.timeout(30)


def test_confidence_goes_to_the_label_and_the_rest_is_spread_evenly() -> None:
    rows = soft_targets([1, 0], [0.7, None], 4)
    assert rows.flatten().tolist() == pytest.approx([0.1, 0.7, 0.1, 0.1, 1.0, 0.0, 0.0, 0.0])
    assert rows.sum(dim=1).tolist() == pytest.approx([1.0, 1.0])


def test_confidence_below_one_over_k_is_clipped_to_a_uniform_row() -> None:
    # 0.1 < 1/4 would make every other class likelier than the teacher's own answer.
    rows = soft_targets([2, 2], [0.1, -3.0], 4)
    assert rows.flatten().tolist() == pytest.approx([0.25] * 8)


def test_confidence_above_one_is_clipped_to_one_hot() -> None:
    assert soft_targets([0], [1.7], 3).tolist() == [[1.0, 0.0, 0.0]]


def test_one_class_is_always_certain() -> None:
    assert soft_targets([0, 0], [0.2, None], 1).tolist() == [[1.0], [1.0]]


@pytest.mark.parametrize(
    ("labels", "confidences", "n_classes", "message"),
    [
        ([0, 1], [0.5], 3, "one per example"),
        ([3], [None], 3, "outside"),
        ([0], [math.nan], 3, "NaN"),
        ([0], [None], 0, "n_classes"),
    ],
)
def test_soft_targets_refuse_bad_input(
    labels: list[int], confidences: list[float | None], n_classes: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        soft_targets(labels, confidences, n_classes)


def test_no_class_weight_is_all_ones() -> None:
    assert class_weights([0, 0, 1], 3, "none").tolist() == [1.0, 1.0, 1.0]


def test_balanced_weights_are_inverse_frequency_with_mean_one_over_examples() -> None:
    # Counts 3 and 1: weights a/3 and a with (3 * a/3 + a) / 4 = 1, so a = 2.
    per_class = class_weights([0, 0, 0, 1], 3, "balanced")
    assert per_class.tolist() == pytest.approx([2 / 3, 2.0, 1.0])  # class 2 is absent: 1
    each = example_weights([0, 0, 0, 1], [1.0] * 4, 3, "balanced")
    assert each.tolist() == pytest.approx([2 / 3, 2 / 3, 2 / 3, 2.0])
    assert float(each.mean()) == pytest.approx(1.0)


def test_balanced_weights_do_not_rebalance_an_oversampled_dataset() -> None:
    # The dataset already weighs its rare class 3x: per-class totals are equal.
    labels, weights = [0, 0, 0, 1], [1.0, 1.0, 1.0, 3.0]
    assert class_weights(labels, 2, "balanced", weights=weights).tolist() == pytest.approx(
        [1.0, 1.0]
    )
    assert example_weights(labels, weights, 2, "balanced").tolist() == pytest.approx(weights)


def test_unknown_class_weight_mode_names_the_choices() -> None:
    with pytest.raises(ValueError, match="none, balanced"):
        class_weights([0], 2, "inverse")


def test_soft_cross_entropy_on_one_hot_rows_is_cross_entropy() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.3, -0.2]])
    targets = soft_targets([0, 2], [None, None], 3)
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2]), reduction="none")
    assert soft_cross_entropy(logits, targets).tolist() == pytest.approx(expected.tolist())


def test_soft_cross_entropy_is_smallest_at_the_target() -> None:
    targets = soft_targets([1], [0.6], 3)  # [0.2, 0.6, 0.2]
    at_target = soft_cross_entropy(targets.log(), targets)
    entropy = -(targets * targets.log()).sum()
    assert float(at_target[0]) == pytest.approx(float(entropy))
    assert float(soft_cross_entropy(torch.tensor([[0.0, 5.0, 0.0]]), targets)[0]) > float(entropy)
