"""`stillhouse train --queue`: a real training worker on Redis runs each job as its own
process and the runs table follows it from queued to finished, or failed with why."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from support.clitools import embedded_env, run_cli

pytestmark = pytest.mark.timeout(420)


def _json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _wait_for(env: dict[str, str], run: str, states: set[str], timeout: float = 180) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        shown = _json(run_cli(env, "runs", "show", run, "--json"))
        if shown["state"] in states or time.monotonic() > deadline:
            return shown
        time.sleep(0.5)


def test_queued_training_runs_in_its_own_process_and_is_followed_to_its_end(
    postgres_url: str, redis_url: str, teacher_url: str, tmp_path: Path
) -> None:
    runs_dir = {"STILLHOUSE_RUNS_DIR": str(tmp_path / "runs")}
    embedded = {**embedded_env(postgres_url, teacher_url), **runs_dir}
    loaded = run_cli(embedded, "backfill", "bbc", "--spec", "triage", "--limit", "120")
    assert loaded.returncode == 0, loaded.stderr
    one_class = run_cli(
        embedded, "dataset", "create", "sport-only", "--spec", "triage", "--slice", "queue=sport"
    )
    assert one_class.returncode == 0, one_class.stderr
    env = {**embedded, "STILLHOUSE_BROKER_URL": redis_url}
    # Recorded as queued before any worker runs: `runs` shows it waiting.
    queued = _json(run_cli(env, "train", "--spec", "triage", "--epochs", "3", "--queue", "--json"))
    assert queued["state"] == "queued"
    assert _json(run_cli(env, "runs", "show", queued["run"], "--json"))["state"] == "queued"
    bad = _json(run_cli(env, "train", "--dataset", "sport-only", "--queue", "--json"))
    worker = subprocess.Popen(
        [sys.executable, "-m", "stillhouse", "worker", "--queues", "train", "--concurrency", "1"],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        done = _wait_for(env, queued["run"], {"finished", "failed"})
        failed = _wait_for(env, bad["run"], {"finished", "failed"})
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        _, worker_log = worker.communicate(timeout=30)
    assert done["state"] == "finished", (done, worker_log[-3000:])
    # The trainer was a process of its own, not the worker: its pid is on the run.
    assert done["pid"] not in (None, worker.pid) and done["host"]
    assert {"model.safetensors", "metrics.json", "MODEL_CARD.md", "train.log"} <= set(done["files"])
    assert done["summary"]["headline"]["metric"] == "accuracy"
    # A run that cannot train ends failed, with what to fix, and its log kept.
    assert failed["state"] == "failed"
    assert "at least 2" in failed["error"] and failed["finished_at"]
    assert (Path(failed["out_dir"]) / "train.log").is_file()
    listed = _json(run_cli(env, "runs", "list", "--json"))
    assert {r["name"]: r["state"] for r in listed} == {
        queued["run"]: "finished",
        bad["run"]: "failed",
    }


def test_queue_needs_a_broker(sqlite_url: str, teacher_url: str, tmp_path: Path) -> None:
    env = {**embedded_env(sqlite_url, teacher_url), "STILLHOUSE_RUNS_DIR": str(tmp_path)}
    assert run_cli(env, "backfill", "bbc", "--spec", "triage", "--limit", "40").returncode == 0
    refused = run_cli(env, "train", "--spec", "triage", "--queue")
    assert refused.returncode != 0 and "STILLHOUSE_BROKER_URL" in refused.stderr
