"""Bulk backfill: streaming readers, rejects file, content dedupe, COPY, resume after SIGKILL.

Runs on real SQLite and real Postgres (the `sessions` and `database_url` fixtures of conftest).
"""

from __future__ import annotations

import copy
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.orm import Session, sessionmaker
from support.clitools import run_cli

from schemas.errors import ConfigError
from storage.bulk import PROBE_CONTENT, PROBE_IDS, content_owners
from storage.items import ItemIn
from storage.models import Item, ItemAlias, SpecRow
from storage.session import make_engine, make_sessionmaker
from workers.ingest import RejectsFile, SourceRow, load_source, read_source, read_sql
from workers.spec import Spec, load_spec, parse_spec


@pytest.fixture(scope="module")
def spec() -> Spec:
    return load_spec("triage")


def ticket(ext_id: Any, queue: str = "sport", **extra: Any) -> dict[str, Any]:
    row = {"id": ext_id, "headline": f"Headline {ext_id}", "body": f"Body of {ext_id}."}
    row.update({"queue": queue, "length": "short", **extra})
    return row


def write_lines(path: Path, lines: list[dict[str, Any] | bytes]) -> Path:
    raw = b"".join(
        (json.dumps(line).encode() if isinstance(line, dict) else line) + b"\n" for line in lines
    )
    path.write_bytes(raw)
    return path


def stored(sessions: sessionmaker[Session]) -> dict[str, Item]:
    with sessions() as session:
        return {i.external_id: i for i in session.scalars(select(Item))}


def known_good(sessions: sessionmaker[Session]) -> dict[str, dict[str, Any]]:
    with sessions() as session:
        rows = session.execute(
            select(Item.external_id, Item.known_good).where(Item.known_good.is_not(None))
        )
        return {ext: fields for ext, fields in rows}


def rejects_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --- bad rows into the rejects file, good rows loaded -----------------------------------------


def test_every_kind_of_bad_row_goes_to_the_rejects_file_while_good_rows_load(
    tmp_path: Path, sessions: sessionmaker[Session], spec: Spec
) -> None:
    source = write_lines(
        tmp_path / "rows.jsonl",
        [
            ticket("a"),  # 1
            {"headline": "no id", "body": "b"},  # 2 missing id
            ticket("big", body="x" * 5000),  # 3 over --max-doc-bytes
            b'{"id": "u", "body": "caf\xe9"}',  # 4 invalid UTF-8
            ticket("obj", body={"nested": "object"}),  # 5 wrong type: text field
            ticket(["list", "id"]),  # 6 wrong type: id
            ticket(1.5),  # 7 wrong type: float id
            b'{"id": "broken", ',  # 8 not JSON
            ticket("b"),  # 9
            ticket("x" * 300),  # 10 id too long
        ],
    )
    rejects = RejectsFile(tmp_path / "rejects.jsonl", position="line")

    with rejects:
        rows = read_source(str(source), max_doc_bytes=2000)
        summary = load_source(sessions, spec, rows, rejects=rejects, max_doc_bytes=2000)

    assert set(stored(sessions)) == {"a", "b"}
    assert summary.rows == 10
    assert summary.bad_count == rejects.count == 8
    assert summary.counts.inserted == 2
    lines = rejects_of(tmp_path / "rejects.jsonl")
    assert [r["line"] for r in lines] == [2, 3, 4, 5, 6, 7, 8, 10]
    reasons = [r["reason"] for r in lines]
    assert "missing or invalid id field 'id'" in reasons[0]
    assert "over the 2,000-byte limit (--max-doc-bytes)" in reasons[1]
    assert reasons[2] == "not valid UTF-8 (invalid continuation byte at byte 24)"
    assert "'body'" in reasons[3] and "an object" in reasons[3]
    assert "got list" in reasons[4]
    assert "got float" in reasons[5]
    assert reasons[6].startswith("not valid JSON")
    assert "over 256" in reasons[7]
    # The raw row comes along, cut short, for a person to fix and load again.
    assert json.loads(lines[0]["raw"]) == {"headline": "no id", "body": "b"}
    assert len(lines[1]["raw"]) == 2000
    assert lines[2]["raw"].startswith('{"id": "u"')
    assert lines[6]["raw"] == '{"id": "broken", '


