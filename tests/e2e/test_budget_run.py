"""A run against the real local teacher stops at the spec's budget, with items left pending."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from support import triage_body
from support.clitools import embedded_env, run_cli


def _spec_with_budget(tmp_path: Path, budget: float) -> Path:
    body = triage_body()  # no target: a held-back item would wait, paid, for a calibration
    body["budget_usd"] = budget
    spec = tmp_path / "budgeted.yaml"
    spec.write_text(yaml.safe_dump(body))
    return spec


def _cli(tmp_path: Path, teacher_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(embedded_env(f"sqlite:///{tmp_path}/b.db", teacher_url), *args)


@pytest.mark.slow
def test_spending_stops_at_the_budget_and_the_rest_stays_pending(
    tmp_path: Path, teacher_url: str
) -> None:
    budget = 0.002
    spec = _spec_with_budget(tmp_path, budget)
    run = _cli(tmp_path, teacher_url, "backfill", "bbc", "--spec", str(spec), "--limit", "40")
    assert run.returncode == 2, run.stderr
    assert "budget_usd $0.002" in run.stderr and "stay pending" in run.stderr

    state = json.loads(_cli(tmp_path, teacher_url, "status", "--json").stdout)
    assert 0 < state["spend_usd"] <= budget
    assert state["by_state"]["pending"] > 0
    labeled = state["by_state"]["accepted"] + state["by_state"]["rejected"]
    assert labeled + state["by_state"]["pending"] == 40
    # Every paid call is in the ledger, and nothing was left reserved.
    assert state["calls"]["ok"] == labeled

    raised = _spec_with_budget(tmp_path, 1.0)
    more = _cli(tmp_path, teacher_url, "backfill", "bbc", "--spec", str(raised), "--limit", "40")
    assert more.returncode == 0, more.stderr
    state = json.loads(_cli(tmp_path, teacher_url, "status", "--json").stdout)
    assert state["by_state"]["pending"] == 0


def test_estimate_and_dry_run_spend_nothing(tmp_path: Path) -> None:
    env_url = "http://127.0.0.1:9/v1"  # nothing listens: a call would fail loudly
    out = _cli(tmp_path, env_url, "estimate", "bbc", "--spec", "triage", "--limit", "100", "--json")
    assert out.returncode == 0, out.stderr
    estimate = json.loads(out.stdout)
    # One of the first 100 BBC articles repeats another's text: 99 calls, as the load does.
    assert estimate["rows"] == 100 and estimate["calls"] == 99
    assert estimate["prompt_tokens"] > 100 * 100 and estimate["cost_usd"] > 0
    assert estimate["within_budget"] is True
    dry = _cli(
        tmp_path,
        env_url,
        "backfill",
        "bbc",
        "--spec",
        "triage",
        "--limit",
        "100",
        "--dry-run",
        "--json",
    )
    assert json.loads(dry.stdout)["calls"] == 99
    state = json.loads(_cli(tmp_path, env_url, "status", "--json").stdout)
    assert state["items"] == 0 and state["spend_usd"] == 0


def test_the_estimate_counts_a_repeated_text_once_and_concurrency_for_the_fleet(
    tmp_path: Path,
) -> None:
    # 30 rows, 10 distinct texts: 10 calls (content dedupe and the cache answer the rest).
    rows = [
        {
            "id": f"r{i}",
            "headline": f"Headline {i % 10}",
            "body": f"Body {i % 10}.",
            "queue": "tech",
        }
        for i in range(30)
    ]
    source = tmp_path / "repeats.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env_url = "http://127.0.0.1:9/v1"
    out = _cli(tmp_path, env_url, "estimate", str(source), "--spec", "triage", "--json")
    assert out.returncode == 0, out.stderr
    estimate = json.loads(out.stdout)
    assert estimate["rows"] == 30 and estimate["calls"] == 10
    assert estimate["cached_share"] == round(20 / 30, 4)
    # teacher.concurrency holds for the fleet: 10 calls at 32 in flight and 1 s a call.
    assert estimate["seconds"] == round(10 / 32, 1)
