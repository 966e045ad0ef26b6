"""Train the bag-of-n-grams student on accepted teacher labels and compare it with the teacher.

The student learns from the teacher's labels on the train split. On the validation split it
is scored three ways: against the teacher, against the known-good labels, and, on those same
known-good items, the teacher itself, so a reader sees whether the student keeps up.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from student_train.bag import BagOfNgrams, RowAdagrad, Student, to_tensors
from student_train.data import Example, split_examples
from student_train.evaluate import (
    DEFAULT_SLICE_MARGIN,
    confusion,
    evaluate,
    headline,
    scored_items,
)
from student_train.features import Bag, Featurizer
from student_train.runtime import Settings, threads
from student_train.runtime import latency as measure_latency
from student_train.targets import (
    CLASS_WEIGHT_MODES,
    example_weights,
    soft_cross_entropy,
    soft_targets,
)

__all__ = [
    "MIN_TRAIN_EXAMPLES",
    "StudentConfig",
    "TrainReport",
    "fit_bag",
    "fit_student",
    "load_student",
    "save_student",
    "train_classifier",
]

MIN_TRAIN_EXAMPLES = 10
FORMAT = "stillhouse-student/bag-of-ngrams/1"
MODEL_FILE, METRICS_FILE, LABELS_FILE, CONFIG_FILE = (
    "model.safetensors",
    "metrics.json",
    "labels.json",
    "config.json",
)


@dataclass(frozen=True)
class StudentConfig(Settings):
    """Hyperparameters of one training run (fastText-like defaults that suit a CPU)."""

    epochs: int = 8
    buckets: int = 262_144
    dim: int = 64
    lr: float = 0.5
    val_share: float = 0.2
    batch_size: int = 64
    seed: int = 0
    weight_decay: float = 0.0
    dropout: float = 0.0
    max_tokens: int = 2_000
    # Soft targets from the teacher's confidence (Example.confidence); off by default: on
    # BBC a confidence for the top label alone did not help the MiniLM head either.
    soft_targets: bool = False
    class_weight: str = "none"  # none, or balanced (inverse class frequency, mean 1)
    threads: int | None = None  # None: half the usable cores, 1 to 4 (see `runtime.threads`)

    def __post_init__(self) -> None:
        for name in ("epochs", "buckets", "dim", "batch_size", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"StudentConfig.{name} must be positive, got {getattr(self, name)}"
                )
        if self.lr <= 0:
            raise ValueError(f"StudentConfig.lr must be positive, got {self.lr}")
        if not 0.0 <= self.val_share < 1.0:
            raise ValueError(f"StudentConfig.val_share must be in [0, 1), got {self.val_share}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"StudentConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.class_weight not in CLASS_WEIGHT_MODES:
            raise ValueError(
                f"StudentConfig.class_weight must be one of {', '.join(CLASS_WEIGHT_MODES)}, "
                f"got {self.class_weight!r}"
            )

    def featurizer(self) -> Featurizer:
        """The featurizer these settings call for."""
        return Featurizer(buckets=self.buckets, max_tokens=self.max_tokens)


ClassMetrics = dict[str, float | int | None]


@dataclass
class TrainReport:
    """What a training run produced: sizes, accuracies by source and class, and timings.

    Accuracies are fractions in [0, 1], or ``None`` when there was nothing to score.
    ``student_accuracy`` and ``teacher_accuracy`` are measured on the same validation items,
    those with a known-good label.
    """

    n_train: int
    n_val: int
    n_val_known_good: int
    labels: list[str]
    student_vs_teacher_accuracy: float | None
    student_accuracy: float | None
    teacher_accuracy: float | None
    per_class: dict[str, ClassMetrics]
    epochs: int
    final_loss: float
    featurize_seconds: float
    train_seconds: float
    predict_items_per_s: float
    config: dict[str, Any] = field(default_factory=dict)
    dataset: dict[str, Any] | None = None  # the frozen dataset it learned from (name, hash)
    # By slice, on the test split (the held-out items when the dataset has none):
    # ``student_train.evaluate.evaluate``'s ``overall``, ``slices``, ``flagged``.
    evaluated_on: str = "test"
    # What slices are measured against: "records" (known-good), or "teacher" for a spec
    # without records (there a class's recall is against the teacher's labels).
    evaluated_against: str = "records"
    overall: dict[str, Any] = field(default_factory=dict)
    slices: dict[str, Any] = field(default_factory=dict)
    flagged: list[dict[str, Any]] = field(default_factory=list)
    slice_margin: float = DEFAULT_SLICE_MARGIN
    # CPU latency: one item at a time (p50, p99 over up to LATENCY_ITEMS) and batched.
    latency_ms: dict[str, float] = field(default_factory=dict)
    size_bytes: int = 0
    kind: str = "bag_of_ngrams"
    # Per epoch: {"epoch", "loss", "val"} (val: agreement with the teacher on the val split),
    # the learning curve the run's plot draws.
    history: list[dict[str, Any]] = field(default_factory=list)
    # The student against the known-good records on the evaluated split: {"labels": [...],
    # "matrix": [[count of record i answered j]]}, the confusion plot's data.
    confusion: dict[str, Any] = field(default_factory=dict)
    # The one figure to read first: {"metric", "student", "teacher", "ratio"}.
    headline: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The report as plain JSON-ready values (``metrics.json``)."""
        return asdict(self)


