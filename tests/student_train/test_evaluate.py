"""The student's evaluation by slice, against figures worked out by hand."""

from __future__ import annotations

import math

import pytest

from student_train.evaluate import Scored, evaluate, macro_f1, wilson

CLASSES = ["a", "b", "c"]


def _items() -> list[Scored]:
    # Region eu: 4 items, the student right on 3; region us: 4 items, right on 2.
    # The teacher is right on all 8 but one (us, item 8).
    rows = [
        ("a", "a", "a", "eu"),
        ("a", "a", "a", "eu"),
        ("b", "b", "b", "eu"),
        ("a", "b", "b", "eu"),  # student wrong
        ("c", "c", "c", "us"),
        ("a", "c", "c", "us"),  # student wrong
        ("a", "b", "b", "us"),  # student wrong
        ("c", "a", "c", "us"),  # teacher wrong, student right
    ]
    return [Scored(s, t, k, {"region": r}) for s, t, k, r in rows]


def test_wilson_matches_its_formula() -> None:
    z = 1.959964
    p, n = 0.75, 4
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert wilson(3, 4) == [round(centre - half, 6), round(centre + half, 6)]
    assert wilson(0, 0) is None


def test_macro_f1_by_hand() -> None:
    pairs = [("a", "a"), ("a", "b"), ("b", "b"), ("c", "b")]
    # a: tp 1, fp 1, fn 0 -> 2/3; b: tp 1, fp 0, fn 2 -> 2/4; c: tp 0, fp 1 -> 0
    assert macro_f1(pairs, CLASSES) == pytest.approx(round((2 / 3 + 0.5 + 0) / 3, 6))
    assert macro_f1([("a", "a")], CLASSES) == 1.0  # b and c never seen: left out


def test_slices_and_classes_are_scored_and_the_weak_ones_flagged() -> None:
    result = evaluate(_items(), CLASSES, margin=0.1, min_recall={"b": 0.9})
    overall = result["overall"]
    assert overall["student_accuracy"] == 0.625 and overall["teacher_accuracy"] == 0.875
    assert overall["retention"] == pytest.approx(round(0.625 / 0.875, 6))
    assert overall["agreement"] == 0.5 and overall["with_record"] == 8
    assert overall["student_interval"] == wilson(5, 8)
    eu, us = result["slices"]["region=eu"], result["slices"]["region=us"]
    assert (eu["student_accuracy"], us["student_accuracy"]) == (0.75, 0.5)
    # By known-good class, accuracy is recall: of b's three records, the student found one.
    assert result["slices"]["class=b"]["student_accuracy"] == pytest.approx(1 / 3)
    assert set(result["slices"]) == {"region=eu", "region=us", "class=a", "class=b", "class=c"}
    flagged = {(f["slice"], f["why"].split(" ")[0]) for f in result["flagged"]}
    # us is 12.5 points below 62.5 %; class b's recall 33 % is below 90 % (and the margin).
    assert ("region=us", "50.0%") in flagged
    assert ("class=b", "recall") in flagged and ("class=b", "33.3%") in flagged
    assert not any(f["slice"] == "region=eu" for f in result["flagged"])


def test_a_minimum_for_an_unknown_or_unmeasured_class_says_so() -> None:
    with pytest.raises(ValueError, match=r"student\.min_recall names zz: not a class"):
        evaluate(_items(), CLASSES, min_recall={"zz": 0.5})
    no_c = [i for i in _items() if i.known_good != "c"]
    result = evaluate(no_c, CLASSES, margin=1.0, min_recall={"c": 0.5})
    assert [f["slice"] for f in result["flagged"]] == ["class=c"]
    assert "cannot be measured" in result["flagged"][0]["why"]


def test_without_records_the_slices_are_measured_against_the_teacher() -> None:
    from student_train.data import Example
    from student_train.evaluate import scored_items

    held = [
        Example(i, f"t{i}", "text", label, split="test")
        for i, label in enumerate(["hate", "hate", "ok", "ok"])
    ]
    items, evaluated_on, against = scored_items(["hate", "ok", "ok", "ok"], held)
    assert (evaluated_on, against) == ("test", "teacher")
    result = evaluate(items, ["hate", "ok"], min_recall={"hate": 0.9})
    # Half of what the teacher called hate the student finds: flagged below its minimum.
    assert result["slices"]["class=hate"]["student_accuracy"] == 0.5
    assert [f["slice"] for f in result["flagged"] if "min_recall" in f["why"]] == ["class=hate"]
    with_record = [*held[:3], Example(9, "t9", "text", "ok", known_good="ok", split="test")]
    assert scored_items(["hate", "ok", "ok", "ok"], with_record)[2] == "records"
