"""The hostile-input suite: a corpus of its own (tests/hostile_corpus.py) through backfill on
SQLite and Postgres, through the ingest API, and through report, review list and status.
For each case: no crash, the row's documented outcome, the other rows kept, the tables
intact. Injection attempts go through the real local teacher. The API's half is in
tests/stillhouse/test_hostile_api.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from support.clitools import run_cli
from support.hostile_corpus import CASES, INJECTIONS, MAX_DOC_BYTES, jsonl_bytes

from storage.models import Item, ItemState, Label
from storage.session import make_engine, make_sessionmaker

OK = [c for c in CASES if c.jsonl == "ok"]
FINAL = {ItemState.ACCEPTED, ItemState.REJECTED, ItemState.FAILED}


def _env(database_url: str, teacher_url: str, tmp_path: Path) -> dict[str, str]:
    return {
        "STILLHOUSE_DATABASE_URL": database_url,
        "STILLHOUSE_BROKER_URL": "",
        "STILLHOUSE_TEACHER_BASE_URL": teacher_url,
        "STILLHOUSE_RUNS_DIR": str(tmp_path / "runs"),
        "COLUMNS": "200",
    }


def _items(url: str) -> dict[str, Item]:
    engine = make_engine(url)
    with make_sessionmaker(engine)() as session:
        items = {i.external_id: i for i in session.scalars(select(Item))}
        session.expunge_all()
    engine.dispose()
    return items


def _labels(url: str) -> dict[str, tuple[Any, str, bool | None]]:
    """external id -> (teacher output, verdict, whether the known-good record matched)."""
    engine = make_engine(url)
    with make_sessionmaker(engine)() as session:
        rows = session.execute(
            select(Item.external_id, Label.output, Label.verdict, Label.known_good_match).join(
                Label
            )
        ).all()
        labels = session.scalar(select(func.count()).select_from(Label))
    engine.dispose()
    assert labels == len(rows)
    return {rid: (output, str(verdict.value), match) for rid, output, verdict, match in rows}


def _no_raw_control(*outputs: str) -> None:
    for output in outputs:
        assert "\x1b" not in output and "\u202e" not in output and "\x07" not in output


@pytest.mark.slow
def test_the_corpus_through_backfill_report_review_and_status(
    database_url: str, teacher_url: str, tmp_path: Path
) -> None:
    data, at_line = jsonl_bytes(CASES)
    source = tmp_path / "hostile.jsonl"
    source.write_bytes(data)
    rejects = tmp_path / "rejects.jsonl"
    env = _env(database_url, teacher_url, tmp_path)
    args = ["--spec", "triage", "--max-doc-bytes", str(MAX_DOC_BYTES), "--rejects", str(rejects)]

    done = run_cli(env, "backfill", str(source), *args, "--json")
    assert done.returncode == 1, done.stderr[-3000:]  # 1: some rows were bad (documented)
    summary = json.loads(done.stdout)
    assert summary["rows"] == len(CASES)
    assert summary["bad_rows"] == len(CASES) - len(OK)
    assert summary["inserted"] == len(OK)
    _no_raw_control(done.stdout, done.stderr)

    # Each refused row has its documented reason, on its own line of the rejects file.
    refused = {}
    for line in rejects.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        refused[record["line"]] = record["reason"]
    expected = {n: c for n, c in at_line.items() if c.jsonl != "ok"}
    assert set(refused) == set(expected)
    for n, case in expected.items():
        assert refused[n].startswith(case.jsonl), (case.name, refused[n])

    # Every good row is stored under its id, exactly (no trimming, nothing merged).
    items = _items(database_url)
    assert set(items) == {c.stored_id for c in OK}
    assert " pad-1 " in items and "pad-1" in items
    assert "\x00" not in items["nul-1"].text and items["nul-1"].text.endswith("beforeafter")
    assert all(item.state in FINAL for item in items.values())
    labels = _labels(database_url)
    assert set(labels) == set(items)  # one label per item, the tables agree

    # Injections through the real local teacher. The structure cannot be steered (see
    # tests/test_prompt_injection.py); the content can, for a zero-shot embedding model (a
    # document that talks of sport reads as sport): the known-good check rejects such a label
    # wherever a record exists, and only a withheld item (no record) keeps it.
    seen = {name: labels[f"inj-{name}"] for name in INJECTIONS}
    print("injection attempts (label, verdict, known-good match):", json.dumps(seen))
    assert seen["control"][0]["label"] == "tech"
    for name, (output, verdict, match) in seen.items():
        if output["label"] != "tech" and match is not None:
            assert verdict == "rejected" and match is False, (name, seen[name])

    # The commands that print ids, texts and slices print them escaped, and do not crash.
    for command in (
        ["report", "--spec", "triage"],
        ["review", "list", "--spec", "triage", "--limit", "100"],
        ["status"],
        ["status", "--spec", "triage"],
    ):
        shown = run_cli(env, *command)
        assert shown.returncode == 0, (command, shown.stderr[-2000:])
        _no_raw_control(shown.stdout, shown.stderr)
    report = run_cli(env, "report", "--spec", "triage")
    assert "queue=[/queue]" in report.stdout.replace("\n", "")
    as_json = run_cli(env, "report", "--spec", "triage", "--json")
    assert as_json.returncode == 0 and "queue=[/queue]" in json.loads(as_json.stdout)["slices"]

    # A second load where documents changed under markup and escape ids: the summary that
    # names them prints (escaped), the command ends well.
    changed = [
        {"id": rid, "headline": "Changed", "body": f"A different body {n}", "queue": "tech"}
        for n, rid in enumerate(("[/x]", "[red]boom[/red]", "esc-\x1b[31mred"))
    ]
    again_source = tmp_path / "again.jsonl"
    again_source.write_text("".join(json.dumps(r) + "\n" for r in changed))
    again = run_cli(env, "backfill", str(again_source), "--spec", "triage")
    assert again.returncode == 0, again.stderr[-3000:]
    printed = again.stdout + again.stderr
    _no_raw_control(printed)
    assert "3 documents changed under an existing id" in printed
    assert "[/x]" in printed and "esc-\\x1b[31mred" in printed
