"""Train the extraction student: a BIO token tagger over the spec's array-of-string fields,
learned from the teacher's accepted answers aligned to the text, decoded back into the
spec's JSON fields.

Each value the teacher extracted is found in the document (every occurrence, casefolded where
that keeps offsets) and tagged on the tokens it covers; where spans overlap the longer wins. The
tagger (:mod:`student_train.tag_model`) is trained with cross-entropy per token, weighted
by the dataset's weights (and by the teacher's confidence where it gave one), keeping the
epoch whose val F1 against the teacher is best. Its answer holds every field with distinct
values in order of first appearance, cut to the schema's ``maxItems`` and ``maxLength``, each
the document's own characters, so it passes the same schema and grounding checks as the
teacher's. It is evaluated by slice (:mod:`student_train.tag_metrics`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.nn import functional

from storage.models import Verdict
from storage.training import DatasetRow
from student_train.data import split_of
from student_train.evaluate import DEFAULT_SLICE_MARGIN
from student_train.runtime import Settings, device, read_settings, threads, write_json
from student_train.runtime import latency as measure_latency
from student_train.tag_metrics import TagScored, evaluate_extraction, extraction_headline
from student_train.tag_model import (
    Doc,
    Featurizer,
    TagScorer,
    TagSet,
    allowed_transitions,
    pad_rows,
    viterbi,
)

__all__ = [
    "FORMAT",
    "MIN_TRAIN_DOCS",
    "FieldLimits",
    "TagExample",
    "TaggerConfig",
    "TaggerStudent",
    "align",
    "examples_from_rows",
    "extraction_fields",
    "fit_tagger",
    "load_tagger",
    "save_tagger",
]

FORMAT = "stillhouse-student/tagger/1"
MIN_TRAIN_DOCS = 10
MODEL_FILE, CONFIG_FILE, METRICS_FILE = "model.safetensors", "config.json", "metrics.json"


@dataclass(frozen=True)
class TaggerConfig(Settings):
    """Hyperparameters of one tagger run (defaults: spaCy's small tok2vec, on a CPU)."""

    epochs: int = 20
    rows: int = 16_384  # rows of each attribute's hash-embedding table
    dim: int = 64
    width: int = 96
    depth: int = 4
    window: int = 1
    dropout: float = 0.1
    lr: float = 0.002
    batch_tokens: int = 1_000
    max_tokens: int = 2_048
    weight_by_confidence: bool = True
    val_share: float = 0.1
    seed: int = 0
    threads: int | None = None  # None: half the usable cores, 1 to 4 (see `runtime.threads`)

    def __post_init__(self) -> None:
        for name in ("epochs", "rows", "dim", "width", "depth", "batch_tokens", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"TaggerConfig.{name} must be a positive integer, got {getattr(self, name)}"
                )
        if self.window < 0:
            raise ValueError(f"TaggerConfig.window must be 0 or more, got {self.window}")
        if self.lr <= 0:
            raise ValueError(f"TaggerConfig.lr must be positive, got {self.lr}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TaggerConfig.dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.val_share < 1.0:
            raise ValueError(f"TaggerConfig.val_share must be in [0, 1), got {self.val_share}")


@dataclass(frozen=True, slots=True)
class FieldLimits:
    """What the schema allows one field: at most ``max_items`` values of ``max_length``."""

    max_items: int | None = None
    max_length: int | None = None


def extraction_fields(output_schema: Mapping[str, Any]) -> dict[str, FieldLimits]:
    """The schema's array-of-string properties (what the tagger tags) with their limits."""
    found = {}
    for name, prop in (output_schema.get("properties") or {}).items():
        items = prop.get("items") if isinstance(prop, Mapping) else None
        is_strings = isinstance(items, Mapping) and items.get("type") == "string"
        if prop.get("type") == "array" and is_strings:
            assert isinstance(items, Mapping)
            found[str(name)] = FieldLimits(prop.get("maxItems"), items.get("maxLength"))
    if not found:
        raise ValueError(
            "the output schema has no array-of-string property: the tagger extracts such "
            "fields (a list of names, dates or amounts copied from the text)"
        )
    return found


@dataclass(frozen=True, slots=True)
class TagExample:
    """One document: its text, the teacher's values per field (None: no usable answer), the
    known-good values (None: no record), and how the dataset holds it."""

    item_id: int
    external_id: str
    text: str
    teacher: Mapping[str, Sequence[str]] | None
    gold: Mapping[str, Sequence[str]] | None = None
    accepted: bool = True
    split: str | None = None
    weight: float = 1.0
    slices: Mapping[str, str] = field(default_factory=dict)


def examples_from_rows(
    rows: Sequence[DatasetRow], spec_body: Mapping[str, Any], fields: Sequence[str]
) -> list[TagExample]:
    """The documents of a frozen dataset, the known-good values read through the spec's
    known-good rules (``field: {source: ...}``), weighted by the teacher's confidence."""
    sources = {}
    for name in fields:
        rule = (spec_body.get("known_good") or {}).get(name)
        if isinstance(rule, Mapping):
            sources[name] = str(rule.get("source", name))
    examples = []
    for row in rows:
        gold = None
        if row.known_good and any(s in row.known_good for s in sources.values()):
            gold = {n: _strings(row.known_good.get(s)) for n, s in sources.items()}
        teacher = None
        if isinstance(row.output, Mapping):
            teacher = {n: _strings(row.output.get(n)) for n in fields}
        confidence = row.confidence if row.confidence is not None else row.agreement
        examples.append(
            TagExample(
                item_id=row.item_id,
                external_id=row.external_id,
                text=row.text,
                teacher=teacher,
                gold=gold,
                accepted=row.verdict == Verdict.ACCEPTED and teacher is not None,
                split=row.split,
                weight=float(row.weight) * (1.0 if confidence is None else float(confidence)),
                slices={k: str(v) for k, v in row.slices.items() if v is not None},
            )
        )
    return examples


def _strings(value: Any) -> list[str]:
    items = value if isinstance(value, list) else ([] if value is None else [value])
    return [str(v) for v in items if v is not None and str(v).strip()]


def align(doc: Doc, values: Mapping[str, Sequence[str]], tags: TagSet) -> tuple[list[int], int]:
    """The BIO tags of ``doc``'s tokens for the teacher's ``values``, and how many values
    could not be placed on token boundaries (not found, or inside a token)."""
    starts = {s: k for k, (s, _) in enumerate(doc.spans)}
    ends = {e: k for k, (_, e) in enumerate(doc.spans)}
    folded = doc.text.casefold()
    same_length = len(folded) == len(doc.text)
    candidates, missed = [], 0
    for number, name in enumerate(tags.fields):
        for value in dict.fromkeys(values.get(name, ())):
            if same_length:  # casefolded: "Apple Watch" also tags "apple watch"
                placed = _occurrences(folded, value.casefold())
            else:
                placed = _occurrences(doc.text, value)
            width = len(value.strip())
            spans = [
                (starts[s], ends[s + width], number)
                for s in placed
                if s in starts and s + width in ends
            ]
            missed += not spans
            candidates.extend(spans)
    labels = [0] * len(doc.spans)
    # The longer span first, then the earlier: a product inside an organization's name
    # does not cut the name in two.
    for first, last, number in sorted(candidates, key=lambda c: (c[0] - c[1], c[0])):
        if any(labels[first : last + 1]):
            continue
        labels[first] = tags.begin(number)
        for k in range(first + 1, last + 1):
            labels[k] = tags.inside(number)
    return labels, missed


def _occurrences(text: str, value: str) -> list[int]:
    needle = value.strip()
    if not needle:
        return []
    found, at = [], text.find(needle)
    while at >= 0:
        found.append(at)
        at = text.find(needle, at + 1)
    return found


class TaggerStudent:
    """The trained tagger with what it needs to answer: featurizer, tags, field limits."""

    def __init__(
        self, model: TagScorer, featurizer: Featurizer, fields: Mapping[str, FieldLimits]
    ) -> None:
        self.model = model
        self.featurizer = featurizer
        self.fields = dict(fields)
        self.tags = TagSet(list(fields))
        self.follow, self.start = allowed_transitions(self.tags)

    def predict(self, texts: Sequence[str], batch: int = 64) -> list[dict[str, list[str]]]:
        """The answer for each text: every field, its values as written in the text."""
        return [self.decode(doc, probs) for doc, probs in self.log_probs(texts, batch)]

    def log_probs(self, texts: Sequence[str], batch: int = 64) -> list[tuple[Doc, np.ndarray]]:
        """Each document with its tokens' tag log-probabilities (on the CPU, in order)."""
        docs = [self.featurizer.doc(t) for t in texts]
        order = sorted(range(len(docs)), key=lambda k: len(docs[k].spans))
        out: list[Any] = [None] * len(docs)
        where = next(self.model.parameters()).device
        self.model.eval()
        with torch.inference_mode():
            for begin in range(0, len(order), batch):
                chunk = order[begin : begin + batch]
                rows, mask = pad_rows([docs[k] for k in chunk], where)
                scores = functional.log_softmax(self.model(rows, mask), dim=-1).float().cpu()
                for row, k in enumerate(chunk):
                    out[k] = (docs[k], scores[row, : len(docs[k].spans)].numpy())
        return out

    def decode(self, doc: Doc, log_probs: np.ndarray) -> dict[str, list[str]]:
        """The constrained Viterbi path read back into the fields' values."""
        path = viterbi(log_probs, self.follow, self.start)
        answer: dict[str, list[str]] = {name: [] for name in self.fields}
        k = 0
        while k < len(path):
            tag = path[k]
            if tag == 0 or tag % 2 == 0:  # O, or an I- the constraint makes unreachable
                k += 1
                continue
            number = (tag - 1) // 2
            end = k
            while end + 1 < len(path) and path[end + 1] == self.tags.inside(number):
                end += 1
            name = self.tags.fields[number]
            value = doc.text[doc.spans[k][0] : doc.spans[end][1]]
            limits = self.fields[name]
            fits = limits.max_length is None or len(value) <= limits.max_length
            room = limits.max_items is None or len(answer[name]) < limits.max_items
            if fits and room and value not in answer[name]:
                answer[name].append(value)
            k = end + 1
        return answer


def _held_out(example: TagExample, config: TaggerConfig) -> bool:
    if example.split is not None:
        return example.split != "train"
    return split_of(example.external_id, config.val_share) == "val"


def fit_tagger(
    examples: Sequence[TagExample],
    fields: Mapping[str, FieldLimits],
    config: TaggerConfig,
    *,
    slice_margin: float = DEFAULT_SLICE_MARGIN,
    min_recall: Mapping[str, float] | None = None,
) -> tuple[TaggerStudent, dict[str, Any]]:
    """Train on the accepted teacher answers of the train split; evaluate on the test split
    (the held-out documents when there is none) by slice; keep both in memory."""
    train = [e for e in examples if not _held_out(e, config) and e.accepted]
    held = [e for e in examples if _held_out(e, config)]
    if len(train) < MIN_TRAIN_DOCS:
        raise ValueError(
            f"only {len(train)} accepted teacher answers in the train split; the tagger needs "
            f"at least {MIN_TRAIN_DOCS}. Label more documents with the teacher and train again."
        )
    torch.manual_seed(config.seed)
    where = device()
    with threads(config.threads):
        started = time.perf_counter()
        student = _build(config, fields)
        featurizer, tags, model = student.featurizer, student.tags, student.model
        docs = [featurizer.doc(e.text) for e in train]
        aligned = [align(d, e.teacher or {}, tags) for d, e in zip(docs, train, strict=True)]
        placed = sum(sum(len(set(v)) for v in (e.teacher or {}).values()) for e in train)
        missed = sum(m for _, m in aligned)
        watched = [e for e in held if e.split in (None, "val") and e.teacher is not None]
        loss, history = _optimize(
            student, docs, [a for a, _ in aligned], train, config, where, watched
        )
        trained = time.perf_counter()
        model.to(torch.device("cpu"))
        tested = [e for e in held if e.split == "test"]
        evaluated_on = "test" if tested else "held-out"
        tested = tested or held
        answers = student.predict([e.text for e in tested])
        latency = measure_latency(student.predict, [e.text for e in (tested or train)])
    scored = [
        TagScored(a, e.teacher, e.gold, e.slices) for a, e in zip(answers, tested, strict=True)
    ]
    by_slice = evaluate_extraction(scored, list(fields), margin=slice_margin, min_recall=min_recall)
    report = {
        "kind": "tagger",
        "n_train": len(train),
        "n_val": len(held),
        "evaluated_on": evaluated_on,
        "n_evaluated": len(tested),
        **by_slice,
        "headline": extraction_headline(by_slice["overall"], by_slice["evaluated_against"]),
        "alignment": {"values": placed, "not_on_tokens": missed},
        "latency_ms": latency,
        "size_bytes": sum(t.numel() * t.element_size() for t in model.state_dict().values()),
        "history": history,
        "config": config.as_dict(),
        "final_loss": loss,
        "train_seconds": round(trained - started, 4),
        "device": where.type,
        "fields": list(fields),
    }
    return student, report


def _optimize(
    student: TaggerStudent,
    docs: Sequence[Doc],
    labels: Sequence[list[int]],
    train: Sequence[TagExample],
    config: TaggerConfig,
    where: torch.device,
    watched: Sequence[TagExample],
) -> tuple[float, list[dict[str, Any]]]:
    """Adam on the weighted per-token cross-entropy, its rate falling linearly to a tenth;
    batches of about ``batch_tokens`` tokens of similar-length documents. The epoch with
    the best val F1 against the teacher is kept (the last one without val documents)."""
    model = student.model.to(where)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    batches = _batches(docs, config.batch_tokens)
    total = config.epochs * len(batches)
    step, history, epoch_loss = 0, [], 0.0
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    fields = list(student.fields)
    for epoch in range(1, config.epochs + 1):
        model.train()
        epoch_loss, tokens = 0.0, 0
        for index in torch.randperm(len(batches), generator=generator).tolist():
            members = batches[index]
            for group in optimizer.param_groups:
                group["lr"] = config.lr * (1.0 - 0.9 * step / total)
            rows, mask = pad_rows([docs[k] for k in members], where)
            target = torch.zeros(mask.shape, dtype=torch.long)
            weight = torch.zeros(mask.shape)
            for row, k in enumerate(members):
                target[row, : len(labels[k])] = torch.tensor(labels[k], dtype=torch.long)
                weight[row, : len(labels[k])] = float(train[k].weight)
            scores = model(rows, mask)
            each = functional.cross_entropy(
                scores.flatten(0, 1), target.flatten().to(where), reduction="none"
            )
            weight = weight.flatten().to(where)
            loss = (each * weight).sum() / weight.sum().clamp(min=1e-12)
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            epoch_loss += float(loss.item()) * int(mask.sum())
            tokens += int(mask.sum())
            step += 1
        val = _val_f1(student, watched, fields)
        history.append({"epoch": epoch, "loss": round(epoch_loss / max(tokens, 1), 6), "val": val})
        if val is not None and (best is None or val > best[0]):
            best = (val, copy.deepcopy(model.state_dict()))
    if best is not None:
        model.load_state_dict(best[1])
    return round(epoch_loss / max(tokens, 1), 6), history


def _val_f1(
    student: TaggerStudent, watched: Sequence[TagExample], fields: Sequence[str]
) -> float | None:
    if not watched:
        return None
    answers = student.predict([e.text for e in watched])
    scored = [TagScored(a, e.teacher, None) for a, e in zip(answers, watched, strict=True)]
    value = evaluate_extraction(scored, fields)["overall"]["vs_teacher_f1"]
    return None if value is None else float(value)


def _batches(docs: Sequence[Doc], batch_tokens: int) -> list[list[int]]:
    # Documents of similar length together, so padding costs little.
    order = sorted(range(len(docs)), key=lambda k: len(docs[k].spans))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for k in order:
        size = max(len(docs[k].spans), 1)
        if current and max(longest, size) * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(k)
        longest = max(longest, size)
    if current:
        batches.append(current)
    return batches


def save_tagger(
    student: TaggerStudent, config: TaggerConfig, report: Mapping[str, Any], out_dir: Path
) -> None:
    """Write the weights, settings and metrics :func:`load_tagger` reads."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in student.model.state_dict().items()}
    save_file(tensors, str(out_dir / MODEL_FILE), metadata={"format": FORMAT})
    settings = {
        "format": FORMAT,
        "config": config.as_dict(),
        # A list: the fields' order is the tags' order.
        "fields": [
            {"name": name, "max_items": limits.max_items, "max_length": limits.max_length}
            for name, limits in student.fields.items()
        ],
    }
    write_json(out_dir / CONFIG_FILE, settings)
    write_json(out_dir / METRICS_FILE, dict(report))


def load_tagger(out_dir: Path) -> TaggerStudent:
    """Load a tagger written by :func:`save_tagger`, on the CPU."""
    settings = read_settings(out_dir, FORMAT, (MODEL_FILE, CONFIG_FILE), "tagger")
    config = TaggerConfig.from_dict(settings["config"])
    fields = {
        str(limits["name"]): FieldLimits(limits.get("max_items"), limits.get("max_length"))
        for limits in settings["fields"]
    }
    student = _build(config, fields)
    student.model.load_state_dict(load_file(str(out_dir / MODEL_FILE)))
    return student


def _build(config: TaggerConfig, fields: Mapping[str, FieldLimits]) -> TaggerStudent:
    """An untrained tagger of ``config``'s shape for ``fields``."""
    tags = TagSet(list(fields))
    model = TagScorer(
        config.rows,
        config.dim,
        config.width,
        config.depth,
        config.window,
        len(tags),
        config.dropout,
    )
    return TaggerStudent(model, Featurizer(config.rows, config.max_tokens), fields)
