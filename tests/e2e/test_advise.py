"""`stillhouse advise` on the bundled triage spec, from real measurements: labels from a real
local teacher on loopback (the ledger's cost per item), a trained student and its router."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.clitools import embedded_env, run_cli

pytestmark = pytest.mark.slow

LIMIT = 500


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A database with 500 BBC articles labeled for triage and one trained student."""
    from stillhouse.servers.teacher.process import local_teacher

    folder = tmp_path_factory.mktemp("advise")
    with local_teacher("embedding") as url:
        env = {
            **embedded_env(f"sqlite:///{folder}/advise.db", url),
            "STILLHOUSE_RUNS_DIR": f"{folder}/runs",
        }
        run = run_cli(env, "backfill", "bbc", "--spec", "triage", "--limit", str(LIMIT))
        assert run.returncode == 0, run.stderr
        trained = run_cli(env, "train", "--spec", "triage", "--json")
        assert trained.returncode == 0, trained.stderr
        yield env


def _advise(env: dict[str, str], *args: str) -> dict[str, Any]:
    run = run_cli(env, "advise", "--spec", "triage", *args, "--json")
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)  # type: ignore[no-any-return]


def test_thirty_a_day_keeps_the_teacher(measured: dict[str, str]) -> None:
    result = _advise(measured, "--volume", "30/day")
    print(json.dumps({"advise_30": {k: result[k] for k in _KEYS}}))
    assert result["recommendation"] == "do_nothing"
    assert result["monthly_cost_teacher_usd"] < result["monthly_cost_student_usd"]
    assert result["teacher_cost_from"] == "ledger"
    measured_figures = result["measured"]
    assert measured_figures["teacher_usd_per_item"] > 0 and measured_figures["run"]
    assert measured_figures["measurable_share"] == 1.0  # every BBC article has its queue


def test_two_million_a_day_distills_with_a_break_even(measured: dict[str, str]) -> None:
    result = _advise(measured, "--volume", "2,000,000/day")
    print(json.dumps({"advise_2m": {k: result[k] for k in _KEYS}}))
    assert result["recommendation"] == "distill", result["reasons"]
    assert 30 < result["break_even_per_day"] < 2_000_000
    assert result["monthly_cost_student_usd"] < result["monthly_cost_teacher_usd"]
    assert result["quality_delta"] is not None and result["quality_delta"] >= -0.01
    assert 0 <= result["measured"]["fallback_share"] < 1


def test_a_teacher_costing_cents_at_a_few_dozen_calls_a_day_is_not_worth_a_student(
    measured: dict[str, str],
) -> None:
    result = _advise(measured, "--volume", "40/day", "--teacher-usd", "0.03")
    assert result["recommendation"] == "do_nothing"
    assert result["monthly_cost_teacher_usd"] == 36.0 and result["teacher_cost_from"] == "stated"


def test_a_volume_that_is_not_a_number_says_how_to_write_it(measured: dict[str, str]) -> None:
    run = run_cli(measured, "advise", "--spec", "triage", "--volume", "lots")
    assert run.returncode != 0 and "give inputs a day, e.g. 2000/day" in run.stderr


_KEYS = (
    "recommendation",
    "monthly_cost_teacher_usd",
    "monthly_cost_student_usd",
    "break_even_per_day",
    "quality_delta",
    "reasons",
)


def test_advise_without_labels_says_what_it_needs(tmp_path: Path) -> None:
    env = embedded_env(f"sqlite:///{tmp_path}/empty.db", "http://127.0.0.1:9/v1")
    run = run_cli(env, "advise", "--spec", "triage", "--volume", "1000/day", "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["recommendation"] == "not_yet" and "backfill" in result["missing"][0]
