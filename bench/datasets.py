"""Datasets at scale on Postgres: `dataset create` and `export --format parquet` over a million
labels, and reading a view through the read-only role against the same query on the base
tables; prints JSON.

    python bench/datasets.py --labels 1000000

A scratch database is made from ``--admin-url`` and filled in SQL (``generate_series``): items
of the bundled triage spec with ~300-character texts, five queues as slices and known-good
records, one accepted label (a cached answer and its paid call) per item, one item in ten
rejected, one accepted item in fifty with a second submitted id (an alias). Filling is not timed.

Timed, each as a user runs it, in a child process (``python -m stillhouse …``), with the
child's own peak RSS from ``wait4``:
- ``dataset create`` with the defaults (accepted labels, 80/10/10), then with ``--balance``;
- ``export --format parquet`` of the first.

Then, as the role ``grant-reader`` makes, a full read of ``labeled_clean`` (every row fetched
to the client) and an aggregate over it, each against the same query written on the base
tables as the owner, median of three; ``view_over_base`` is their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import create_engine, text

from storage.migrate import upgrade
from storage.readers import grant_reader
from storage.session import make_engine, make_sessionmaker
from workers.ingest import store_spec
from workers.spec import load_spec

QUEUES = ("business", "entertainment", "politics", "sport", "tech")

FILL = """
INSERT INTO items (id, spec_name, spec_id, external_id, content_hash, text, payload, slices,
                   known_good, state, attempts)
SELECT n, 'triage', {spec_id}, 'tk-' || lpad(n::text, 8, '0'), md5(n::text) || md5('x' || n),
       'Ticket ' || n || ': ' || repeat('the customer writes about the order again ', 7),
       jsonb_build_object('id', 'tk-' || n),
       jsonb_build_object('queue', (ARRAY{queues})[1 + n % 5],
                          'length', CASE WHEN n % 3 = 0 THEN 'long' ELSE 'short' END),
       jsonb_build_object('label', (ARRAY{queues})[1 + n % 5]),
       CASE WHEN n % 10 = 0 THEN 'rejected' ELSE 'accepted' END, 1
FROM generate_series(1, {n}) AS n;
INSERT INTO teacher_responses (request_hash, provider, model, request, response, prompt_tokens,
                               completion_tokens, replayable)
SELECT md5('r' || n) || md5('s' || n), 'openai', 'teacher-m', '{{}}'::jsonb,
       jsonb_build_object('content', n), 120, 12, true
FROM generate_series(1, {n}) AS n;
INSERT INTO teacher_calls (item_id, spec_id, request_hash, attempt, status, prompt_tokens,
                           completion_tokens, cost_usd, latency_ms)
SELECT n, {spec_id}, md5('r' || n) || md5('s' || n), 1, 'ok', 120, 12, 0.00003, 300
FROM generate_series(1, {n}) AS n;
INSERT INTO labels (item_id, spec_id, output, verdict, reasons, confidence, agreement,
                    known_good_match, request_hash)
SELECT n, {spec_id},
       jsonb_build_object('label', (ARRAY{queues})[1 + (n + (n % 10 = 0)::int) % 5],
                          'confidence', 0.5 + (n % 50) / 100.0),
       CASE WHEN n % 10 = 0 THEN 'rejected' ELSE 'accepted' END,
       CASE WHEN n % 10 = 0 THEN '["known_good_mismatch"]'::jsonb ELSE '[]'::jsonb END,
       0.5 + (n % 50) / 100.0, 1.0, n % 10 <> 0, md5('r' || n) || md5('s' || n)
