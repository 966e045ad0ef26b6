"""Train the ranking student on the teacher's accepted orderings and compare it with the teacher.

The student learns pairwise (RankNet): for every pair of candidates the teacher ordered, i
above j, the loss is ``softplus(s_j - s_i)``, optionally weighted by how much the two
places matter to NDCG (LambdaRank's weights, from the teacher's places). The teacher's
absolute scores are never a target, so a student slightly off on scores can still be right
on order. It is measured on the test split (the held-out items when there is none) by slice:
NDCG@k, top-1 and Kendall's tau-b against the known-good grades and against the teacher,
beside the teacher's own figures (:mod:`student_train.rank_metrics`).

It trains on the CPU (a few seconds for 1,500 BBC queries); its latency is measured on the
CPU, one query with its candidates at a time, as a router asks.
"""

from __future__ import annotations

import math
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
from student_train.bag import RowAdagrad
from student_train.data import split_of
from student_train.evaluate import DEFAULT_SLICE_MARGIN
from student_train.rank_features import RankingInput, TermStats, parse_ranking_text
from student_train.rank_metrics import RankScored, evaluate_ranking, ranking_headline
from student_train.rank_model import PairBatch, PairScorer, Prepared, RankingStudent
from student_train.runtime import Settings, read_settings, threads, write_json
from student_train.runtime import latency as measure_latency

__all__ = [
    "DEFAULT_K",
    "FORMAT",
    "MIN_TRAIN_QUERIES",
    "RankingConfig",
    "RankingExample",
    "examples_from_rows",
    "fit_ranking",
    "load_ranking",
    "ranking_k",
    "save_ranking",
]

FORMAT = "stillhouse-student/ranking/1"
DEFAULT_K = 5
MIN_TRAIN_QUERIES = 10
MODEL_FILE, CONFIG_FILE, METRICS_FILE = "model.safetensors", "config.json", "metrics.json"
_WEIGHTINGS = ("uniform", "lambda")


@dataclass(frozen=True)
class RankingConfig(Settings):
    """Hyperparameters of one ranking run (defaults reach the teacher on BBC on a CPU)."""

    epochs: int = 4
    buckets: int = 65_536  # hashed word and bigram rows of the query/candidate encoder
    dim: int = 32
    hidden: int = 16  # units of the lexical MLP's hidden layer; 0: a linear layer
    lr: float = 0.1
    batch_queries: int = 32
    pair_weighting: str = "uniform"
    idf_buckets: int = 262_144
    max_tokens: int = 256
    dropout: float = 0.0
    weight_decay: float = 0.0
    val_share: float = 0.1
    seed: int = 0
    threads: int | None = None  # None: half the usable cores, 1 to 4 (see `runtime.threads`)

    def __post_init__(self) -> None:
        for name in ("epochs", "buckets", "dim", "batch_queries", "idf_buckets", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"RankingConfig.{name} must be a positive integer, got {getattr(self, name)}"
                )
        if self.buckets < 2 or self.idf_buckets < 2:
            raise ValueError("RankingConfig.buckets and idf_buckets must be at least 2")
        if self.hidden < 0:
            raise ValueError(f"RankingConfig.hidden must be 0 or more, got {self.hidden}")
        if self.lr <= 0:
            raise ValueError(f"RankingConfig.lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(
                f"RankingConfig.weight_decay must be 0 or more, got {self.weight_decay}"
            )
        if self.pair_weighting not in _WEIGHTINGS:
            raise ValueError(
                f"RankingConfig.pair_weighting must be one of {', '.join(_WEIGHTINGS)}, "
                f"got {self.pair_weighting!r}"
            )
        if not 0.0 <= self.val_share < 1.0:
            raise ValueError(f"RankingConfig.val_share must be in [0, 1), got {self.val_share}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"RankingConfig.dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True, slots=True)
class RankingExample:
    """One query of a dataset: its candidates, the teacher's order (None: no usable answer),
    the known-good grades (None: no record), and how the dataset holds it."""

    item_id: int
    external_id: str
    query: RankingInput
    teacher: tuple[str, ...] | None
    relevance: Mapping[str, float] | None = None
    accepted: bool = True
    split: str | None = None  # a dataset's split; None: split by hash with val_share
    weight: float = 1.0
    slices: Mapping[str, str] = field(default_factory=dict)


