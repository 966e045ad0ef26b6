"""The data engineer's flow through the real CLI: label with the local teacher, freeze a
dataset, show, list, diff, export, and train on it while labeling goes on."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from support.clitools import embedded_env, run_cli


def _cli(tmp_path: Path, teacher_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(embedded_env(f"sqlite:///{tmp_path}/d.db", teacher_url), *args)


@pytest.mark.slow
def test_freeze_export_and_train_on_a_dataset(tmp_path: Path, teacher_url: str) -> None:
    cli = lambda *args: _cli(tmp_path, teacher_url, *args)  # noqa: E731
    labeled = cli("backfill", "bbc", "--spec", "triage", "--limit", "120", "--json")
    assert labeled.returncode == 0, labeled.stderr
    first_labels = json.loads(labeled.stdout)["labels"]  # a repeated text shares one label

    # How far the teacher's confidence can be trusted, from the records the checks saw.
    calibrated = cli("calibrate", "--spec", "triage", "--target", "0.9", "--json")
    assert calibrated.returncode == 0, calibrated.stderr
    calibration = json.loads(calibrated.stdout)
    assert calibration["calibration_items"] + calibration["withheld"]["items"] == first_labels
    coverage = [p["coverage"] for p in calibration["curve"]]
    assert coverage == sorted(coverage) and coverage[-1] == 1.0
    shown_curve = cli("calibrate", "--spec", "triage", "--target", "0.9")
    assert shown_curve.returncode == 0 and "coverage against accuracy" in shown_curve.stdout

    made = cli("dataset", "create", "bbc-120", "--spec", "triage", "--json")
    assert made.returncode == 0, made.stderr
    info = json.loads(made.stdout)
    shown = json.loads(cli("dataset", "show", "bbc-120", "--json").stdout)
    assert shown["content_hash"] == info["content_hash"] and shown["spec"] == "triage"
    assert shown["version"] == 2 and sum(shown["counts"]["splits"].values()) == shown["rows"]

    again = cli("dataset", "create", "bbc-120", "--spec", "triage")
    assert again.returncode == 2 and "exists already" in again.stderr
    empty = cli("dataset", "create", "none", "--spec", "triage", "--slice", "queue=nowhere")
    assert empty.returncode == 2 and "the filters select no labels" in empty.stderr
    bad = cli("dataset", "create", "x", "--spec", "triage", "--split", "80/30")
    assert bad.returncode == 2 and "--split '80/30'" in bad.stderr

    out = tmp_path / "exports" / "bbc-120"
    exported = cli("export", "bbc-120", "--out", str(out), "--json")
    assert exported.returncode == 0, exported.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["content_hash"] == info["content_hash"]
    assert pq.read_table(out / "train.parquet").num_rows == info["counts"]["splits"]["train"]
    refused = cli("export", "bbc-120", "--out", str(out))
    assert refused.returncode == 2 and "exists" in refused.stderr

    # Labeling goes on; the dataset does not move, and training on it names its hash.
    more = cli("backfill", "bbc", "--spec", "triage", "--limit", "200", "--json")
    assert more.returncode == 0, more.stderr
    labels = json.loads(more.stdout)["labels"]  # repeated texts share one label
    assert json.loads(cli("dataset", "show", "bbc-120", "--json").stdout) == shown
    trained = cli("train", "--dataset", "bbc-120", "--out", str(tmp_path / "run"), "--json")
    assert trained.returncode == 0, trained.stderr
    report = json.loads(trained.stdout)
    assert report["dataset"] == {"name": "bbc-120", "content_hash": info["content_hash"]}
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["dataset"]["content_hash"] == info["content_hash"]
    assert report["n_train"] + report["n_val"] <= info["rows"]

    # Given a spec, train freezes a dataset of every label first and says which.
    fresh = cli("train", "--spec", "triage", "--out", str(tmp_path / "run2"))
    assert fresh.returncode == 0, fresh.stderr
    assert "froze dataset triage-v2-" in fresh.stderr
    listed = json.loads(cli("dataset", "list", "--json").stdout)
    assert [d["name"] for d in listed] == ["bbc-120", listed[1]["name"]]
    assert listed[1]["rows"] == labels  # every label, whatever its verdict
    diff = json.loads(cli("dataset", "diff", "bbc-120", listed[1]["name"], "--json").stdout)
    assert diff["added"]["count"] == labels - info["rows"] and diff["removed"]["count"] == 0