def test_an_oversized_jsonl_line_is_skipped_unread(tmp_path: Path) -> None:
    source = write_lines(
        tmp_path / "rows.jsonl", [ticket("a"), ticket("b", body="y" * 100_000), ticket("c")]
    )

    rows = list(read_source(str(source), max_doc_bytes=1000))

    assert [(r.line, r.row is not None) for r in rows] == [(1, True), (2, False), (3, True)]
    assert rows[1].error is not None and "over the 1,000-byte limit" in rows[1].error
    assert rows[1].raw is not None and len(rows[1].raw) <= 2000


def test_csv_bad_rows_carry_line_numbers_and_the_file_goes_on(
    tmp_path: Path, sessions: sessionmaker[Session], spec: Spec
) -> None:
    source = tmp_path / "rows.csv"
    source.write_bytes(
        b"id,headline,body,queue,length\n"
        b"1,First,Body one,sport,short\n"
        b"2,Second,Bad \xff byte,tech,short\n"
        b"3,Third,too,many,values,here\n"
        b'4,Fourth,"multi\nline body",tech,long\n'
        b",No id,body,tech,short\n"
    )
    rejects = RejectsFile(tmp_path / "rejects.jsonl")

    with rejects:
        summary = load_source(sessions, spec, read_source(str(source)), rejects=rejects)

    items = stored(sessions)
    assert set(items) == {"1", "4"}
    assert items["4"].text == "Fourth\n\nmulti\nline body"
    assert summary.bad_count == 3
    lines = rejects_of(tmp_path / "rejects.jsonl")
    assert [(r["line"], r["reason"].split(" (")[0]) for r in lines] == [
        (3, "not valid UTF-8"),
        (4, "more values than header columns"),
        (7, "missing or invalid id field 'id'"),
    ]
    assert "\\udcff" in lines[0]["raw"]  # the undecodable byte, kept visible


# --- Parquet and SQL readers -----------------------------------------------------------------


def test_parquet_rows_stream_with_row_numbers_and_plain_json_values(
    tmp_path: Path, sessions: sessionmaker[Session], spec: Spec
) -> None:
    table = pa.table(
        {
            "id": pa.array([1, 2, 3, None], pa.int64()),
            "headline": ["One", "Two", "Three", "Four"],
            "body": pa.array([b"first", b"bad \xff", b"third", b"fourth"], pa.binary()),
            "queue": ["sport", "tech", "business", "tech"],
            "seen": [datetime(2024, 5, 1, 12, 0, tzinfo=UTC)] * 4,
            "amount": pa.array([Decimal("1.50"), Decimal("2"), None, None], pa.decimal128(6, 2)),
        }
    )
    path = tmp_path / "rows.parquet"
    pq.write_table(table, path, row_group_size=2)  # two row groups, streamed one by one

    rows = list(read_source(str(path)))

    assert [r.line for r in rows] == [1, 2, 3, 4]
    assert rows[0].row == {
        "id": 1,
        "headline": "One",
        "body": "first",
        "queue": "sport",
        "seen": "2024-05-01T12:00:00+00:00",
        "amount": 1.5,
    }
    assert rows[1] == SourceRow(2, None, "not valid UTF-8 (in column 'body')")
    assert rows[2].row is not None and rows[2].row["amount"] is None
    rejects = RejectsFile(tmp_path / "rejects.jsonl", position="row")
    with rejects:
        summary = load_source(sessions, spec, iter(rows), rejects=rejects)
    assert set(stored(sessions)) == {"1", "3"}
    assert summary.counts.inserted == 2
    assert [(r["row"], r["reason"]) for r in rejects_of(rejects.path)] == [
        (2, "not valid UTF-8 (in column 'body')"),
        (4, "missing or invalid id field 'id' (expected text or an integer, got missing)"),
    ]


def test_a_broken_parquet_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "rows.parquet"
    path.write_bytes(b"PAR1 this is not parquet")

    with pytest.raises(ConfigError, match="cannot read Parquet"):
        list(read_source(str(path)))


def _sqlite_tickets(path: Path, rows: list[tuple[Any, ...]]) -> str:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE tickets (id, headline, body, queue, length, score)")
        conn.executemany("INSERT INTO tickets VALUES (?, ?, ?, ?, ?, ?)", rows)
    conn.close()
    return f"sqlite:///{path}"