def train_classifier(
    examples: Sequence[Example],
    labels: Sequence[str],
    config: StudentConfig,
    out_dir: Path | None = None,
    dataset: dict[str, Any] | None = None,
    *,
    slice_margin: float = DEFAULT_SLICE_MARGIN,
    min_recall: Mapping[str, float] | None = None,
) -> TrainReport:
    """Train a student on the examples' teacher labels; save it to ``out_dir`` if given.
    ``dataset`` (its name and content hash) is recorded in the report; ``slice_margin`` and
    ``min_recall`` say which slices the evaluation flags."""
    student, report = fit_student(
        examples, labels, config, slice_margin=slice_margin, min_recall=min_recall
    )
    report.dataset = dataset
    if out_dir is not None:
        save_student(student, config, report, out_dir)
    return report


def fit_student(
    examples: Sequence[Example],
    labels: Sequence[str],
    config: StudentConfig,
    *,
    slice_margin: float = DEFAULT_SLICE_MARGIN,
    min_recall: Mapping[str, float] | None = None,
) -> tuple[Student, TrainReport]:
    """Train a student and evaluate it on the held-out splits, by slice on the test split;
    keep both in memory."""
    _check_labels([e for e in examples if e.accepted], labels)
    train, val = split_examples(examples, config.val_share)
    train = [example for example in train if example.accepted]
    _check_train_split(train, config)
    torch.manual_seed(config.seed)
    featurizer = config.featurizer()
    with threads(config.threads):
        started = time.perf_counter()
        docs = featurizer.bags(example.text for example in train)
        featurized = time.perf_counter()
        model = BagOfNgrams(config.buckets, config.dim, len(labels), config.dropout)
        index = {label: k for k, label in enumerate(labels)}
        ks = [index[example.label] for example in train]
        given = [example.confidence if config.soft_targets else None for example in train]
        targets = soft_targets(ks, given, len(labels))
        weights = example_weights(ks, [e.weight for e in train], len(labels), config.class_weight)
        student = Student(model, labels, featurizer)
        loss, history = _optimize(
            model, docs, targets, weights, config, watch=_agreement_watch(student, val)
        )
        trained = time.perf_counter()
        predicted, rate = _timed_predict(student, val or train[:1_000])
        held = [example.text for example in (val or train)]
        latency = measure_latency(student.predict, held)
    scores = _scores(student.labels, predicted[: len(val)], val)
    scored, evaluated_on, against = scored_items(predicted, val)
    by_slice = evaluate(scored, labels, margin=slice_margin, min_recall=min_recall)
    report = TrainReport(
        n_train=len(train),
        n_val=len(val),
        labels=list(labels),
        epochs=config.epochs,
        final_loss=loss,
        featurize_seconds=round(featurized - started, 4),
        train_seconds=round(trained - featurized, 4),
        predict_items_per_s=round(rate, 1),
        config=config.as_dict(),
        evaluated_on=evaluated_on,
        evaluated_against=against,
        latency_ms=latency,
        size_bytes=sum(t.numel() * t.element_size() for t in model.state_dict().values()),
        history=history,
        confusion=confusion(scored, labels),
        headline=headline(by_slice["overall"]),
        **by_slice,
        **scores,
    )
    return student, report


