"""How well the checks filter real teacher labels, on three bundled use cases; prints JSON.

    python bench/filtering.py [--triage N] [--wnut N] [--ranking N]

Each part starts the real local teacher it needs (`stillhouse teacher serve`, on a free
loopback port), labels with `python -m stillhouse backfill SOURCE --spec SPEC --limit N
--json` into a fresh SQLite file (embedded: no broker), and reads `stillhouse report --spec
SPEC --json`. What it measures:

- triage (``bbc``, ``triage`` spec, MiniLM zero-shot teacher): the teacher's raw accuracy
  against the known-good queue over all labels (read from the database: the label equals the
  record's), and on the withheld share (``checks.withhold_share``, the checks never saw the
  record) the share of labels the other checks accepted and their accuracy;
- wnut (``wnut``, ``wnut_extraction`` spec, spaCy teacher): field-level micro precision and
  recall of the entity lists, accepted labels against all raw labels (the report's
  ``overall.fields``, on the items whose record the checks saw);
- ranking (``bbc-ranking``, ``ranking`` spec, MiniLM teacher): mean Kendall's tau, top-1
  agreement and mean NDCG@k of accepted orderings against all raw ones (the report's
  ``overall.ranking``, on the items whose record the checks saw).

``--triage`` defaults to the whole BBC corpus (2,225 articles); 0 skips a part. One
embedding teacher serves triage and ranking, each part with its own database. Each part's
``seconds`` covers labeling and the report, not the teacher's start (``teacher_start_s``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from stillhouse.servers.teacher.process import local_teacher

TIMEOUT_S = 3600.0


def _cli(env: dict[str, str], *args: str) -> dict[str, Any]:
    """Run `python -m stillhouse ARGS` with ``env`` added and parse its JSON output."""
    done = subprocess.run(
        [sys.executable, "-m", "stillhouse", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"stillhouse {' '.join(args)} exited with {done.returncode}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@contextmanager
def _teacher(backend: str, timings: dict[str, float]) -> Iterator[str]:
    started = time.perf_counter()
    with local_teacher(backend) as url:
        timings[backend] = round(time.perf_counter() - started, 2)
        yield url


def _label(url: str, folder: Path, source: str, spec: str, limit: int | None) -> dict[str, Any]:
    """Backfill then report into ``folder/x.db``: the two JSON outputs and the wall time."""
    env = {
        "STILLHOUSE_DATABASE_URL": f"sqlite:///{folder}/x.db",
        "STILLHOUSE_BROKER_URL": "",
        "STILLHOUSE_TEACHER_BASE_URL": url,
    }
    started = time.perf_counter()
    limit_args = [] if limit is None else ["--limit", str(limit)]
    backfill = _cli(env, "backfill", source, "--spec", spec, *limit_args, "--json")
    report = _cli(env, "report", "--spec", spec, "--json")
    return {
        "backfill": backfill,
        "report": report,
        "seconds": round(time.perf_counter() - started, 2),
    }


def _raw_label_accuracy(database: Path) -> tuple[int, float | None]:
    """Labels and the share whose ``label`` equals the known-good record's (triage: exact)."""
    with sqlite3.connect(database) as db:
        labels, agree = db.execute(
            # A label without an answer compares as NULL: it counts, and disagrees.
            "SELECT count(*), coalesce(sum(json_extract(labels.output, '$.label') = "
            "json_extract(items.known_good, '$.label')), 0) "
            "FROM labels JOIN items ON items.id = labels.item_id WHERE items.known_good IS NOT NULL"
        ).fetchone()
    return labels, round(agree / labels, 4) if labels else None


