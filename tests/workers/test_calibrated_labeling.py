"""``checks.target_accuracy`` while labeling, on both databases, against the real local teacher
(all-MiniLM-L6-v2 zero-shot) on real BBC articles: items whose record the checks see build the
calibration; the others wait for it, are held to its threshold (recorded with the label), and
are rejected below it as ``below_calibrated_threshold``."""

from __future__ import annotations

from typing import Any

import yaml
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from examples.bbc import iter_bbc
from storage.calibrations import latest_calibration, records_to_come
from storage.models import Calibration, Item, ItemState, Label, SpecRow, Verdict
from storage.training import report_rows
from workers.calibration import Outcome, fit_calibration
from workers.calibrator import from_row
from workers.ingest import SourceRow, load_source
from workers.pipeline import LabelRuntime, label_until_done
from workers.report import build_report
from workers.spec import is_withheld, load_spec, parse_spec


def calibrated_spec(**checks: Any) -> Any:
    with open(load_spec("triage").source) as f:
        body = yaml.safe_load(f)
    body["name"] = "calibrated"
    body["checks"].update(
        {
            "withhold_share": 0.3,
            "target_accuracy": 0.9,
            "calibration_min_items": 60,
            "calibration_per_class": False,
            "calibration_wait_s": 0.2,
            **checks,
        }
    )
    return parse_spec(body, source="calibrated.yaml")


def load(sessions: sessionmaker[Session], spec: Any, limit: int) -> int:
    rows = [SourceRow(n + 1, row) for n, row in enumerate(iter_bbc(limit))]
    load_source(sessions, spec, rows)
    with sessions() as session:
        spec_id = session.scalar(select(SpecRow.id).where(SpecRow.name == spec.name))
    assert spec_id is not None
    return int(spec_id)


def test_items_without_a_record_are_held_to_the_learned_threshold(
    sessions: sessionmaker[Session], teacher_url: str
) -> None:
    spec = calibrated_spec()
    spec_id = load(sessions, spec, 240)
    with LabelRuntime(sessions, teacher_base_url=teacher_url) as runtime:
        summary = label_until_done(runtime, spec_id)
    with sessions() as session:
        items = len(session.scalars(select(Item.id)).all())  # BBC repeats a few articles
        assert summary.labeled == items > 230
        rows = session.execute(
            select(Item.external_id, Item.state, Item.known_good, Label).join(
                Label, Label.item_id == Item.id
            )
        ).all()
        fits = session.scalars(select(Calibration).order_by(Calibration.id)).all()
        assert records_to_come(session, spec_id) == 0
        last = latest_calibration(session, spec_id)
    assert len(rows) == items and all(state != ItemState.PENDING for _, state, _, _ in rows)
    # The first fit came once enough labels with a record existed; refits as more came.
    assert fits and fits[0].items >= 60 and last is not None and last.items >= fits[0].items
    assert last.threshold is not None and 0.0 < last.threshold < 1.0
    held = [(kg, label) for ext, _, kg, label in rows if is_withheld(ext, 0.3)]
    seen = [label for ext, _, _, label in rows if not is_withheld(ext, 0.3)]
    assert 40 < len(held) < 110
    # Labels the records vouch for are not held to it; every other one names its threshold.
    assert all(label.threshold is None and label.calibration_id is None for label in seen)
    assert all(label.calibration_id in {f.id for f in fits} for _, label in held)
    # BBC comes folder by folder: the first fits saw business only. Once the last record was
    # labeled, every held label was held again to the final calibration.
    assert last.final and len(fits) > 1
    assert {label.calibration_id for _, label in held} == {last.id}
    final = from_row(last)
    for _, label in held:
        assert label.threshold == final.threshold_of(label.output and label.output["label"])
    below = [label for _, label in held if "below_calibrated_threshold" in label.reasons]
    kept = [label for _, label in held if label.verdict == Verdict.ACCEPTED]
    assert below and kept
    for label in below:
        assert label.verdict == Verdict.REJECTED
        assert label.confidence is not None and label.confidence < label.threshold
        (problem,) = [p for p in label.problems if p["reason"] == "below_calibrated_threshold"]
        assert "checks.target_accuracy 0.9" in problem["message"]
        assert f"calibration {label.calibration_id}" in problem["message"]
    assert all(label.confidence >= label.threshold for label in kept)
    # The filter does what it is for: the labels it keeps are right more often than all.
    right = [label.output["label"] == kg["label"] for kg, label in held if label.output]
    kept_right = [label.output["label"] == kg["label"] for kg, label in held if label in kept]
    assert sum(kept_right) / len(kept_right) > sum(right) / len(right)
    # The report estimates the kept labels from the calibration, beside the measurement.
    with sessions() as session:
        report = build_report(spec, report_rows(session, spec_id), from_row(last))
    shown = report["calibrated"]
    assert shown["calibration"]["id"] == last.id and shown["target"] == 0.9
    part = shown["withheld"]
    assert part["labels"] == len(held) and part["accepted"] == len(kept)
    assert part["measured_accuracy"] == round(sum(kept_right) / len(kept_right), 4)
    low, high = part["estimated_interval"]
    assert 0.5 < low <= part["estimated_accuracy"] <= high <= 1.0
    assert shown["without_record"]["labels"] >= part["labels"]


def test_a_target_the_records_cannot_support_rejects_what_it_cannot_vouch_for(
    sessions: sessionmaker[Session], teacher_url: str
) -> None:
    spec = calibrated_spec(target_accuracy=0.999)
    spec_id = load(sessions, spec, 60)
    with LabelRuntime(sessions, teacher_base_url=teacher_url) as runtime:
        label_until_done(runtime, spec_id)
    with sessions() as session:
        labels = session.execute(select(Item.external_id, Label).join(Label)).all()
        last = latest_calibration(session, spec_id)
    # Fewer records than calibration_min_items: nothing is applied until the last is labeled;
    # then the calibration is final and no threshold reaches 99.9 %.
    assert last is not None and last.final and last.threshold is None
    held = [label for ext, label in labels if is_withheld(ext, 0.3)]
    assert held and all(label.verdict == Verdict.REJECTED for label in held)
    for label in held:
        assert label.reasons == ["below_calibrated_threshold"]
        assert "no confidence threshold reaches" in label.problems[0]["message"]


def test_a_class_with_enough_records_gets_its_own_threshold() -> None:
    # Class "easy" is right whenever its confidence is over 0.5, "hard" only over 0.9.
    seen = [Outcome(c / 100, c > 50, "easy") for c in range(1, 100)] * 4
    seen += [Outcome(c / 100, c > 90, "hard") for c in range(1, 100)] * 4
    fitted = fit_calibration(seen, 0.9, class_min_items=200)
    assert fitted.classes["easy"]["threshold"] < 0.6 < 0.9 <= fitted.classes["hard"]["threshold"]
    assert fitted.threshold_of("easy") == fitted.classes["easy"]["threshold"]
    # A class without enough records of its own falls back to the overall threshold.
    assert fitted.threshold_of("rare") == fitted.threshold_of(None) == fitted.threshold
    alone = fit_calibration(seen, 0.9, class_min_items=None)
    assert alone.classes == {} and alone.threshold == fitted.threshold
