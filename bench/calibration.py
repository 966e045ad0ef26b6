"""Calibrating the teacher's confidence on real data: the whole BBC corpus labeled by the local
teacher (all-MiniLM-L6-v2 zero-shot), then `stillhouse calibrate` with only a target accuracy;
prints JSON.

    python bench/calibration.py --target 0.97

Embedded, on a scratch SQLite store, as `make demo` runs it. The bundled triage spec withholds
10 % of the known-good records from the checks (a stable hash of the id): the threshold is
learned on the other 90 %, and the withheld share is where it is judged, as if those items had
no record. Reported: the raw teacher's accuracy on the withheld share, the accuracy and
coverage of the labels the learned threshold keeps there (the lift is the difference), and the
estimate the calibration gave for them beside the measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from stillhouse.servers.teacher.process import local_teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.97)
    parser.add_argument("--limit", type=int, default=None, help="articles (default: all)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, local_teacher() as url:
        env = {
            **os.environ,
            "STILLHOUSE_DATABASE_URL": f"sqlite:///{tmp}/calibration.db",
            "STILLHOUSE_BROKER_URL": "",
            "STILLHOUSE_TEACHER_BASE_URL": url,
        }
        started = time.monotonic()
        backfill = ["backfill", "bbc", "--spec", "triage", "--json"]
        if args.limit:
            backfill += ["--limit", str(args.limit)]
        labeled = _cli(env, *backfill)
        label_s = time.monotonic() - started
        result = _cli(env, "calibrate", "--spec", "triage", "--target", str(args.target), "--json")
    print(json.dumps(_summary(labeled, result, label_s)))


def _cli(env: dict[str, str], *args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "stillhouse", *args], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"stillhouse {' '.join(args)} failed: {done.stderr}")
    data: dict[str, Any] = json.loads(done.stdout)
    return data


def _summary(labeled: dict[str, Any], result: dict[str, Any], label_s: float) -> dict[str, Any]:
    held = result["withheld"]
    chosen = result["threshold"] or {}
    measured = held.get("measured") or {}
    estimated = held.get("estimated") or {}
    lift = (
        None
        if measured.get("accuracy") is None or held["raw_accuracy"] is None
        else round(measured["accuracy"] - held["raw_accuracy"], 4)
    )
    gap = (
        None
        if measured.get("accuracy") is None or estimated.get("accuracy") is None
        else round(estimated["accuracy"] - measured["accuracy"], 4)
    )
    return {
        "bench": "calibration",
        "labels": labeled["labels"],
        "label_seconds": round(label_s, 1),
        "target": result["target"],
        "calibration_items": result["calibration_items"],
        "threshold": chosen.get("threshold"),
        "threshold_coverage": chosen.get("coverage"),
        "threshold_accuracy": chosen.get("accuracy"),
        "threshold_lower_bound": chosen.get("lower"),
        "withheld_items": held["items"],
        "withheld_raw_accuracy": held["raw_accuracy"],
        "withheld_kept_coverage": measured.get("coverage"),
        "withheld_kept_accuracy": measured.get("accuracy"),
        "withheld_kept_interval": measured.get("interval"),
        "lift_points": None if lift is None else round(100 * lift, 2),
        "estimated_accuracy": estimated.get("accuracy"),
        "estimated_interval": [estimated.get("lower"), estimated.get("upper")],
        "estimate_minus_measured_points": None if gap is None else round(100 * gap, 2),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
    }


if __name__ == "__main__":
    main()