def _triage(url: str, folder: Path, limit: int | None) -> dict[str, Any]:
    run = _label(url, folder, "bbc", "triage", limit)
    report, held = run["report"], run["report"]["withheld"]
    compared, accuracy = _raw_label_accuracy(folder / "x.db")
    return {
        "items": run["backfill"]["labels"],
        "teacher_accuracy": accuracy,
        "teacher_accuracy_compared": compared,
        "teacher_accuracy_checked_share": report["overall"]["teacher_agreement"],
        "accepted": run["backfill"]["accepted"],
        "withheld": {
            "labels": held["labels"],
            "accepted_share": held["accepted_share"],
            "accepted_accuracy": held["accepted_accuracy"],
            "raw_accuracy": held["raw_accuracy"],
        },
        "seconds": run["seconds"],
    }


def _wnut(url: str, folder: Path, limit: int) -> dict[str, Any]:
    run = _label(url, folder, "wnut", "wnut_extraction", limit)
    overall, held = run["report"]["overall"], run["report"]["withheld"]
    return {
        "items": run["backfill"]["labels"],
        "accepted": run["backfill"]["accepted"],
        "checked": overall["labels"],
        "checked_accepted": overall["by_verdict"].get("accepted", 0),
        "fields": overall["fields"],
        "withheld": {"labels": held["labels"], "accepted_share": held["accepted_share"]},
        "seconds": run["seconds"],
    }


def _ranking(url: str, folder: Path, limit: int) -> dict[str, Any]:
    run = _label(url, folder, "bbc-ranking", "ranking", limit)
    overall = run["report"]["overall"]
    accepted, raw = overall["ranking"]["accepted"]["ranking"], overall["ranking"]["raw"]["ranking"]
    k = raw["k"]
    return {
        "queries": run["backfill"]["labels"],
        "accepted": run["backfill"]["accepted"],
        "scored_raw": raw["count"],
        "scored_accepted": accepted["count"],
        "mean_tau_accepted": accepted["mean_tau"],
        "mean_tau_raw": raw["mean_tau"],
        "top1_accepted": accepted["top1_agreement"],
        "top1_raw": raw["top1_agreement"],
        f"ndcg_at_{k}_accepted": accepted["mean_ndcg"],
        f"ndcg_at_{k}_raw": raw["mean_ndcg"],
        "seconds": run["seconds"],
    }


def _machine() -> dict[str, Any]:
    memory_kb = 0
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        first = meminfo.read_text().splitlines()[0]  # "MemTotal:  24567890 kB"
        memory_kb = int(first.split()[1])
    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(memory_kb / 2**20, 1),
        "gpu": shutil.which("nvidia-smi") is not None,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def _in_folder(url: str, run: Callable[[str, Path], dict[str, Any]]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        return run(url, Path(tmp))


def main() -> int:
    parser = argparse.ArgumentParser(description="How well the checks filter real labels.")
    parser.add_argument("--triage", type=int, default=None, help="BBC articles (default: all)")
    parser.add_argument("--wnut", type=int, default=500, help="WNUT-16 tweets (default 500)")
    parser.add_argument("--ranking", type=int, default=150, help="headline queries (default 150)")
    args = parser.parse_args()
    parts: dict[str, Any] = {}
    teacher_start_s: dict[str, float] = {}
    started = time.perf_counter()
    machine = _machine()
    if args.triage != 0 or args.ranking:
        # One embedding teacher serves both parts, each with its own database.
        with _teacher("embedding", teacher_start_s) as url:
            if args.triage != 0:
                parts["triage"] = _in_folder(url, lambda u, f: _triage(u, f, args.triage))
            if args.ranking:
                parts["ranking"] = _in_folder(url, lambda u, f: _ranking(u, f, args.ranking))
    if args.wnut:
        with _teacher("spacy", teacher_start_s) as url:
            parts["wnut"] = _in_folder(url, lambda u, f: _wnut(u, f, args.wnut))
    out: dict[str, Any] = {
        "bench": "filtering",
        **{name: parts[name] for name in ("triage", "wnut", "ranking") if name in parts},
        "teacher_start_s": teacher_start_s,
        "seconds": round(time.perf_counter() - started, 2),
        "machine": machine,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
