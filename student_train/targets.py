"""What a classification student learns toward: soft targets and class and example weights.

A teacher often says how sure it was: a stated confidence, a calibrated probability, or the
share of its samples that agreed. A student trained on one-hot labels treats a coin-flip
label like a certain one; a soft target keeps the teacher's doubt, so the student is pulled
less hard toward labels the teacher barely chose (Hinton et al.'s distillation, with only
the teacher's top probability known). Both classification students use these helpers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch.nn import functional

__all__ = [
    "CLASS_WEIGHT_MODES",
    "ClassWeightMode",
    "class_weights",
    "example_weights",
    "soft_cross_entropy",
    "soft_targets",
]

ClassWeightMode = Literal["none", "balanced"]
CLASS_WEIGHT_MODES: tuple[str, ...] = ("none", "balanced")


def soft_targets(
    labels: Sequence[int], confidences: Sequence[float | None], n_classes: int
) -> torch.Tensor:
    """Target distributions, one row per example: the teacher's label gets its confidence,
    the rest is spread evenly over the other classes; a ``None`` confidence is a one-hot row.

    Confidences are clipped to ``[1/n_classes, 1]``. The teacher answered with this label,
    so it held it at least as likely as any other, which no probability below ``1/K`` allows:
    such a figure (an unnormalized self-report, or a sample vote that other answers split)
    would otherwise teach the student to prefer every other class over the label that was
    accepted. At ``1/K`` the row is uniform, the least a label can say.
    """
    if n_classes < 1:
        raise ValueError(f"n_classes must be positive, got {n_classes}")
    if len(labels) != len(confidences):
        raise ValueError(
            f"got {len(labels)} labels but {len(confidences)} confidences; give one per example"
        )
    bad = sorted({k for k in labels if not 0 <= k < n_classes})
    if bad:
        raise ValueError(f"label indices {bad} are outside [0, {n_classes})")
    rows = torch.zeros(len(labels), n_classes, dtype=torch.float32)
    floor = 1.0 / n_classes
    for row, (label, confidence) in enumerate(zip(labels, confidences, strict=True)):
        if confidence is None:
            rows[row, label] = 1.0
            continue
        if math.isnan(confidence):
            raise ValueError(f"example {row} has a NaN confidence; give a number or None")
        top = min(1.0, max(floor, float(confidence)))
        if n_classes > 1:
            rows[row] = (1.0 - top) / (n_classes - 1)
        rows[row, label] = top
    return rows


def class_weights(
    labels: Sequence[int],
    n_classes: int,
    mode: str = "none",
    *,
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """A weight per class (shape ``(n_classes,)``), scaled so the examples' mean is 1.

    ``none``: every class weighs 1. ``balanced``: inverse frequency, so each class that has
    examples carries the same total weight in the loss (scikit-learn's ``balanced``). With
    ``weights`` (the dataset's oversampling weights) the frequency is their sum per class, so
    a dataset that already oversampled its rare classes is not rebalanced a second time. A
    class with no examples gets 1 (nothing uses it). Multiply into each example's weight
    with :func:`example_weights`.
    """
    if mode not in CLASS_WEIGHT_MODES:
        raise ValueError(
            f"class_weight must be one of {', '.join(CLASS_WEIGHT_MODES)}, got {mode!r}"
        )
    if n_classes < 1:
        raise ValueError(f"n_classes must be positive, got {n_classes}")
    if mode == "none" or not labels:
        return torch.ones(n_classes, dtype=torch.float32)
    index = torch.tensor(list(labels), dtype=torch.long)
    given = torch.ones(len(labels)) if weights is None else torch.tensor(list(weights))
    totals = torch.zeros(n_classes, dtype=torch.float64).index_add_(0, index, given.double())
    present = totals > 0
    inverse = torch.where(present, 1.0 / totals.clamp(min=1e-300), 0.0)
    inverse /= inverse[index].mean()
    return torch.where(present, inverse, 1.0).float()


def example_weights(
    labels: Sequence[int],
    weights: Sequence[float],
    n_classes: int,
    mode: str = "none",
) -> torch.Tensor:
    """Each example's loss weight: its dataset weight times its class's :func:`class_weights`."""
    if len(labels) != len(weights):
        raise ValueError(f"got {len(labels)} labels but {len(weights)} weights")
    per_class = class_weights(labels, n_classes, mode, weights=weights)
    given = torch.tensor(list(weights), dtype=torch.float32)
    return given * per_class[torch.tensor(list(labels), dtype=torch.long)]


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row of logits against a target distribution (no reduction)."""
    return -(targets * functional.log_softmax(logits, dim=1)).sum(dim=1)
