"""The advisor's arithmetic and its recommendations (``workers.advice``)."""

from __future__ import annotations

import math

import pytest

from workers.advice import DAYS_PER_MONTH, Measured, Stated, advise, entropy_bits

STATED = Stated()
TRAINED = Measured(
    spec="triage",
    teacher_usd_per_item=0.0001,
    items_labeled=2000,
    classes=5,
    label_counts={
        "business": 500,
        "sport": 500,
        "tech": 400,
        "politics": 400,
        "entertainment": 200,
    },
    measurable_share=1.0,
    run="triage-v1-1",
    student_kind="bag_of_ngrams",
    student_accuracy=0.95,
    teacher_accuracy=0.85,
    routed_accuracy=0.95,
    fallback_share=0.1,
)


def test_fixed_monthly_cost_is_hosting_upkeep_and_the_amortized_build() -> None:
    assert STATED.fixed_monthly_usd() == pytest.approx(60 + 8 * 100 + 40 * 100 / 12)


def test_high_volume_distills_and_the_break_even_is_where_the_costs_meet() -> None:
    result = advise(TRAINED, STATED, 2_000_000)
    assert result["recommendation"] == "distill"
    assert result["monthly_cost_teacher_usd"] == pytest.approx(2_000_000 * 30 * 0.0001)
    fixed = STATED.fixed_monthly_usd()
    assert result["monthly_cost_student_usd"] == pytest.approx(
        fixed + 2_000_000 * 30 * 0.1 * 0.0001, abs=0.01
    )
    even = result["break_even_per_day"]
    assert even == math.ceil(fixed / (DAYS_PER_MONTH * 0.0001 * 0.9))
    # At the break-even volume the two monthly costs are the same.
    at = advise(TRAINED, STATED, fixed / (DAYS_PER_MONTH * 0.0001 * 0.9))
    assert at["monthly_cost_teacher_usd"] == pytest.approx(at["monthly_cost_student_usd"], abs=0.02)
    assert result["quality_delta"] == pytest.approx(0.10)
    assert any("break-even" in reason for reason in result["reasons"])


def test_low_volume_keeps_the_teacher_even_with_a_good_student() -> None:
    result = advise(TRAINED, STATED, 30)
    assert result["recommendation"] == "do_nothing"
    assert result["monthly_cost_teacher_usd"] < result["monthly_fixed_student_usd"]
    assert "keep calling the teacher" in result["reasons"][0]


def test_a_broad_task_at_a_few_dozen_calls_a_day_needs_no_student_to_say_so() -> None:
    broad = Measured(spec="support", teacher_usd_per_item=0.03, classes=120)
    result = advise(broad, STATED, 40)  # $36 a month of teacher calls
    assert result["recommendation"] == "do_nothing" and result["monthly_cost_teacher_usd"] == 36.0
    assert result["task"]["narrowness"] < 0.1


def test_without_a_student_it_says_what_it_needs() -> None:
    untrained = Measured(spec="triage", teacher_usd_per_item=0.0001, classes=5)
    result = advise(untrained, STATED, 2_000_000)
    assert result["recommendation"] == "not_yet"
    assert "stillhouse train --spec triage" in result["missing"][0]
    assert result["monthly_cost_teacher_usd"] == pytest.approx(6000.0)


def test_a_student_too_far_below_the_teacher_is_not_yet() -> None:
    worse = Measured(**{**TRAINED.__dict__, "routed_accuracy": 0.80})
    result = advise(worse, STATED, 2_000_000)
    assert result["recommendation"] == "not_yet"
    assert "5.0 points below" in result["missing"][0]


def test_a_student_that_sends_almost_everything_back_does_not_pay() -> None:
    timid = Measured(**{**TRAINED.__dict__, "fallback_share": 0.999})
    result = advise(timid, STATED, 400_000)
    assert result["recommendation"] == "do_nothing"


def test_no_ledger_yet_is_not_yet_with_how_to_measure_it() -> None:
    result = advise(Measured(spec="triage", classes=5), STATED, 1000)
    assert result["recommendation"] == "not_yet" and "backfill" in result["missing"][0]


def test_volume_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive number of inputs a day"):
        advise(TRAINED, STATED, 0)


def test_entropy_bits() -> None:
    assert entropy_bits({"a": 5, "b": 5}) == pytest.approx(1.0)
    assert entropy_bits({"a": 10}) == 0.0
    assert entropy_bits({}) is None
