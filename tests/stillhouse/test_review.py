"""The review queue end to end: confident disagreements wait for a person, who decides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from support import triage_body
from support.clitools import run_cli

_cli = run_cli


@pytest.mark.slow
def test_review_list_and_resolve(tmp_path: Path, teacher_url: str) -> None:
    body = triage_body()
    body["checks"]["review_confidence"] = 0.0  # every disagreement goes to a person
    spec = tmp_path / "review.yaml"
    spec.write_text(yaml.safe_dump(body))
    env = {
        "STILLHOUSE_DATABASE_URL": f"sqlite:///{tmp_path}/r.db",
        "STILLHOUSE_BROKER_URL": "",
        "STILLHOUSE_TEACHER_BASE_URL": teacher_url,
    }
    run = _cli(env, "backfill", "bbc", "--spec", str(spec), "--limit", "60")
    assert run.returncode == 0, run.stderr
    waiting = json.loads(_cli(env, "review", "list", "--spec", str(spec), "--json").stdout)
    assert waiting, "a zero-shot teacher disagrees with some of 60 BBC records"
    state = json.loads(_cli(env, "status", "--json").stdout)
    assert state["by_state"]["review"] == len(waiting) == state["by_verdict"]["needs_review"]

    first, second = waiting[0]["external_id"], waiting[-1]["external_id"]
    assert (
        _cli(
            env,
            "review",
            "resolve",
            first,
            "--spec",
            str(spec),
            "--accept",
            "--note",
            "record wrong",
        ).returncode
        == 0
    )
    if second != first:
        assert (
            _cli(env, "review", "resolve", second, "--spec", str(spec), "--reject").returncode == 0
        )
    again = _cli(env, "review", "resolve", first, "--spec", str(spec), "--reject")
    assert again.returncode == 2 and "not waiting for review" in again.stderr
    left = json.loads(_cli(env, "review", "list", "--spec", str(spec), "--json").stdout)
    assert len(left) == len(waiting) - (2 if second != first else 1)
    assert left, "60 BBC articles leave more than two disagreements to review"
    # The rest in bulk, by filter: a dry run first, then the decision.
    label = left[0]["output"]["label"]
    matching = [e["external_id"] for e in left if (e["output"] or {}).get("label") == label]
    preview = _cli(
        env,
        "review",
        "resolve",
        "--spec",
        str(spec),
        "--reject",
        "--label",
        label,
        "--dry-run",
        "--json",
    )
    assert preview.returncode == 0, preview.stderr
    assert json.loads(preview.stdout)["decided"] == matching
    assert len(
        json.loads(_cli(env, "review", "list", "--spec", str(spec), "--json").stdout)
    ) == len(left)
    bulk = _cli(
        env, "review", "resolve", "--spec", str(spec), "--reject", "--label", label, "--json"
    )
    assert json.loads(bulk.stdout)["decided"] == matching
    rest = _cli(env, "review", "resolve", "--spec", str(spec), "--accept", "--all", "--json")
    assert len(json.loads(rest.stdout)["decided"]) == len(left) - len(matching)
    assert json.loads(_cli(env, "review", "list", "--spec", str(spec), "--json").stdout) == []
    unsaid = _cli(env, "review", "resolve", "--spec", str(spec), "--accept")
    assert unsaid.returncode == 2 and "say which labels" in unsaid.stderr
