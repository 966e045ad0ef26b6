"""Training examples for the student and their stable train/validation split."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from storage.datasets import stable_unit

__all__ = ["Example", "Split", "split_examples", "split_of"]

Split = Literal["train", "val"]


@dataclass(frozen=True, slots=True)
class Example:
    """One labeled item: its text, the teacher's label and the known-good label if any.

    Only ``accepted`` examples are trained on; the validation split keeps every labeled item,
    so the student and the teacher are measured on the same, unfiltered held-out set.
    ``label`` is empty when the teacher gave no usable label (a rejected parse, say).
    """

    item_id: int
    external_id: str
    text: str
    label: str
    known_good: str | None = None
    accepted: bool = True
    weight: float = 1.0  # a dataset's training weight (class balance, oversampling)
    split: str | None = None  # a dataset's split (train, val, test); None: split by hash
    slices: Mapping[str, str] = field(default_factory=dict)  # the spec's slice values
    # How sure the teacher was of ``label`` (its stated confidence, or the agreement of its
    # samples): soft targets where the student's kind uses them; None: a hard label.
    confidence: float | None = None


def split_of(external_id: str, val_share: float, salt: str = "") -> Split:
    """The split of one item, from a blake2b hash of its external id.

    The answer depends only on the id, the share and the salt, never on row order or the
    process, so an item stays in the same split when the dataset grows or is reloaded.
    """
    _check_share(val_share)
    return "val" if stable_unit(external_id, salt) < val_share else "train"


def split_examples(
    examples: Iterable[Example], val_share: float, salt: str = ""
) -> tuple[list[Example], list[Example]]:
    """Partition examples into ``(train, val)``, keeping their order: by the split each one
    carries (a dataset's; its val and test both held out), else with :func:`split_of`."""
    train: list[Example] = []
    val: list[Example] = []
    for example in examples:
        if example.split is not None:
            side = "train" if example.split == "train" else "val"
        else:
            side = split_of(example.external_id, val_share, salt)
        (val if side == "val" else train).append(example)
    return train, val


def _check_share(val_share: float) -> None:
    if not 0.0 <= val_share < 1.0:
        raise ValueError(f"val_share must be in [0, 1), got {val_share}")