def _ranking_rule(spec_body: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]] | None:
    """The spec's known-good field compared as a ranking, and its rule."""
    for name, rule in (spec_body.get("known_good") or {}).items():
        if isinstance(rule, Mapping) and rule.get("compare") == "ranking":
            return str(name), rule
    return None


def ranking_k(spec_body: Mapping[str, Any]) -> int:
    """The NDCG cut-off the spec's known-good ranking rule names (``k``), else 5."""
    found = _ranking_rule(spec_body)
    return int(found[1].get("k", DEFAULT_K)) if found else DEFAULT_K


def examples_from_rows(
    rows: Sequence[DatasetRow], spec_body: Mapping[str, Any]
) -> list[RankingExample]:
    """The queries of a frozen dataset; a row whose text holds no query or no candidate
    (and whose payload has neither) cannot be ranked and is left out."""
    found = _ranking_rule(spec_body)
    names = [found[0], str(found[1].get("source", ""))] if found else []
    examples = []
    for row in rows:
        parsed = _parsed(row)
        if parsed is None:
            continue
        examples.append(
            RankingExample(
                item_id=row.item_id,
                external_id=row.external_id,
                query=parsed,
                teacher=_teacher_order(row.output, parsed),
                relevance=_relevance(row.known_good, [*names, "relevance"]),
                accepted=row.verdict == Verdict.ACCEPTED,
                split=row.split,
                weight=float(row.weight),
                slices={k: str(v) for k, v in row.slices.items() if v is not None},
            )
        )
    return examples


def _parsed(row: DatasetRow) -> RankingInput | None:
    # The rendered text is what the teacher saw; the payload keeps the fields only when the
    # spec's template did not render them (ingest stores rendered fields once, in the text).
    parsed = parse_ranking_text(row.text)
    if parsed is None and row.payload.get("query") and row.payload.get("candidates"):
        markup = f"<query>{row.payload['query']}</query>\n{row.payload['candidates']}"
        parsed = parse_ranking_text(markup)
    return parsed


def _teacher_order(output: Mapping[str, Any] | None, query: RankingInput) -> tuple[str, ...] | None:
    ranking = output.get("ranking") if isinstance(output, Mapping) else None
    if not isinstance(ranking, list):
        return None
    known = {i for i, _ in query.candidates}
    order = tuple(dict.fromkeys(str(i) for i in ranking if str(i) in known))
    return order or None


def _relevance(
    known_good: Mapping[str, Any] | None, names: Sequence[str]
) -> dict[str, float] | None:
    for name in names:
        grades = (known_good or {}).get(name)
        if isinstance(grades, Mapping) and grades:
            return {str(k): float(v) for k, v in grades.items()}
    return None


def _held_out(example: RankingExample, config: RankingConfig) -> bool:
    if example.split is not None:
        return example.split != "train"
    return split_of(example.external_id, config.val_share) == "val"