def test_read_sql_streams_a_query_with_row_numbers(tmp_path: Path) -> None:
    url = _sqlite_tickets(
        tmp_path / "src.db",
        [(f"t{i}", f"H{i}", f"B{i}", "sport", "short", i / 2) for i in range(5)],
    )

    rows = list(read_sql("SELECT * FROM tickets WHERE queue = 'sport' ORDER BY id", url))

    assert [r.line for r in rows] == [1, 2, 3, 4, 5]
    assert rows[4].row == {
        "id": "t4",
        "headline": "H4",
        "body": "B4",
        "queue": "sport",
        "length": "short",
        "score": 2.0,
    }
    assert len(list(read_sql("SELECT * FROM tickets", url, limit=2))) == 2


def test_read_sql_errors_are_config_errors(tmp_path: Path) -> None:
    url = _sqlite_tickets(tmp_path / "src.db", [])
    with pytest.raises(ConfigError, match="--from-sql: the query failed"):
        read_sql("SELECT * FROM no_such_table", url)
    with pytest.raises(ConfigError, match="--sql-url"):
        read_sql("SELECT 1", "nosuchdriver://x")


def test_cli_from_sql_loads_a_sqlite_table_into_postgres_with_rejects(
    tmp_path: Path, postgres_url: str
) -> None:
    rows = [(f"t{i}", f"Headline {i}", f"Body {i}", "tech", "long", None) for i in range(40)]
    rows.insert(7, (None, "no id", "body", "tech", "long", None))  # row 8
    source_url = _sqlite_tickets(tmp_path / "legacy.db", rows)
    rejects = tmp_path / "bad.jsonl"
    env = {"STILLHOUSE_DATABASE_URL": postgres_url, "STILLHOUSE_BROKER_URL": ""}
    args = ["backfill", "--spec", "triage", "--load-only", "--json", "--rejects", str(rejects)]
    query = ["--from-sql", "SELECT * FROM tickets ORDER BY rowid", "--sql-url", source_url]

    run = run_cli(env, *args, *query, timeout=120)

    assert run.returncode == 1, run.stderr  # a bad row: exit code 1, the good rows loaded
    result = json.loads(run.stdout)
    assert result["rows"] == 41
    assert result["inserted"] == 40
    assert result["bad_rows"] == 1
    assert result["rejects"] == str(rejects)
    assert "labeled" not in result  # --load-only: no labeling
    assert [r["row"] for r in rejects_of(rejects)] == [8]
    engine = create_engine(postgres_url)
    with engine.connect() as conn:
        count = conn.scalar(text("SELECT count(*) FROM items WHERE state = 'pending'"))
        labels = conn.scalar(text("SELECT count(*) FROM labels"))
    engine.dispose()
    assert (count, labels) == (40, 0)

    again = run_cli(env, *args, *query, timeout=120)
    assert json.loads(again.stdout)["already_loaded"] == 40


def test_cli_writes_rejects_next_to_the_store_by_default(tmp_path: Path) -> None:
    source = write_lines(tmp_path / "rows.jsonl", [ticket("a"), b"{nope", ticket("b")])
    env = {
        "STILLHOUSE_DATABASE_URL": f"sqlite:///{tmp_path}/store/s.db",
        "STILLHOUSE_BROKER_URL": "",
    }

    run = run_cli(env, "backfill", str(source), "--spec", "triage", "--load-only", "--json")

    assert run.returncode == 1, run.stderr
    result = json.loads(run.stdout)
    assert (result["inserted"], result["bad_rows"]) == (2, 1)
    path = Path(result["rejects"])
    assert path.parent == tmp_path / "store" / "rejects"
    assert path.name.startswith("triage-") and path.suffix == ".jsonl"
    assert [r["line"] for r in rejects_of(path)] == [2]
    assert f"bad rows written to {path}" in run.stderr.replace("\n", "")


