"""The report's ``overall.ranking``: order quality of accepted and raw rankings, from stored rows.

Expected figures are worked out by hand from the definitions (Kendall's tau over pairs,
NDCG@5 with gains ``2**rel - 1`` and ``log2(i + 2)`` discounts), not with the code under test.
"""

from __future__ import annotations

from math import log2
from typing import Any

import pytest

from storage.models import Verdict
from storage.training import ReportRow
from workers.report import build_report
from workers.spec import is_withheld, load_spec

# Graded relevance as examples/ranking.py stores it: own article 2, same topic 1, other 0.
GRADES = {"a": 2, "b": 1, "c": 1, "d": 0, "e": 0, "f": 0}
WITHHELD_ID = "rank/q12"


def _row(external_id: str, order: list[str] | None, verdict: Verdict, known: Any) -> ReportRow:
    return ReportRow(
        external_id=external_id,
        slices={"topic": "business"},
        output=None if order is None else {"ranking": order},
        verdict=verdict,
        reasons=[] if verdict == Verdict.ACCEPTED else ["known_good_mismatch:ranking"],
        known_good={"ranking": known},
    )


def _rows() -> list[ReportRow]:
    return [
        _row("rank/q4", ["a", "b", "c", "d", "e", "f"], Verdict.ACCEPTED, GRADES),
        # The own article second: one discordant pair of 15.
        _row("rank/q2", ["b", "a", "c", "d", "e", "f"], Verdict.REJECTED, GRADES),
        # No parsed answer: no ordering to score.
        _row("rank/q3", None, Verdict.REJECTED, GRADES),
        # Withheld from the checks (and so from the scores), however bad.
        _row(WITHHELD_ID, ["f", "e", "d", "c", "b", "a"], Verdict.ACCEPTED, GRADES),
    ]


def test_ranking_scores_accepted_and_raw_labels_against_graded_relevance() -> None:
    share = load_spec("ranking").checks["withhold_share"]
    assert is_withheld(WITHHELD_ID, share)
    assert not any(is_withheld(f"rank/q{i}", share) for i in (4, 2, 3))

    ranking = build_report(load_spec("ranking"), _rows())["overall"]["ranking"]

    ideal = 3 + 1 / log2(3) + 1 / log2(4)
    swapped = (1 + 3 / log2(3) + 1 / log2(4)) / ideal
    assert ranking["accepted"] == {
        "ranking": {"count": 1, "mean_tau": 1.0, "top1_agreement": 1.0, "mean_ndcg": 1.0, "k": 5}
    }
    raw = ranking["raw"]["ranking"]
    assert raw["count"] == 2
    # q2 swaps a (grade 2) and b (grade 1): 10 pairs right, 1 wrong, of the 11 the grades
    # order (b-c and the three among d, e, f are ties, counted neither way).
    assert raw["mean_tau"] == pytest.approx((1 + 9 / 11) / 2, abs=1e-4)
    assert raw["top1_agreement"] == 0.5
    assert raw["mean_ndcg"] == pytest.approx((1 + swapped) / 2, abs=1e-4)


def test_ranking_reads_a_bare_known_good_order_with_top_k_grades() -> None:
    rows = [_row("rank/q4", ["a", "c", "b"], Verdict.REJECTED, ["a", "b", "c"])]

    raw = build_report(load_spec("ranking"), rows)["overall"]["ranking"]["raw"]["ranking"]

    # Grades 5, 4, 3 for the reference's top three; c and b swapped: tau (2 - 1) / 3.
    ideal = 31 + 15 / log2(3) + 7 / log2(4)
    assert raw["mean_tau"] == pytest.approx(1 / 3, abs=1e-4)
    assert raw["top1_agreement"] == 1.0
    assert raw["mean_ndcg"] == pytest.approx((31 + 7 / log2(3) + 15 / log2(4)) / ideal, abs=1e-4)


def test_swapping_equally_graded_candidates_costs_nothing() -> None:
    rows = [_row("rank/q4", ["a", "c", "b", "f", "e", "d"], Verdict.ACCEPTED, GRADES)]

    accepted = build_report(load_spec("ranking"), rows)["overall"]["ranking"]["accepted"]

    assert accepted["ranking"]["mean_tau"] == 1.0  # b-c and d-e-f are ties in the grades


def test_ranking_tie_order_does_not_depend_on_stored_key_order() -> None:
    shuffled = {"f": 0, "c": 1, "e": 0, "a": 2, "d": 0, "b": 1}
    rows = [_row("rank/q4", ["a", "b", "c", "d", "e", "f"], Verdict.ACCEPTED, shuffled)]

    accepted = build_report(load_spec("ranking"), rows)["overall"]["ranking"]["accepted"]

    assert accepted["ranking"]["mean_tau"] == 1.0


def test_specs_without_a_ranking_field_keep_the_report_shape() -> None:
    row = ReportRow("bbc/x", {}, {"label": "sport"}, Verdict.ACCEPTED, [], {"label": "sport"})

    overall = build_report(load_spec("triage"), [row])["overall"]

    assert "ranking" not in overall
    assert overall["fields"] == {}
