"""Embedded backfill of the bundled BBC corpus against the real local teacher; prints JSON.

    python bench/embedded_backfill.py --limit 2225

Starts `stillhouse teacher serve` (all-MiniLM-L6-v2) on a free loopback port, labels into a
fresh SQLite file, and reports wall time, items per second and accuracy against the
known-good records. The teacher's own CPU work dominates on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

from rich.console import Console

from stillhouse.commands import run_backfill
from stillhouse.servers.teacher.process import local_teacher
from stillhouse.settings import Settings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--limit", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, local_teacher() as base_url:
        settings = Settings(
            database_url=f"sqlite:///{tmp}/bench.db", broker_url=None, teacher_base_url=base_url
        )
        started = time.perf_counter()
        result = run_backfill(
            settings,
            "bbc",
            "triage",
            limit=args.limit,
            wait=True,
            console=Console(stderr=True, quiet=True),
        )
        seconds = time.perf_counter() - started
    print(
        json.dumps(
            {
                "bench": "embedded_backfill",
                "items": result["labels"],
                "seconds": round(seconds, 2),
                "items_per_s": round(result["labels"] / seconds, 2),
                "teacher_calls": result["teacher_calls"],
                "teacher_accuracy": result["teacher_accuracy"],
                "accepted": result["accepted"],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