# --- dedupe by id and by content -------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 1000])
def test_duplicate_content_under_another_id_is_counted_not_stored(
    tmp_path: Path, sessions: sessionmaker[Session], spec: Spec, chunk_size: int
) -> None:
    # The same text after normalization: CRLF, a BOM, NFD accents, outer whitespace.
    source = write_lines(
        tmp_path / "rows.jsonl",
        [
            ticket("a", body="Caf\u00e9 opens.\nAgain."),
            ticket("b", headline="Headline a", body="\ufeffCafe\u0301 opens.\r\nAgain.  "),
            ticket("c"),
            ticket("a", body="Changed later."),
        ],
    )

    first = load_source(sessions, spec, read_source(str(source)), chunk_size=chunk_size)
    again = load_source(sessions, spec, read_source(str(source)), chunk_size=chunk_size)

    assert set(stored(sessions)) == {"a", "c"}
    for summary in (first, again):
        counts = summary.counts
        assert summary.rows == 4
        assert counts.inserted + counts.existing + counts.duplicate_content == 4
        assert counts.duplicate_content == 1
        assert counts.changed == 1 and "a" in counts.changed_ids
    assert (first.counts.inserted, again.counts.inserted) == (2, 0)
    assert stored(sessions)["a"].text == "Headline a\n\nCaf\u00e9 opens.\nAgain."


def test_keep_duplicate_content_stores_every_id(
    tmp_path: Path, sessions: sessionmaker[Session], spec: Spec
) -> None:
    source = write_lines(
        tmp_path / "rows.jsonl",
        [ticket("a"), ticket("b", headline="Headline a", body="Body of a.")],
    )

    summary = load_source(
        sessions, spec, read_source(str(source)), keep_duplicate_content=True, chunk_size=1
    )

    assert summary.counts.inserted == 2
    items = stored(sessions)
    assert items["a"].content_hash == items["b"].content_hash


def _repeats_near_each_other(rows: int) -> list[dict[str, Any]]:
    """Ids and contents that come back 1 to 7 rows later, so across chunks of 3 rows.

    Every fifth row repeats a recent id (every tenth with changed, never-seen content) and
    every seventh gives a new id the content of a recent row.
    """
    lines: list[dict[str, Any]] = []
    plain: list[dict[str, Any]] = []
    for n in range(rows):
        if n % 5 == 4 and plain:
            earlier = plain[-1 - n % min(7, len(plain))]
            body = earlier["body"] if n % 10 == 4 else f"Changed body {n}."
            lines.append(ticket(earlier["id"], headline=earlier["headline"], body=body))
        elif n % 7 == 6 and plain:
            earlier = plain[-1 - n % min(7, len(plain))]
            lines.append(ticket(f"copy-{n}", headline=earlier["headline"], body=earlier["body"]))
        else:
            row = ticket(f"t-{n}", queue=("sport", "tech")[n % 2])
            lines.append(row)
            plain.append(row)
    return lines


def test_parallel_writers_dedupe_across_chunks_in_flight_like_one_writer(
    tmp_path: Path, sqlite_url: str, postgres_url: str, spec: Spec
) -> None:
    # Postgres writes two chunks at once; SQLite one at a time, in order. Ids and contents
    # that repeat across adjacent chunks (both in flight) must come out the same.
    source = write_lines(tmp_path / "rows.jsonl", _repeats_near_each_other(300))
    results = {}
    for name, url in (("sqlite", sqlite_url), ("postgres", postgres_url)):
        engine = make_engine(url)
        sessions = make_sessionmaker(engine)
        first = load_source(sessions, spec, read_source(str(source)), chunk_size=3)
        again = load_source(sessions, spec, read_source(str(source)), chunk_size=3)
        with sessions() as session:
            items = {i.external_id: i.content_hash for i in session.scalars(select(Item))}
        engine.dispose()
        results[name] = (first.counts, again.counts, items)
        assert again.counts.inserted == 0
        assert again.counts.existing + again.counts.duplicate_content == 300
    (first_sq, again_sq, items_sq), (first_pg, again_pg, items_pg) = results.values()
    assert items_pg == items_sq
    assert len(items_sq) == first_sq.inserted == first_pg.inserted
    assert len(set(items_sq.values())) == len(items_sq)  # no content stored twice
    for sq, pg in ((first_sq, first_pg), (again_sq, again_pg)):
        assert (pg.existing, pg.duplicate_content, pg.changed) == (
            sq.existing,
            sq.duplicate_content,
            sq.changed,
        )
    assert first_sq.duplicate_content > 0 and first_sq.existing > 0 and first_sq.changed > 0


# --- the load itself, on both databases ------------------------------------------------------