FROM generate_series(1, {n}) AS n;
INSERT INTO item_aliases (spec_name, external_id, item_id)
SELECT 'triage', 'tk-alias-' || n, n FROM generate_series(7, {n}, 50) AS n;
SELECT setval(pg_get_serial_sequence('items', 'id'), {n});
ANALYZE;
"""

READS = {
    "full_read": (
        "SELECT external_id, output, confidence, slices FROM labeled_clean "
        "WHERE spec_name = 'triage'",
        "SELECT i.external_id, l.output, l.confidence, i.slices FROM labels l "
        "JOIN items i ON i.id = l.item_id JOIN specs s ON s.id = l.spec_id "
        "LEFT JOIN teacher_responses r ON r.request_hash = l.request_hash "
        "WHERE l.verdict = 'accepted' AND s.name = 'triage' "
        "UNION ALL SELECT a.external_id, l.output, l.confidence, i.slices FROM labels l "
        "JOIN items i ON i.id = l.item_id JOIN item_aliases a ON a.item_id = i.id "
        "JOIN specs s ON s.id = l.spec_id "
        "LEFT JOIN teacher_responses r ON r.request_hash = l.request_hash "
        "WHERE l.verdict = 'accepted' AND s.name = 'triage'",
    ),
    "aggregate": (
        "SELECT slices->>'queue', count(*), avg(confidence) FROM labeled_clean "
        "WHERE spec_name = 'triage' GROUP BY 1",
        "SELECT q, count(*), avg(c) FROM ("
        "SELECT i.slices->>'queue' AS q, l.confidence AS c FROM labels l "
        "JOIN items i ON i.id = l.item_id JOIN specs s ON s.id = l.spec_id "
        "WHERE l.verdict = 'accepted' AND s.name = 'triage' "
        "UNION ALL SELECT i.slices->>'queue', l.confidence FROM labels l "
        "JOIN items i ON i.id = l.item_id JOIN item_aliases a ON a.item_id = i.id "
        "JOIN specs s ON s.id = l.spec_id "
        "WHERE l.verdict = 'accepted' AND s.name = 'triage') t GROUP BY 1",
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=int, default=1_000_000)
    parser.add_argument(
        "--admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    )
    args = parser.parse_args()
    name = f"stillhouse_bench_ds_{uuid.uuid4().hex[:8]}"
    admin = create_engine(args.admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = args.admin_url.rsplit("/", 1)[0] + f"/{name}"
    role = f"bench_reader_{uuid.uuid4().hex[:6]}"
    try:
        print(json.dumps(run(url, args.labels, role)))
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(text(f'DROP ROLE IF EXISTS "{role}"'))
        admin.dispose()


def run(url: str, n: int, role: str) -> dict[str, Any]:
    upgrade(url)
    engine = make_engine(url)
    with make_sessionmaker(engine).begin() as session:
        spec_id = store_spec(session, load_spec("triage")).id
    started = time.monotonic()
    queues = "[" + ", ".join(f"'{q}'" for q in QUEUES) + "]"
    with psycopg.connect(url.replace("postgresql+psycopg", "postgresql")) as conn:
        conn.execute(FILL.format(n=n, spec_id=spec_id, queues=queues))  # type: ignore[arg-type]
    fill_s = time.monotonic() - started
    grant_reader(engine, role, create=True)
    engine.dispose()
    env = {**os.environ, "STILLHOUSE_DATABASE_URL": url, "STILLHOUSE_BROKER_URL": ""}
    create = _child(env, "dataset", "create", "bench", "--spec", "triage", "--json")
    balanced = _child(
        env, "dataset", "create", "bench-balanced", "--spec", "triage", "--balance", "--json"
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench"
        export = _child(env, "export", "bench", "--out", str(out), "--json")
        parquet_mb = sum(p.stat().st_size for p in out.glob("*.parquet")) / 2**20
    rows = json.loads(create["stdout"])["rows"]
    reads = _reads(url, role)
    return {
        "bench": "datasets",
        "labels": n,
        "dataset_rows": rows,
        "fill_seconds": round(fill_s, 1),
        "dataset_create_seconds": create["seconds"],
        "dataset_create_peak_rss_mb": create["peak_rss_mb"],
        "dataset_create_balanced_seconds": balanced["seconds"],
        "export_parquet_seconds": export["seconds"],
        "export_parquet_rows_per_s": round(rows / export["seconds"]),
        "export_parquet_peak_rss_mb": export["peak_rss_mb"],
        "parquet_mb": round(parquet_mb, 1),
        **reads,
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
    }


def _child(env: dict[str, str], *args: str) -> dict[str, Any]:
    """``python -m stillhouse ARGS``: its wall time, its own peak RSS (``wait4``) and stdout."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.monotonic()
        process = subprocess.Popen(
            [sys.executable, "-m", "stillhouse", *args], env=env, stdout=out, stderr=err
        )
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.monotonic() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if process.returncode != 0:
            raise SystemExit(f"stillhouse {' '.join(args)} failed: {err.read()}")
        return {
            "seconds": round(seconds, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux: KiB
            "stdout": out.read(),
        }


def _reads(url: str, role: str) -> dict[str, Any]:
    owner_dsn = url.replace("postgresql+psycopg", "postgresql")
    reader_dsn = owner_dsn.rsplit("//", 1)[0] + f"//{role}@" + owner_dsn.split("@", 1)[1]
    out: dict[str, Any] = {}
    for what, (view_sql, base_sql) in READS.items():
        view = [_timed(reader_dsn, view_sql) for _ in range(3)]
        base = [_timed(owner_dsn, base_sql) for _ in range(3)]
        out[f"{what}_view_s"] = round(statistics.median(t for t, _ in view), 3)
        out[f"{what}_base_s"] = round(statistics.median(t for t, _ in base), 3)
        out[f"{what}_rows"] = view[0][1]
        assert view[0][1] == base[0][1], (what, view[0][1], base[0][1])
        out[f"{what}_view_over_base"] = round(out[f"{what}_view_s"] / out[f"{what}_base_s"], 3)
    return out


def _timed(dsn: str, sql: str) -> tuple[float, int]:
    with psycopg.connect(dsn) as conn:
        started = time.monotonic()
        with conn.cursor(name="bench") as cursor:  # server-side: rows stream to the client
            cursor.itersize = 10_000
            cursor.execute(sql.encode())
            count = sum(1 for _ in cursor)
        return time.monotonic() - started, count


if __name__ == "__main__":
    main()