def fit_bag(
    texts: Sequence[str], targets: Sequence[int], n_classes: int, config: StudentConfig
) -> tuple[BagOfNgrams, Featurizer]:
    """A bag-of-n-grams model fitted to class indices, every example weighing the same (what
    out-of-fold models for confident learning need: no split, no report)."""
    torch.manual_seed(config.seed)
    featurizer = config.featurizer()
    with threads(config.threads):
        docs = featurizer.bags(texts)
        model = BagOfNgrams(config.buckets, config.dim, n_classes, config.dropout)
        _optimize(
            model,
            docs,
            soft_targets(list(targets), [None] * len(docs), n_classes),
            torch.ones(len(docs), dtype=torch.float32),
            config,
        )
    return model, featurizer


def _check_labels(examples: Sequence[Example], labels: Sequence[str]) -> None:
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels must be distinct, got {list(labels)}")
    unknown = sorted({example.label for example in examples} - set(labels))
    if unknown:
        raise ValueError(
            f"examples carry labels missing from `labels`: {unknown}; pass the full label set"
        )


def _check_train_split(train: list[Example], config: StudentConfig) -> None:
    if len(train) < MIN_TRAIN_EXAMPLES:
        raise ValueError(
            f"only {len(train)} training examples after holding out {config.val_share:.0%} for "
            f"validation; the student needs at least {MIN_TRAIN_EXAMPLES}. Label more items "
            "with the teacher (or lower val_share) and train again."
        )
    present = sorted({example.label for example in train})
    if len(present) < 2:
        raise ValueError(
            f"the accepted labels in the train split cover {len(present)} class ({present}); "
            "a classifier needs at least 2. Label more items, from more than one class."
        )


def _agreement_watch(student: Student, held: Sequence[Example]) -> Callable[[], float | None]:
    """After each epoch: the share of the val split (else of every held-out item) on which
    the student agrees with the teacher, the learning curve's second line."""
    watched = [e for e in held if e.split == "val" and e.label] or [e for e in held if e.label]
    bags = student.featurizer.bags(example.text for example in watched)

    def agreement() -> float | None:
        if not watched:
            return None
        probabilities = student.predict_proba_bags(bags)
        hits = sum(
            student.labels[int(k)] == e.label
            for k, e in zip(probabilities.argmax(axis=1), watched, strict=True)
        )
        return round(hits / len(watched), 6)

    return agreement


def _optimize(
    model: BagOfNgrams,
    docs: list[Bag],
    targets: torch.Tensor,
    weights: torch.Tensor,
    config: StudentConfig,
    *,
    watch: Callable[[], float | None] | None = None,
) -> tuple[float, list[dict[str, Any]]]:
    """Adagrad with a learning rate that falls linearly to zero, against ``targets`` (a
    distribution a row: one-hot, or soft from the teacher's confidence), each example's loss scaled
    by its weight (a batch's mean is weighted); the last epoch's mean loss, and per epoch
    its loss and ``watch()`` (the learning curve)."""
    optimizer = RowAdagrad(
        [
            {"params": model.embedding.parameters()},
            {"params": model.linear.parameters(), "weight_decay": config.weight_decay},
        ],
        lr=config.lr,
    )
    generator = torch.Generator().manual_seed(config.seed)
    total = config.epochs * math.ceil(len(docs) / config.batch_size)
    step, epoch_loss = 0, 0.0
    history: list[dict[str, Any]] = []
    model.train()
    for epoch in range(1, config.epochs + 1):
        order = torch.randperm(len(docs), generator=generator)
        epoch_loss = 0.0
        for start in range(0, len(docs), config.batch_size):
            batch = order[start : start + config.batch_size]
            for group in optimizer.param_groups:
                group["lr"] = config.lr * (1.0 - step / total)
            inputs = to_tensors([docs[i] for i in batch.tolist()])
            each = soft_cross_entropy(model(*inputs), targets[batch])
            scale = weights[batch]
            loss = (each * scale).sum() / scale.sum()
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            epoch_loss += loss.item() * len(batch)
            step += 1
        model.eval()
        val = watch() if watch is not None else None
        model.train()
        history.append({"epoch": epoch, "loss": round(epoch_loss / len(docs), 6), "val": val})
    model.eval()
    return round(epoch_loss / len(docs), 6), history


