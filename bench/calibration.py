"""Trusting labels without a record, on real data, as a user meets it (the `stillhouse` command,
embedded, a scratch SQLite store, the local teachers); prints one JSON object per part.

    python bench/calibration.py                    # every part
    python bench/calibration.py --part triage      # or suspects, wnut, ranking

Parts:

- ``triage``: the whole BBC corpus labeled with the bundled triage spec, which asks only for
  ``checks.target_accuracy: 0.95``. 20 % of the records are withheld from the checks (a stable
  hash of the id): those items are labeled as if live, held to the threshold learned while
  labeling, and judged afterwards against their records. Reported from `stillhouse report`
  (its ``calibrated`` section) and `stillhouse calibrate`: the raw teacher's accuracy on the
  withheld share, the accuracy and coverage of the labels the threshold kept there (the lift
  is the difference), and the estimate beside the measurement.
- ``suspects``: the BBC corpus with 5 % of its records flipped to another topic at random (a
  fixed seed), labeled, then `stillhouse review suspects`: the precision and recall of the
  suspect-record queue against the flipped records.
- ``wnut`` and ``ranking``: WNUT-16 extraction (spaCy teacher, its beam-search confidence) and
  BBC ranking (MiniLM, the softmax of its scores), labeled, then `stillhouse calibrate` at
  targets chosen from the raw accuracy (no target set in advance): the coverage and lift on the
  withheld share at each.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from stillhouse.servers.teacher.process import local_teacher

PARTS = ("triage", "suspects", "wnut", "ranking")
QUEUES = ["business", "entertainment", "politics", "sport", "tech"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=PARTS, action="append", help="default: every part")
    parser.add_argument("--limit", type=int, default=None, help="items per part (default: all)")
    parser.add_argument("--flip-share", type=float, default=0.05)
    args = parser.parse_args()
    for part in args.part or PARTS:
        with tempfile.TemporaryDirectory() as tmp:
            started = time.monotonic()
            result = globals()[f"_{part}"](Path(tmp), args)
            result["seconds"] = round(time.monotonic() - started, 1)
            result.update(python=sys.version.split()[0], cpus=os.cpu_count())
            print(json.dumps(result), flush=True)


def _env(tmp: Path, url: str) -> dict[str, str]:
    return {
        **os.environ,
        "STILLHOUSE_DATABASE_URL": f"sqlite:///{tmp}/calibration.db",
        "STILLHOUSE_BROKER_URL": "",
        "STILLHOUSE_TEACHER_BASE_URL": url,
    }


def _cli(env: dict[str, str], *args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "stillhouse", *args], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"stillhouse {' '.join(args)} failed: {done.stderr}")
    data: dict[str, Any] = json.loads(done.stdout)
    return data


def _backfill(env: dict[str, str], source: str, spec: str, limit: int | None) -> dict[str, Any]:
    command = ["backfill", source, "--spec", spec, "--json"]
    if limit:
        command += ["--limit", str(limit)]
    return _cli(env, *command)


def _points(value: float | None) -> float | None:
    return None if value is None else round(100 * value, 2)


def _triage(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    with local_teacher() as url:
        env = _env(tmp, url)
        labeled = _backfill(env, "bbc", "triage", args.limit)
        report = _cli(env, "report", "--spec", "triage", "--json")
        curve = _cli(env, "calibrate", "--spec", "triage", "--target", "0.95", "--json")
    calibrated = report["calibrated"]
    held = calibrated["withheld"]
    raw = curve["withheld"]["raw_accuracy"]
    measured, estimated = held["measured_accuracy"], held["estimated_accuracy"]
    return {
        "bench": "calibration",
        "part": "triage",
        "labels": labeled["labels"],
        "target": calibrated["target"],
        "calibration": calibrated["calibration"],
        "withheld_items": held["labels"],
        "withheld_raw_accuracy": raw,
        "withheld_kept_coverage": held["coverage"],
        "withheld_kept_accuracy": measured,
        "withheld_kept_interval": held["measured_interval"],
        "lift_points": _points(None if measured is None else measured - raw),
        "estimated_accuracy": estimated,
        "estimated_interval": held["estimated_interval"],
        "estimate_minus_measured_points": _points(
            None if measured is None or estimated is None else estimated - measured
        ),
        "without_record": calibrated["without_record"],
    }


def _suspects(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    from examples.bbc import iter_bbc

    rng = random.Random(15)
    flipped: set[str] = set()
    source = tmp / "bbc_flipped.jsonl"
    with source.open("w", encoding="utf-8") as out:
        for row in iter_bbc(args.limit):
            if rng.random() < args.flip_share:
                row = {**row, "queue": rng.choice([q for q in QUEUES if q != row["queue"]])}
                flipped.add(row["id"])
            out.write(json.dumps(row) + "\n")
    with local_teacher() as url:
        env = _env(tmp, url)
        labeled = _backfill(env, str(source), "triage", None)
        started = time.monotonic()
        found = _cli(env, "review", "suspects", "--spec", "triage", "--json")
        suspects_s = time.monotonic() - started
        queue = _cli(
            env, "review", "list", "--spec", "triage", "--reason", "suspect_record",
            "--limit", "100000", "--json",
        )  # fmt: skip
    hits = sum(entry["external_id"] in flipped for entry in queue)
    top = queue[: len(flipped)]
    return {
        "bench": "calibration",
        "part": "suspects",
        "labels": labeled["labels"],
        "records": found["records"],
        "flipped": len(flipped),
        "queued": len(queue),
        "precision": round(hits / len(queue), 4) if queue else None,
        "recall": round(hits / len(flipped), 4) if flipped else None,
        "precision_at_flipped": round(sum(e["external_id"] in flipped for e in top) / len(top), 4)
        if top
        else None,
        "suspects_seconds": round(suspects_s, 1),
    }


def _wnut(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    with local_teacher(backend="spacy") as url:
        return _curve(tmp, url, "wnut", "wnut_extraction", args.limit)


def _ranking(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    with local_teacher() as url:
        return _curve(tmp, url, "bbc-ranking", "ranking", args.limit)


def _curve(tmp: Path, url: str, source: str, spec: str, limit: int | None) -> dict[str, Any]:
    env = _env(tmp, url)
    labeled = _backfill(env, source, spec, limit)
    base = _cli(env, "calibrate", "--spec", spec, "--json")
    raw = base["raw_accuracy"]
    targets = sorted({round(min(0.99, raw + lift), 2) for lift in (0.03, 0.05, 0.10)})
    at: list[dict[str, Any]] = []
    for target in targets:
        result = _cli(env, "calibrate", "--spec", spec, "--target", str(target), "--json")
        held = result["withheld"]
        measured = held.get("measured") or {}
        estimated = held.get("estimated") or {}
        accuracy = measured.get("accuracy")
        at.append(
            {
                "target": target,
                "threshold": (result["threshold"] or {}).get("threshold"),
                "withheld_kept_coverage": measured.get("coverage"),
                "withheld_kept_accuracy": accuracy,
                "lift_points": _points(
                    None if accuracy is None else accuracy - held["raw_accuracy"]
                ),
                "estimated_accuracy": estimated.get("accuracy"),
                "estimate_minus_measured_points": _points(
                    None
                    if accuracy is None or estimated.get("accuracy") is None
                    else estimated["accuracy"] - accuracy
                ),
            }
        )
    return {
        "bench": "calibration",
        "part": spec,
        "labels": labeled["labels"],
        "calibration_items": base["calibration_items"],
        "raw_accuracy": raw,
        "withheld_items": base["withheld"]["items"],
        "withheld_raw_accuracy": base["withheld"]["raw_accuracy"],
        "curve": [
            {k: p[k] for k in ("threshold", "coverage", "accuracy", "lower")} for p in base["curve"]
        ],
        "at_targets": at,
    }


if __name__ == "__main__":
    main()