def test_load_keeps_text_payload_and_known_good_exactly(
    tmp_path: Path, sessions: sessionmaker[Session], spec: Spec
) -> None:
    # Characters that COPY's text format must escape, and some that JSON must.
    tricky = 'tab\there, back\\slash, "quotes", \\N, new\nline, \u65e5\u672c, emoji \U0001f600'
    rows = [ticket(f"r{i}", queue=["sport", "tech"][i % 2]) for i in range(2500)]
    rows[10] = ticket("tricky\tid", body=tricky, extra={"k": [1, None, {"x": "\\t"}]})
    rows[11] = ticket("nul", body="a\x00b", note="c\x00d")
    source = write_lines(tmp_path / "rows.jsonl", list(rows))

    summary = load_source(sessions, spec, read_source(str(source)), chunk_size=1000)

    assert summary.counts.inserted == 2500
    assert summary.counts.known_good == 2500
    items = stored(sessions)
    assert len(items) == 2500
    assert items["tricky\tid"].text == "Headline tricky\tid\n\n" + tricky
    # The payload keeps the fields the template does not render, exactly.
    rendered = ("headline", "body")
    assert items["tricky\tid"].payload == {k: v for k, v in rows[10].items() if k not in rendered}
    assert items["nul"].text.endswith("ab") and items["nul"].payload["note"] == "cd"
    assert items["r3"].slices == {"length": "short", "queue": "tech"}
    kg = known_good(sessions)
    assert len(kg) == 2500 and kg["r2"] == {"label": "sport"}
    with sessions() as session:
        spec_id = session.scalar(select(SpecRow.id))
        states = session.execute(select(Item.state, Item.spec_id, Item.attempts)).all()
    assert {(str(s), i, a) for s, i, a in states} == {("pending", spec_id, 0)}


def test_reload_under_a_new_spec_version_requeues_and_counts_changes(
    tmp_path: Path, sessions: sessionmaker[Session], spec: Spec
) -> None:
    v1 = write_lines(tmp_path / "v1.jsonl", [ticket(f"r{i}") for i in range(30)])
    load_source(sessions, spec, read_source(str(v1)))
    with sessions.begin() as session:
        session.execute(Item.__table__.update().values(state="accepted", attempts=1))
    body = copy.deepcopy(spec.body)
    body["version"] = spec.version + 1
    body["prompt"]["system"] = "Different instructions."
    v2_rows = [ticket(f"r{i}") for i in range(30)] + [ticket("new")]
    v2_rows[0] = ticket("r0", body="Rewritten.")
    v2 = write_lines(tmp_path / "v2.jsonl", list(v2_rows))

    summary = load_source(sessions, parse_spec(body), read_source(str(v2)), chunk_size=7)

    counts = summary.counts
    assert (counts.inserted, counts.existing, counts.relabel) == (1, 30, 30)
    assert (counts.changed, counts.changed_ids) == (1, ["r0"])
    items = stored(sessions)
    assert items["r0"].text == "Headline r0\n\nBody of r0."  # kept as first loaded
    with sessions() as session:
        v2_id = session.scalar(select(SpecRow.id).where(SpecRow.version == spec.version + 1))
    assert {(str(i.state), i.spec_id, i.attempts) for i in items.values()} == {
        ("pending", v2_id, 0)
    }
    assert len(known_good(sessions)) == 31


# --- resumable: SIGKILL mid-file, run again ---------------------------------------------------


@pytest.fixture
def big_source(tmp_path: Path) -> tuple[Path, int]:
    rows = 60_000
    path = tmp_path / "big.jsonl"
    with path.open("w", encoding="utf-8") as out:
        for n in range(rows):
            out.write(json.dumps(ticket(f"k{n}", body=f"Body {n} " + "w" * 200)) + "\n")
            if n % 20_000 == 5:
                out.write("{broken\n")
    return path, rows


def _count(url: str) -> int:
    engine = create_engine(url)
    with engine.connect() as conn:
        n = int(conn.scalar(text("SELECT count(*) FROM items")) or 0)
    engine.dispose()
    return n


