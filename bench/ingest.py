"""Bulk ingest into Postgres: rows per second from a JSONL file of 1 KB documents; prints JSON.

    python bench/ingest.py --rows 1000000

Writes a JSONL file of ``--rows`` ticket-like rows (a 1,000-byte body each, every text
distinct), then loads it with ``run_backfill(..., BackfillOptions(load_only=True))`` in this
process: the code path of ``stillhouse backfill FILE --spec bench_ingest --load-only``.
Writing the file is not timed; the timed part is the whole backfill call (connect, stream,
normalize, COPY, commit). ``peak_rss_mb`` is this process's ``ru_maxrss``; the file is
written streaming, so the peak is the loader's.

Database: ``STILLHOUSE_DATABASE_URL`` when it names Postgres (the rows are loaded under the
spec name ``bench_ingest`` and deleted again at the end). When it is unset or SQLite, a
scratch database is created from ``--admin-url`` and dropped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import orjson
import yaml
from reference import drop_database, scratch_database
from rich.console import Console
from sqlalchemy import create_engine, text

from stillhouse.commands import BackfillOptions, run_backfill
from stillhouse.settings import Settings
from storage.migrate import upgrade
from workers.spec import load_spec

SPEC_NAME = "bench_ingest"
ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
QUEUES = ("business", "entertainment", "politics", "sport", "tech")


def write_rows(path: Path, rows: int, seed: int = 7) -> None:
    """A JSONL file of ``rows`` distinct 1 KB documents, written as it is generated."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choices(letters, k=rng.randint(2, 10))) for _ in range(5000)]
    sentences = [" ".join(rng.choices(words, k=rng.randint(6, 18))) + "." for _ in range(4000)]
    with path.open("wb") as out:
        for n in range(rows):
            body = f"Ticket {n}. " + " ".join(rng.choices(sentences, k=14))
            row = {
                "id": f"doc-{n:08d}",
                "headline": f"Report {n}: {sentences[n % len(sentences)][:60]}",
                "body": body[:1000],
                "queue": QUEUES[n % len(QUEUES)],
                "length": "medium",
            }
            out.write(orjson.dumps(row) + b"\n")


def bench_spec(folder: Path) -> Path:
    """The triage spec under its own name, so the bench never touches real triage items."""
    body = load_spec("triage").body | {"name": SPEC_NAME}
    path = folder / f"{SPEC_NAME}.yaml"
    path.write_text(yaml.safe_dump(body), encoding="utf-8")
    return path


def _database(admin_url: str) -> tuple[str, str | None]:
    """The database to load into, and the scratch database's name when one was created."""
    url = os.environ.get("STILLHOUSE_DATABASE_URL", "")
    if url.startswith("postgresql"):
        return url, None
    scratch, name = scratch_database(admin_url)
    upgrade(scratch)
    return scratch, name


def _forget_bench_rows(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM items WHERE spec_name = :n"), {"n": SPEC_NAME})
        conn.execute(text("DELETE FROM specs WHERE name = :n"), {"n": SPEC_NAME})
    engine.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--admin-url", default=ADMIN_URL)
    args = parser.parse_args()
    url, scratch = _database(args.admin_url)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            source = folder / "rows.jsonl"
            started = time.perf_counter()
            write_rows(source, args.rows)
            generate_s = time.perf_counter() - started
            spec = bench_spec(folder)
            if scratch is None:
                _forget_bench_rows(url)
            settings = Settings(database_url=url, broker_url=None)
            cpu_started = time.process_time()
            started = time.perf_counter()
            result = run_backfill(
                settings,
                str(source),
                str(spec),
                limit=None,
                wait=False,
                console=Console(stderr=True, quiet=True),
                options=BackfillOptions(load_only=True, rejects=folder / "rejects.jsonl"),
            )
            seconds = time.perf_counter() - started
            cpu_s = time.process_time() - cpu_started
            file_mb = source.stat().st_size / 2**20
    finally:
        if scratch is None:
            _forget_bench_rows(url)
        else:
            drop_database(args.admin_url, scratch)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "bench": "ingest",
                "rows": result["rows"],
                "inserted": result["inserted"],
                "bad_rows": result["bad_rows"],
                "seconds": round(seconds, 2),
                "rows_per_s": round(result["rows"] / seconds),
                "peak_rss_mb": round(peak_kb / 1024, 1),
                # The loader's own CPU (both threads): near `seconds` means Python is the limit.
                "loader_cpu_s": round(cpu_s, 2),
                "file_mb": round(file_mb, 1),
                "generate_seconds": round(generate_s, 2),
                "database": "scratch" if scratch else "STILLHOUSE_DATABASE_URL",
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
