"""Calibration of a teacher's signal against known-good records: the isotonic fit, the
coverage curve, a threshold chosen by its lower bound, and the estimate for items without a
record, checked on data whose truth is known."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from workers.calibration import curve, estimate, isotonic, threshold_for, wilson


def draws(n: int, seed: int) -> tuple[list[float], list[bool]]:
    """Scores uniform in [0.3, 1); a label is right with probability equal to its score."""
    rng = random.Random(seed)
    scores = [round(rng.uniform(0.3, 1.0), 3) for _ in range(n)]
    return scores, [rng.random() < s for s in scores]


def test_wilson_matches_the_textbook_values() -> None:
    low, high = wilson(90, 100)
    assert (round(low, 3), round(high, 3)) == (0.826, 0.945)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0
    assert wilson(0, 0) == (0.0, 1.0)


def test_isotonic_pools_the_violators_and_shares_ties() -> None:
    fit = isotonic([0.1, 0.2, 0.3, 0.4, 0.4, 0.5], [True, False, False, True, False, True])
    # 0.1 (1.0) > 0.2 (0.0): pooled with 0.2 and 0.3 to 1/3; the tie at 0.4 is one block (0.5).
    assert fit.edges == (0.1, 0.4, 0.5)
    assert fit.values == (pytest.approx(1 / 3, abs=1e-6), 0.5, 1.0)
    assert fit.predict(0.05) == fit.values[0] and fit.predict(0.45) == 0.5
    assert list(fit.values) == sorted(fit.values)


def test_isotonic_recovers_a_known_calibration() -> None:
    scores, correct = draws(20_000, seed=1)
    fit = isotonic(scores, correct)
    for s in (0.4, 0.6, 0.8, 0.95):
        assert fit.predict(s) == pytest.approx(s, abs=0.06)


def test_the_curve_runs_from_the_most_confident_down() -> None:
    points = curve([0.9, 0.9, 0.8, 0.5], [True, True, False, True])
    assert [(p.threshold, p.accepted, p.accuracy) for p in points] == [
        (0.9, 2, 1.0), (0.8, 3, pytest.approx(2 / 3)), (0.5, 4, 0.75)
    ]  # fmt: skip
    assert points[-1].coverage == 1.0 and all(p.lower <= p.accuracy <= p.upper for p in points)
    scores, correct = draws(5_000, seed=2)
    assert len(curve(scores, correct, points=20)) == 20


def test_the_threshold_is_chosen_by_its_lower_bound_and_holds_on_new_items() -> None:
    scores, correct = draws(4_000, seed=3)
    chosen = threshold_for(0.9, scores, correct)
    assert chosen is not None and chosen.lower >= 0.9
    # The point estimate alone would take a lower threshold: the bound costs some coverage.
    loosest = min(p.threshold for p in curve(scores, correct) if p.accuracy >= 0.9)
    assert chosen.threshold > loosest
    # On items the threshold never saw, the accepted labels reach the target: their true
    # accuracy (a label is right with probability its score) is the mean of their scores.
    fresh, _ = draws(20_000, seed=4)
    kept = [s for s in fresh if s >= chosen.threshold]
    assert sum(kept) / len(kept) >= 0.9
    assert len(kept) / len(fresh) == pytest.approx(chosen.coverage, abs=0.02)


def test_no_threshold_when_the_records_cannot_support_the_target() -> None:
    scores, correct = draws(4_000, seed=5)
    assert threshold_for(0.999, scores, correct) is None
    assert threshold_for(0.9, scores[:20], correct[:20]) is None  # too few items to say
    with pytest.raises(ValueError, match=r"target accuracy 1\.5"):
        threshold_for(1.5, scores, correct)


def test_the_estimate_for_items_without_a_record_brackets_their_real_accuracy() -> None:
    scores, correct = draws(3_000, seed=6)
    live, truth = draws(10_000, seed=7)
    chosen = threshold_for(0.9, scores, correct)
    assert chosen is not None
    guess = estimate(chosen.threshold, (scores, correct), live, resamples=100)
    kept = [c for s, c in zip(live, truth, strict=True) if s >= chosen.threshold]
    measured = sum(kept) / len(kept)
    assert guess.lower is not None and guess.upper is not None and guess.accuracy is not None
    assert guess.lower <= measured <= guess.upper
    assert abs(guess.accuracy - measured) < 0.02
    assert guess.coverage == pytest.approx(len(kept) / len(live))
    nothing = estimate(1.1, (scores, correct), live)
    assert (nothing.accepted, nothing.accuracy) == (0, None)


def test_a_spec_is_calibrated_on_the_seen_records_and_judged_on_the_withheld() -> None:
    from storage.training import CalibrationRow
    from workers.calibration import calibrate_spec
    from workers.spec import is_withheld, load_spec

    spec = load_spec("triage")  # withholds 20 % of the records from the checks
    scores, correct = draws(6_000, seed=8)
    rows = [
        CalibrationRow(
            f"t{n}", s, None, {"label": "sport" if right else "tech"}, {"label": "sport"}
        )
        for n, (s, right) in enumerate(zip(scores, correct, strict=True))
    ]
    result = calibrate_spec(spec, rows, target=0.9, points=5)
    held = sum(is_withheld(r.external_id, 0.2) for r in rows)
    assert result["calibration_items"] + result["withheld"]["items"] == len(rows)
    assert result["withheld"]["items"] == held and 1050 < held < 1350
    assert len(result["curve"]) == 5 and result["threshold"]["lower"] >= 0.9
    est, got = result["withheld"]["estimated"], result["withheld"]["measured"]
    assert est["coverage"] == pytest.approx(got["coverage"], abs=1e-6)
    assert got["interval"][0] <= est["accuracy"] <= got["interval"][1]
    assert calibrate_spec(spec, rows)["threshold"] is None  # no target, no threshold


def test_the_curve_is_drawn_as_a_png(tmp_path: Path) -> None:
    from storage.training import CalibrationRow
    from workers.calibration import calibrate_spec
    from workers.spec import load_spec

    scores, correct = draws(1_000, seed=9)
    rows = [
        CalibrationRow(f"t{n}", s, None, {"label": "a" if ok else "b"}, {"label": "a"})
        for n, (s, ok) in enumerate(zip(scores, correct, strict=True))
    ]
    out = tmp_path / "curve.png"
    result = calibrate_spec(load_spec("triage"), rows, target=0.9, png=out)
    assert result["png"] == str(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
