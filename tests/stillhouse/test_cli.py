"""The command line as a user meets it: clear errors, documented commands, the JSON contract."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from support import ROOT
from typer.main import get_command

from stillhouse.cli import app


def _run(*args: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {
        **os.environ,
        "STILLHOUSE_DATABASE_URL": f"sqlite:///{tmp_path}/cli.db",
        "STILLHOUSE_BROKER_URL": "",
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "stillhouse", *args],
        capture_output=True,
        text=True,
        env=environment,
        cwd=tmp_path,
        timeout=120,
    )


def test_invalid_spec_names_file_field_and_problem(tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    body = (
        (ROOT / "examples/specs/triage.yaml")
        .read_text()
        .replace("model: minilm-zero-shot", "modle: minilm-zero-shot")
    )
    spec.write_text(body)
    result = _run("backfill", "bbc", "--spec", str(spec), tmp_path=tmp_path)
    assert result.returncode == 2
    assert str(spec) in result.stderr
    assert "$.teacher" in result.stderr and "'model' is a required property" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_source_file_is_a_clear_error(tmp_path: Path) -> None:
    result = _run("backfill", str(tmp_path / "nope.jsonl"), "--spec", "triage", tmp_path=tmp_path)
    assert result.returncode == 2
    assert "source not found" in result.stderr and "nope.jsonl" in result.stderr


def test_missing_spec_file_is_a_clear_error(tmp_path: Path) -> None:
    result = _run("spec", "check", str(tmp_path / "gone.yaml"), tmp_path=tmp_path)
    assert result.returncode == 2
    assert "spec file not found" in result.stderr


@pytest.mark.slow
def test_malformed_jsonl_line_is_reported_and_good_rows_still_load(
    tmp_path: Path, teacher_url: str
) -> None:
    source = tmp_path / "tickets.jsonl"
    good = {
        "headline": "Chelsea win the league",
        "queue": "sport",
        "body": "Chelsea beat Arsenal 2-0 to win the Premiership title on Saturday.",
    }
    source.write_text(
        "\n".join(
            [
                json.dumps({**good, "id": "t1"}),
                '{"id": "t2", "headline": "broken',
                json.dumps({**good, "id": "t3", "body": good["body"] + " A second report."}),
                json.dumps({"headline": "no id", "body": "x", "queue": "sport"}),
            ]
        )
        + "\n"
    )
    result = _run(
        "backfill",
        str(source),
        "--spec",
        "triage",
        "--json",
        tmp_path=tmp_path,
        STILLHOUSE_TEACHER_BASE_URL=teacher_url,
    )
    assert result.returncode == 1, result.stderr
    assert "line 2: not valid JSON" in result.stderr
    assert "line 4: missing or invalid id field 'id'" in result.stderr
    summary = json.loads(result.stdout)
    assert (summary["inserted"], summary["bad_rows"], summary["labels"]) == (2, 2, 2)


def test_status_json_contract(tmp_path: Path) -> None:
    result = _run("status", "--json", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["items"] == 0
    assert set(data["by_state"]) >= {"pending", "accepted", "rejected", "failed"}
    assert set(data["by_verdict"]) >= {"accepted", "rejected"}
    assert data["spend_usd"] == 0


def _commands(group: typer.Typer, prefix: str = "") -> list[str]:
    click_group = get_command(group)
    names = []
    for name, command in click_group.commands.items():  # type: ignore[attr-defined]
        full = f"{prefix}{name}"
        sub = getattr(command, "commands", None)
        names += [f"{full} {s}" for s in sub] if sub else [full]
    return names


def test_every_command_is_in_the_readme_and_has_an_example() -> None:
    readme = (ROOT / "README.md").read_text()
    click_group = get_command(app)
    for name in _commands(app):
        assert re.search(rf"stillhouse {re.escape(name)}\b", readme), f"README lacks {name}"
        parts = name.split()
        command = click_group.commands[parts[0]]  # type: ignore[attr-defined]
        if len(parts) == 2:
            command = command.commands[parts[1]]
        assert "Example:" in (command.help or ""), f"{name} help has no example"