def fit_ranking(
    examples: Sequence[RankingExample],
    config: RankingConfig,
    *,
    slice_margin: float = DEFAULT_SLICE_MARGIN,
    k: int = DEFAULT_K,
) -> tuple[RankingStudent, dict[str, Any]]:
    """Train on the accepted teacher orderings of the train split, evaluate on the test split
    (the held-out queries when there is none) by slice with NDCG@``k``; keep both in memory."""
    train = [e for e in examples if not _held_out(e, config) and e.accepted and e.teacher]
    held = [e for e in examples if _held_out(e, config)]
    _check_train(train, config)
    torch.manual_seed(config.seed)
    # On the CPU even where a GPU is present: the shared embedding bag's backward
    # (student_train.bag) builds its index tensors on the CPU, and a few-second job over
    # six-candidate queries would spend a GPU's time in transfers and launches.
    where = torch.device("cpu")
    with threads(config.threads):
        started = time.perf_counter()
        stats = TermStats.fit((t for e in train for _, t in e.query.candidates), config.idf_buckets)
        model = PairScorer(config.buckets, config.dim, config.hidden, config.dropout)
        student = RankingStudent(model, stats, buckets=config.buckets, max_tokens=config.max_tokens)
        prepared = [student.prepare(e.query) for e in train]
        watched = [e for e in held if e.split in (None, "val") and e.teacher]
        loss, history = _optimize(student, prepared, train, config, where, watched, k)
        trained = time.perf_counter()
        model.to(torch.device("cpu"))
        tested = [e for e in held if e.split == "test"]
        evaluated_on = "test" if tested else "held-out"
        tested = tested or held
        orders = [answer["ranking"] for answer in student.predict([e.query for e in tested])]
        latency = measure_latency(student.predict, [e.query for e in (tested or train)])
    scored = [
        RankScored(order, e.teacher, e.relevance, e.slices)
        for order, e in zip(orders, tested, strict=True)
    ]
    by_slice = evaluate_ranking(scored, k, margin=slice_margin)
    report = {
        "kind": "ranking",
        "n_train": len(train),
        "n_val": len(held),
        "evaluated_on": evaluated_on,
        "n_evaluated": len(tested),
        **by_slice,
        "headline": ranking_headline(by_slice["overall"]),
        "latency_ms": latency,
        "size_bytes": sum(t.numel() * t.element_size() for t in model.state_dict().values())
        + int(stats.df.nbytes),
        "history": history,
        "config": config.as_dict(),
        "final_loss": loss,
        "train_seconds": round(trained - started, 4),
        "k": k,
    }
    return student, report


def _check_train(train: Sequence[RankingExample], config: RankingConfig) -> None:
    if len(train) < MIN_TRAIN_QUERIES:
        raise ValueError(
            f"only {len(train)} accepted teacher orderings in the train split (after holding "
            f"out val and test, or {config.val_share:.0%} by hash); the ranking student needs "
            f"at least {MIN_TRAIN_QUERIES}. Label more queries with the teacher and train again."
        )


def _pairs(order: Sequence[str], ids: Sequence[str], weighting: str, k: int) -> torch.Tensor:
    """Rows ``(i, j, weight)`` for every pair the teacher ordered, i above j, as candidate
    positions; candidates the teacher left out rank below those it listed. With
    ``lambda`` weighting a pair weighs its NDCG change if swapped (gains from the teacher's
    places, k down to 1), scaled to a mean of 1 per query."""
    place = {item: p for p, item in enumerate(order)}
    ranked = sorted(range(len(ids)), key=lambda i: place.get(ids[i], len(order)))
    rows = []
    for a in range(len(ranked)):
        for b in range(a + 1, len(ranked)):
            i, j = ranked[a], ranked[b]
            if place.get(ids[i], len(order)) == place.get(ids[j], len(order)):
                continue  # both left out: the teacher did not order them
            weight = 1.0
            if weighting == "lambda":
                gain = 2.0 ** max(k - a, 0) - 2.0 ** max(k - b, 0)
                weight = gain * (1 / math.log2(a + 2) - 1 / math.log2(b + 2))
            rows.append((float(i), float(j), weight))
    table = torch.tensor(rows, dtype=torch.float32).reshape(-1, 3)
    if len(table):
        table[:, 2] = table[:, 2] / table[:, 2].mean().clamp(min=1e-12)
    return table


def _optimize(
    student: RankingStudent,
    prepared: Sequence[Prepared],
    train: Sequence[RankingExample],
    config: RankingConfig,
    where: torch.device,
    watched: Sequence[RankingExample],
    k: int,
) -> tuple[float, list[dict[str, Any]]]:
    """Row-wise Adagrad on the weighted RankNet loss, its rate falling linearly to zero; the
    last epoch's mean loss and, per epoch, its loss and the val NDCG@k against the teacher."""
    model = student.model
    model.fit_scaling(torch.from_numpy(np.concatenate([p.features for p in prepared])))
    model.to(where)
    pairs = [
        _pairs(e.teacher or (), p.ids, config.pair_weighting, k) * torch.tensor([1, 1, e.weight])
        for e, p in zip(train, prepared, strict=True)
    ]
    optimizer = RowAdagrad(
        [
            {"params": model.encoder.embedding.parameters()},
            {
                "params": [
                    *model.encoder.linear.parameters(),
                    *model.lexical.parameters(),
                    model.feedback,
                ],
                "weight_decay": config.weight_decay,
            },
        ],
        lr=config.lr,
    )
    watch = _Watch(student, watched, k)
    generator = torch.Generator().manual_seed(config.seed)
    total = config.epochs * math.ceil(len(prepared) / config.batch_queries)
    step, history, epoch_loss = 0, [], 0.0
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = torch.randperm(len(prepared), generator=generator).tolist()
        epoch_loss = 0.0
        for start in range(0, len(order), config.batch_queries):
            batch = order[start : start + config.batch_queries]
            for group in optimizer.param_groups:
                group["lr"] = config.lr * (1.0 - step / total)
            loss = _batch_loss(
                model, [prepared[i] for i in batch], [pairs[i] for i in batch], where
            )
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            epoch_loss += loss.item() * len(batch)
            step += 1
        model.eval()
        history.append(
            {"epoch": epoch, "loss": round(epoch_loss / len(prepared), 6), "val": watch()}
        )
    return round(epoch_loss / len(prepared), 6), history