def _timed_predict(student: Student, items: list[Example]) -> tuple[list[str], float]:
    """The student's labels for the items, and how many items per second it labeled."""
    started = time.perf_counter()
    predicted = [label for label, _ in student.predict([item.text for item in items])]
    return predicted, len(items) / max(time.perf_counter() - started, 1e-9)


def _scores(labels: Sequence[str], predicted: list[str], items: list[Example]) -> dict[str, Any]:
    """Accuracies on the validation items: student vs teacher, and both vs known-good."""
    known = [
        (p, item) for p, item in zip(predicted, items, strict=True) if item.known_good is not None
    ]
    return {
        "n_val_known_good": len(known),
        "student_vs_teacher_accuracy": _mean(
            p == item.label for p, item in zip(predicted, items, strict=True)
        ),
        "student_accuracy": _mean(p == item.known_good for p, item in known),
        "teacher_accuracy": _mean(item.label == item.known_good for _, item in known),
        "per_class": _per_class(labels, predicted, items),
    }


def _per_class(
    labels: Sequence[str], predicted: list[str], items: list[Example]
) -> dict[str, ClassMetrics]:
    """Per label: recall of student and teacher on its known-good items, and agreement."""
    names = list(labels) + sorted({i.known_good for i in items if i.known_good} - set(labels))
    out: dict[str, ClassMetrics] = {}
    for name in names:
        truth = [(p, i) for p, i in zip(predicted, items, strict=True) if i.known_good == name]
        taught = [p for p, i in zip(predicted, items, strict=True) if i.label == name]
        out[name] = {
            "support": len(truth),
            "student_accuracy": _mean(p == name for p, _ in truth),
            "teacher_accuracy": _mean(i.label == name for _, i in truth),
            "teacher_support": len(taught),
            "student_vs_teacher_accuracy": _mean(p == name for p in taught),
        }
    return out


def _mean(hits: Iterator[bool] | Sequence[bool]) -> float | None:
    values = list(hits)
    return round(sum(values) / len(values), 6) if values else None


def save_student(
    student: Student, config: StudentConfig, report: TrainReport, out_dir: Path
) -> None:
    """Write the weights, labels, settings and metrics that :func:`load_student` reads back."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in student.model.state_dict().items()}
    save_file(tensors, str(out_dir / MODEL_FILE), metadata={"format": FORMAT})
    settings = {
        "format": FORMAT,
        "config": config.as_dict(),
        "featurizer": student.featurizer.settings(),
    }
    _write_json(out_dir / CONFIG_FILE, settings)
    _write_json(out_dir / LABELS_FILE, student.labels)
    _write_json(out_dir / METRICS_FILE, report.as_dict())


def load_student(out_dir: Path) -> Student:
    """Load a student written by :func:`train_classifier` or :func:`save_student`."""
    missing = [n for n in (MODEL_FILE, LABELS_FILE, CONFIG_FILE) if not (out_dir / n).is_file()]
    if missing:
        raise FileNotFoundError(f"no student in {out_dir}: missing {', '.join(missing)}")
    settings = json.loads((out_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    if settings.get("format") != FORMAT:
        raise ValueError(f"{out_dir / CONFIG_FILE} is not a {FORMAT} model")
    labels: list[str] = json.loads((out_dir / LABELS_FILE).read_text(encoding="utf-8"))
    config = StudentConfig.from_dict(settings["config"])
    featurizer = Featurizer(**settings["featurizer"])
    model = BagOfNgrams(featurizer.buckets, config.dim, len(labels), config.dropout)
    model.load_state_dict(load_file(str(out_dir / MODEL_FILE)))
    return Student(model, labels, featurizer)


def _write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")