@pytest.mark.slow
def test_a_load_killed_mid_file_resumes_and_loads_every_row_once(
    big_source: tuple[Path, int], postgres_url: str
) -> None:
    path, rows = big_source
    env = {**os.environ, "STILLHOUSE_DATABASE_URL": postgres_url, "STILLHOUSE_BROKER_URL": ""}
    cmd = [sys.executable, "-m", "stillhouse", "backfill", str(path), "--spec", "triage"]
    cmd += ["--load-only", "--json", "--rejects", str(path.with_suffix(".rejects"))]
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    while _count(postgres_url) == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.communicate()
    partial = _count(postgres_url)
    assert 0 < partial < rows, "the kill must land mid-file"

    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)

    result = json.loads(run.stdout)
    assert result["inserted"] + result["already_loaded"] == rows
    assert result["already_loaded"] == partial
    assert result["bad_rows"] == 3
    engine = create_engine(postgres_url)
    with engine.connect() as conn:
        total, distinct = conn.execute(
            text("SELECT count(*), count(DISTINCT external_id) FROM items")
        ).one()
        kg = conn.scalar(text("SELECT count(known_good) FROM items"))
    engine.dispose()
    assert total == distinct == kg == rows


def test_counts_add_up_on_postgres_and_sqlite(
    tmp_path: Path, sessions: sessionmaker[Session], spec: Spec
) -> None:
    source = write_lines(
        tmp_path / "rows.jsonl",
        [ticket("a"), ticket("a"), ticket("b", headline="Headline a", body="Body of a."), b"[]"],
    )
    summary = load_source(sessions, spec, read_source(str(source)))
    counts = summary.counts
    assert (counts.inserted, counts.existing, counts.duplicate_content) == (1, 1, 1)
    assert summary.bad_count == 1
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Item)) == 1


def test_content_dedupe_goes_through_the_content_key_index(
    tmp_path: Path, database_url: str, spec: Spec
) -> None:
    # An index the probe cannot use turns every probe row into a scan of the spec's items.
    source = write_lines(tmp_path / "rows.jsonl", [ticket(f"t-{n}") for n in range(200)])
    engine = make_engine(database_url)
    sessions = make_sessionmaker(engine)
    load_source(sessions, spec, read_source(str(source)))
    with sessions() as session:
        items = list(stored(sessions).values())[:5]
        probe = [ItemIn(i.external_id, i.text, {}, {}, i.content_hash) for i in items]
        if engine.dialect.name == "postgresql":
            dbapi: Any = session.connection().connection.driver_connection
            params = {
                "name": spec.name,
                "ids": json.dumps([i.external_id for i in probe]),
                "hashes": json.dumps([i.content_hash for i in probe]),
            }
            rows = dbapi.execute("EXPLAIN " + PROBE_IDS + PROBE_CONTENT, params).fetchall()
        else:
            statement = content_owners(spec.name, probe)
            # SQLite matches an expression index on identical text: no bound 1 or 16.
            assert "substr(items.content_hash, 1, 16)" in str(statement.compile(engine))
            compiled = statement.compile(engine, compile_kwargs={"literal_binds": True})
            rows = session.execute(text(f"EXPLAIN QUERY PLAN {compiled}")).all()
    engine.dispose()
    assert "ix_items_spec_name_content_key" in " ".join(str(row) for row in rows)


def test_every_submitted_id_is_kept_an_id_whose_text_repeats_another_points_at_it(
    tmp_path: Path, sessions: sessionmaker[Session], spec: Spec
) -> None:
    # Repeats within a chunk, across chunks (two in flight on Postgres) and across runs.
    rows = [ticket(f"r{i}", body=f"body {i % 5}", headline="same") for i in range(30)]
    source = write_lines(tmp_path / "rows.jsonl", list(rows))
    first = load_source(sessions, spec, read_source(str(source)), chunk_size=4)
    assert (first.counts.inserted, first.counts.duplicate_content) == (5, 25)
    with sessions() as session:
        items = {i.external_id: i.id for i in session.scalars(select(Item))}
        aliases = dict(session.execute(select(ItemAlias.external_id, ItemAlias.item_id)).all())
    assert set(items) | set(aliases) == {f"r{i}" for i in range(30)}
    for i in range(30):
        assert aliases.get(f"r{i}", items.get(f"r{i}")) == items[f"r{i % 5}"]
    again = load_source(sessions, spec, read_source(str(source)), chunk_size=7)
    assert again.counts.inserted == 0
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(ItemAlias)) == 25
