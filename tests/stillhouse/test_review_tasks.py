"""Review tasks on both databases, against the real local teacher on real BBC articles: records
that look wrong (``suspect_record``) are found, ranked and corrected with who and when; a spec
with no records gets a stratified sample whose decisions become the records it calibrates on."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from support.clitools import embedded_env, run_cli

from examples.bbc import iter_bbc
from schemas.errors import ConfigError
from stillhouse.commands import (
    run_calibrate,
    run_review_list,
    run_review_sample,
    run_review_suspects,
    run_task_resolve,
)
from stillhouse.settings import Settings
from storage.models import Item, Label, ReviewTask, SpecRow, Verdict
from workers.ingest import SourceRow, load_source
from workers.pipeline import LabelRuntime, label_until_done
from workers.review import decisions_needed
from workers.spec import load_spec

QUEUES = ["business", "entertainment", "politics", "sport", "tech"]


def _spec_file(tmp_path: Path, name: str, *, records: bool) -> Path:
    body = yaml.safe_load(Path(load_spec("triage").source).read_text())
    body["name"] = name
    body["checks"].update({"target_accuracy": None, "withhold_share": 0.0})
    if not records:
        del body["known_good"]
        body["checks"]["require_known_good_match"] = False
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def _label(
    sessions: sessionmaker[Session], path: Path, rows: list[dict[str, Any]], teacher_url: str
) -> None:
    spec = load_spec(str(path))
    load_source(sessions, spec, [SourceRow(n + 1, row) for n, row in enumerate(rows)])
    with sessions() as session:
        spec_id = session.scalar(select(SpecRow.id).where(SpecRow.name == spec.name))
    assert spec_id is not None
    with LabelRuntime(sessions, teacher_base_url=teacher_url) as runtime:
        label_until_done(runtime, spec_id)


@pytest.mark.slow
def test_suspect_records_are_queued_ranked_and_corrected_with_who_and_when(
    tmp_path: Path, database_url: str, sessions: sessionmaker[Session], teacher_url: str
) -> None:
    rng = random.Random(7)
    rows, flipped = [], set()
    for row in iter_bbc(500):
        if rng.random() < 0.05:
            row = {**row, "queue": rng.choice([q for q in QUEUES if q != row["queue"]])}
            flipped.add(row["id"])
        rows.append(row)
    path = _spec_file(tmp_path, "suspects", records=True)
    _label(sessions, path, rows, teacher_url)
    settings = Settings(database_url=database_url, broker_url=None)

    found = run_review_suspects(settings, str(path))
    assert found["records"] >= 490 and found["queued"] == found["suspects"] > 0
    queue = run_review_list(settings, str(path), limit=500, reason="suspect_record").entries
    assert len(queue) == found["queued"]
    ranks = [e["rank"] for e in queue]
    assert ranks == sorted(ranks, reverse=True) and all(0 < r <= 1 for r in ranks)
    hits = sum(e["external_id"] in flipped for e in queue)
    # 500 articles: a weaker out-of-fold model than the whole corpus's, still mostly right.
    assert hits / len(queue) >= 0.6 and hits / len(flipped) >= 0.3
    for e in queue:
        assert e["proposed"]["label"] != e["record"]["label"] == e["details"]["record"]
        assert e["output"]["label"] == e["proposed"]["label"]  # the teacher agrees against it

    # The person says the teacher was right: the record is corrected, its history kept, and
    # the label the record had held back is accepted.
    top, second = queue[0], queue[1] if len(queue) > 1 else None
    done = run_task_resolve(
        settings,
        str(path),
        "suspect_record",
        [top["external_id"]],
        accept=True,
        record=None,
        by="ana",
        note="checked the ticket",
    )
    assert done["decided"] == [
        {
            "item": top["external_id"],
            "decision": "corrected",
            "record": top["proposed"],
            "label": "accepted",
        }
    ]
    with sessions() as session:
        item = session.scalars(select(Item).where(Item.external_id == top["external_id"])).one()
        task = session.scalars(select(ReviewTask).where(ReviewTask.item_id == item.id)).one()
        label = session.scalars(select(Label).where(Label.item_id == item.id)).one()
    assert item.known_good == top["proposed"]
    assert task.record_before == top["record"] and task.record_after == top["proposed"]
    assert task.decided_by == "ana" and task.decided_at is not None
    assert task.note == "checked the ticket" and task.state == "resolved"
    assert label.verdict == Verdict.ACCEPTED
    assert label.reasons[-1] == "reviewed:suspect_record:corrected:checked the ticket"
    with pytest.raises(ConfigError, match="decided already"):
        run_task_resolve(
            settings, str(path), "suspect_record", [top["external_id"]],
            accept=False, record=None, by="bo", note=None,
        )  # fmt: skip
    if second is not None:
        kept = run_task_resolve(
            settings, str(path), "suspect_record", [second["external_id"]],
            accept=False, record=None, by="bo", note=None,
        )  # fmt: skip
        # The record stands, so the label that disagrees with it is rejected.
        assert kept["decided"][0]["decision"] == "kept"
        assert kept["decided"][0]["label"] == "rejected"
        with sessions() as session:
            item = session.scalars(
                select(Item).where(Item.external_id == second["external_id"])
            ).one()
        assert item.known_good == second["record"]
    # Finding suspects again asks nobody twice about the same item.
    assert run_review_suspects(settings, str(path))["queued"] == 0
    left = run_review_list(settings, str(path), limit=500, reason="suspect_record").entries
    assert len(left) == len(queue) - (2 if second is not None else 1)


@pytest.mark.slow
def test_a_spec_without_records_gets_a_stratified_sample_whose_decisions_become_records(
    tmp_path: Path, database_url: str, sessions: sessionmaker[Session], teacher_url: str
) -> None:
    rows = list(iter_bbc(240))
    truth = {row["id"]: row["queue"] for row in rows}
    path = _spec_file(tmp_path, "norecords", records=False)
    _label(sessions, path, rows, teacher_url)
    settings = Settings(database_url=database_url, broker_url=None)
    with pytest.raises(ConfigError, match="nothing to calibrate on yet"):
        run_calibrate(settings, str(path), target=None, points=5)

    drawn = run_review_sample(settings, str(path), n=60)
    assert drawn["queued"] == 60 and drawn["population"] >= 230
    assert drawn["progress"] | {"more_for_2_points": 0} == {
        "waiting": 60,
        "decided": 0,
        "teacher_right": 0,
        "accuracy": None,
        "interval": None,
        "more_for_2_points": 0,
        "records": 0,
        "more_for_calibration": 200,
    }
    queue = run_review_list(settings, str(path), limit=100, reason="sample").entries
    assert len(queue) == 60
    with sessions() as session:
        said = Counter(
            label.output["label"] for label in session.scalars(select(Label)) if label.output
        )
    sampled = Counter(e["output"]["label"] for e in queue)
    assert set(sampled) == set(said)  # every predicted class is in the sample
    rarest = min(said, key=lambda c: said[c])
    assert sampled[rarest] / 60 >= said[rarest] / sum(said.values())  # over-represented
    assert all(e["stratum"].startswith(f"class={e['output']['label']}|") for e in queue)
    # A second draw takes other labels, never one already in the sample.
    more = run_review_sample(settings, str(path), n=10)
    assert more["queued"] == 10 and more["progress"]["waiting"] == 70

    # The person: the teacher was right where it matches the BBC folder, else the folder is.
    right = [e["external_id"] for e in queue if e["output"]["label"] == truth[e["external_id"]]]
    wrong = [e for e in queue if e["external_id"] not in set(right)]
    accepted = run_task_resolve(
        settings, str(path), "sample", right, accept=True, record=None, by="ana", note=None
    )
    assert {d["decision"] for d in accepted["decided"]} == {"confirmed"}
    with pytest.raises(ConfigError, match="give the right answer with --record"):
        run_task_resolve(
            settings, str(path), "sample", [wrong[0]["external_id"]],
            accept=False, record=None, by="ana", note=None,
        )  # fmt: skip
    with pytest.raises(ConfigError, match="not one of the spec's classes"):
        run_task_resolve(
            settings, str(path), "sample", [wrong[0]["external_id"]],
            accept=False, record={"label": "weather"}, by="ana", note=None,
        )  # fmt: skip
    for e in wrong:
        done = run_task_resolve(
            settings, str(path), "sample", [e["external_id"]],
            accept=False, record={"label": truth[e["external_id"]]}, by="ana", note=None,
        )  # fmt: skip
        assert done["decided"][0]["label"] == "rejected"
    progress = done["progress"]
    assert progress["decided"] == 60 and progress["teacher_right"] == len(right)
    assert progress["records"] == 60 and progress["more_for_calibration"] == 140
    lo, hi = progress["interval"]
    assert lo < len(right) / 60 < hi
    assert progress["more_for_2_points"] == decisions_needed(len(right), 60) > 100
    with sessions() as session:
        records = {
            i.external_id: i.known_good for i in session.scalars(select(Item)) if i.known_good
        }
    assert records == {e["external_id"]: {"label": truth[e["external_id"]]} for e in queue}
    # The decisions are the records the calibration learns from.
    calibrated = run_calibrate(settings, str(path), target=None, points=5)
    assert calibrated["calibration_items"] == 60
    assert calibrated["raw_accuracy"] == pytest.approx(len(right) / 60, abs=1e-6)


def test_how_many_more_decisions_tighten_the_interval() -> None:
    assert decisions_needed(90, 100) > decisions_needed(360, 400) > 0
    assert decisions_needed(900, 1000) == 0  # ±1.9 points already
    assert decisions_needed(0, 0) > 2000  # nothing known: p = 0.5 needs the most


@pytest.mark.slow
def test_the_review_commands_from_the_shell(tmp_path: Path, teacher_url: str) -> None:
    path = _spec_file(tmp_path, "shell", records=False)
    env = embedded_env(f"sqlite:///{tmp_path}/s.db", teacher_url)
    run = run_cli(env, "backfill", "bbc", "--spec", str(path), "--limit", "40")
    assert run.returncode == 0, run.stderr
    drawn = run_cli(env, "review", "sample", "--spec", str(path), "--n", "8")
    assert drawn.returncode == 0, drawn.stderr
    assert "queued 8 of 40 labels without a record" in drawn.stderr
    assert "more decisions would narrow that to ±2 points" in drawn.stderr
    listed = run_cli(env, "review", "list", "--spec", str(path), "--reason", "sample", "--json")
    entries = json.loads(listed.stdout)
    assert len(entries) == 8
    first = entries[0]["external_id"]
    bad = run_cli(
        env, "review", "resolve", first, "--spec", str(path), "--reason", "sample",
        "--reject", "--record", "{label: tech",
    )  # fmt: skip
    assert bad.returncode == 2 and "--record '{label: tech' is not JSON" in bad.stderr
    unknown = run_cli(env, "review", "list", "--spec", str(path), "--reason", "sus")
    assert unknown.returncode == 2 and "choose suspect_record" in unknown.stderr
    every = run_cli(
        env, "review", "resolve", "--spec", str(path), "--reason", "sample", "--accept",
        "--all", "--by", "ana",
    )  # fmt: skip
    assert every.returncode == 0, every.stderr
    assert "decided 8 sample reviews: 8 confirmed" in every.stderr
    assert "the teacher was right on 8 (100.0%" in every.stderr
    shown = run_cli(env, "review", "list", "--spec", str(path), "--reason", "sample")
    assert shown.returncode == 0 and "open (0)" in shown.stdout
    # Suspect records need records: a spec without them says why there are none.
    none = run_cli(env, "review", "suspects", "--spec", str(path))
    assert none.returncode == 0, none.stderr
    assert "0 of 8 known-good records" in none.stderr