def _batch_loss(
    model: PairScorer,
    queries: Sequence[Prepared],
    pairs: Sequence[torch.Tensor],
    where: torch.device,
) -> torch.Tensor:
    """The weighted mean of ``softplus(s_j - s_i)`` over the batch's ordered pairs."""
    scores = model(PairBatch.of(queries, where))
    offsets = np.cumsum([0, *(len(q.candidates) for q in queries[:-1])])
    table = torch.cat([p + torch.tensor([o, o, 0.0]) for p, o in zip(pairs, offsets, strict=True)])
    table = table.to(where)
    above, below = table[:, 0].long(), table[:, 1].long()
    each = functional.softplus(scores[below] - scores[above])
    return (each * table[:, 2]).sum() / table[:, 2].sum().clamp(min=1e-12)


class _Watch:
    """After each epoch: the mean NDCG@k of the student's orders against the teacher's on
    the val split (the learning curve's second line); None without val orderings."""

    def __init__(self, student: RankingStudent, watched: Sequence[RankingExample], k: int) -> None:
        self.student = student
        self.k = k
        self.watched = list(watched)
        self.prepared = [student.prepare(e.query) for e in self.watched]

    def __call__(self) -> float | None:
        if not self.watched:
            return None
        scored = [
            RankScored([p.ids[i] for i in np.argsort(-s, kind="stable")], e.teacher, None)
            for p, s, e in zip(
                self.prepared, self.student.scores_of(self.prepared), self.watched, strict=True
            )
        ]
        overall = evaluate_ranking(scored, self.k)["overall"]
        return overall["vs_teacher_ndcg"]  # type: ignore[no-any-return]


def save_ranking(
    student: RankingStudent, config: RankingConfig, report: Mapping[str, Any], out_dir: Path
) -> None:
    """Write the weights and term counts, settings and metrics :func:`load_ranking` reads."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"model.{k}": v.detach().cpu().contiguous() for k, v in student.model.state_dict().items()
    }
    tensors["term_df"] = torch.from_numpy(student.stats.df.copy())
    save_file(tensors, str(out_dir / MODEL_FILE), metadata={"format": FORMAT})
    settings = {
        "format": FORMAT,
        "config": config.as_dict(),
        "bags": {"buckets": student.buckets, "max_tokens": student.max_tokens},
        "terms": {"n_docs": student.stats.n_docs, "avg_len": student.stats.avg_len},
    }
    write_json(out_dir / CONFIG_FILE, settings)
    write_json(out_dir / METRICS_FILE, dict(report))


def load_ranking(out_dir: Path) -> RankingStudent:
    """Load a student written by :func:`save_ranking`, on the CPU."""
    settings = read_settings(out_dir, FORMAT, (MODEL_FILE, CONFIG_FILE), "ranking student")
    config = RankingConfig.from_dict(settings["config"])
    bags = settings["bags"]
    tensors = load_file(str(out_dir / MODEL_FILE))
    model = PairScorer(int(bags["buckets"]), config.dim, config.hidden, config.dropout)
    model.load_state_dict(
        {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    )
    terms = settings["terms"]
    stats = TermStats(tensors["term_df"].numpy(), int(terms["n_docs"]), float(terms["avg_len"]))
    return RankingStudent(
        model, stats, buckets=int(bags["buckets"]), max_tokens=int(bags["max_tokens"])
    )
