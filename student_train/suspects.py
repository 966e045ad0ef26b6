"""Known-good records that are probably wrong, found by confident learning (``cleanlab``).

A record is suspect when two judges that never saw it agree against it: the teacher (it
labeled the item without regard to the record) and an out-of-fold model (the bag-of-n-grams
student trained on the *other* folds' records, so it cannot have memorized this one). Their
probabilities are averaged (an ensemble, as cleanlab advises), and
``cleanlab.filter.find_label_issues`` prunes by the estimated noise rate: per class pair, as
many items as the confident joint says are mislabeled, those with the largest margin first.
An item it flags is kept only if the teacher's label and the model's both name the same
other class; it is ranked by how likely the record is wrong (one minus the ensemble's
probability of the recorded class).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from storage.datasets import stable_unit
from student_train.bag import Student
from student_train.train import StudentConfig, fit_bag

__all__ = ["Judged", "Suspect", "find_suspects", "out_of_fold"]


@dataclass(frozen=True, slots=True)
class Judged:
    """One item with a record: its text, the recorded class, and the teacher's label."""

    item_id: int
    external_id: str
    text: str
    record: str
    teacher: str | None
    teacher_confidence: float | None


@dataclass(frozen=True, slots=True)
class Suspect:
    """A record the teacher and the out-of-fold model agree is wrong, and what they say."""

    item_id: int
    external_id: str
    record: str
    suggested: str
    p_record_wrong: float
    teacher_confidence: float | None
    model_probability: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def out_of_fold(
    texts: Sequence[str],
    targets: Sequence[int],
    n_classes: int,
    folds: Sequence[int],
    config: StudentConfig,
) -> npt.NDArray[np.float32]:
    """Each item's class probabilities from a model trained on the folds it is not in."""
    out = np.zeros((len(texts), n_classes), dtype=np.float32)
    for fold in sorted(set(folds)):
        train = [k for k, f in enumerate(folds) if f != fold]
        held = [k for k, f in enumerate(folds) if f == fold]
        if not train or not held:
            continue
        model, featurizer = fit_bag(
            [texts[k] for k in train], [targets[k] for k in train], n_classes, config
        )
        student = Student(model, [str(c) for c in range(n_classes)], featurizer)
        out[held] = student.predict_proba([texts[k] for k in held])
    return out


def find_suspects(
    judged: Sequence[Judged],
    classes: Sequence[str],
    *,
    folds: int = 5,
    config: StudentConfig | None = None,
) -> list[Suspect]:
    """The suspect records among ``judged``, most likely wrong first."""
    from cleanlab.filter import find_label_issues

    index = {name: k for k, name in enumerate(classes)}
    usable = [j for j in judged if j.record in index]
    if len(usable) < 2 * folds or len({j.record for j in usable}) < 2:
        return []
    config = config or StudentConfig(epochs=8, seed=0)
    targets = [index[j.record] for j in usable]
    fold_of = [min(folds - 1, int(stable_unit(j.external_id, "suspects") * folds)) for j in usable]
    with torch.random.fork_rng():
        model = out_of_fold([j.text for j in usable], targets, len(classes), fold_of, config)
    teacher = np.full((len(usable), len(classes)), 1.0 / len(classes), dtype=np.float32)
    for row, j in enumerate(usable):
        if j.teacher in index:
            confidence = 1.0 if j.teacher_confidence is None else float(j.teacher_confidence)
            confidence = min(max(confidence, 1.0 / len(classes)), 1.0)
            teacher[row, :] = (1.0 - confidence) / (len(classes) - 1)
            teacher[row, index[j.teacher]] = confidence
    ensemble = (model + teacher) / 2.0
    ensemble /= ensemble.sum(axis=1, keepdims=True)
    flagged = find_label_issues(
        labels=np.asarray(targets),
        pred_probs=ensemble,
        filter_by="prune_by_noise_rate",
        return_indices_ranked_by="self_confidence",
    )
    found = []
    for row in flagged:
        j = usable[int(row)]
        said = int(model[row].argmax())
        if j.teacher not in index or index[j.teacher] != said or said == targets[row]:
            continue  # the two judges must agree, and against the record
        found.append(
            Suspect(
                item_id=j.item_id,
                external_id=j.external_id,
                record=j.record,
                suggested=classes[said],
                p_record_wrong=round(1.0 - float(ensemble[row, targets[row]]), 6),
                teacher_confidence=j.teacher_confidence,
                model_probability=round(float(model[row, said]), 6),
            )
        )
    return sorted(found, key=lambda s: -s.p_record_wrong)
