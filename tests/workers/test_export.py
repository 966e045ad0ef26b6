"""A dataset as files: read back by pyarrow, DuckDB, polars, pandas and Hugging Face datasets;
a manifest with the dataset's hash; nothing half-made when it fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker
from support.store import QUEUES, Labeled, load_tickets, ticket, write_label

from schemas.errors import ConfigError
from storage.datasets import DatasetFilters, DatasetRecipe, create_dataset
from workers import export as export_module
from workers.export import export_dataset

N = 120


@pytest.fixture
def dataset(sessions: sessionmaker[Session]) -> tuple[Labeled, dict]:
    store = load_tickets(
        sessions, [ticket(n, body=f'tab\there, quote " and é {n}') for n in range(N)]
    )
    with sessions.begin() as session:
        for n in range(N):
            write_label(session, store, f"t{n:05d}", QUEUES[n % 5], confidence=0.5 + n / 400)
        info = create_dataset(
            session,
            name="exp",
            spec_id=store.spec_id,
            slice_names=store.spec.slice_fields,
            class_field="label",
            filters=DatasetFilters(),
            recipe=DatasetRecipe(balance=True),
        )
    return store, info


def test_parquet_loads_unchanged_in_the_data_tools(
    sessions: sessionmaker[Session], dataset: tuple[Labeled, dict], tmp_path: Path
) -> None:
    import duckdb
    import pandas as pd
    import polars as pl
    import pyarrow.parquet as pq
    from datasets import load_dataset

    _, info = dataset
    out = tmp_path / "exp"
    with sessions() as session:
        manifest = export_dataset(session, "exp", "parquet", out)
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "manifest.json", "test.parquet", "train.parquet", "val.parquet"
    ]  # fmt: skip
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["content_hash"] == info["content_hash"] == manifest["content_hash"]
    assert {s: f["rows"] for s, f in on_disk["files"].items()} == info["counts"]["splits"]
    assert [c["name"] for c in on_disk["columns"]][-2:] == ["slice_length", "slice_queue"]

    train = pq.read_table(out / "train.parquet")
    assert train.num_rows == info["counts"]["splits"]["train"]
    assert train.schema.field("labeled_at").type.tz == "UTC"
    first = train.slice(0, 1).to_pylist()[0]
    assert first["text"].startswith("ticket ") and "\t" in first["text"] and "é" in first["text"]
    assert json.loads(first["output"])["label"] == first["label"]
    assert first["known_good_match"] is True and first["verdict"] == "accepted"

    by_class = duckdb.sql(
        f"SELECT label, count(*) AS n, sum(weight) AS w FROM '{out / 'train.parquet'}' "
        "GROUP BY label ORDER BY label"
    ).fetchall()
    assert [row[0] for row in by_class] == sorted(QUEUES)
    assert sum(row[1] for row in by_class) == train.num_rows
    frame = pd.read_parquet(out / "val.parquet")
    assert len(frame) == info["counts"]["splits"]["val"] and frame["weight"].dtype == "float64"
    assert pl.read_parquet(out / "test.parquet").height == info["counts"]["splits"]["test"]
    loaded = load_dataset(
        "parquet",
        data_files={s: str(out / f"{s}.parquet") for s in ("train", "val", "test")},
        cache_dir=str(tmp_path / "hf-cache"),
    )
    assert loaded["train"].num_rows == train.num_rows
    assert loaded["train"][0]["external_id"] == first["external_id"]


def test_jsonl_and_csv_hold_the_same_rows(
    sessions: sessionmaker[Session], dataset: tuple[Labeled, dict], tmp_path: Path
) -> None:
    import csv

    _, info = dataset
    with sessions() as session:
        export_dataset(session, "exp", "jsonl", tmp_path / "j")
        export_dataset(session, "exp", "csv", tmp_path / "c")
    lines = (tmp_path / "j" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == info["counts"]["splits"]["train"]
    assert rows[0]["output"]["label"] == rows[0]["label"]  # an object, not a string
    assert rows[0]["known_good"] == {"label": rows[0]["label"]}
    with (tmp_path / "c" / "train.csv").open(encoding="utf-8", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["external_id"] for r in table] == [r["external_id"] for r in rows]
    assert table[0]["text"] == rows[0]["text"]  # tabs, quotes and accents survive
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["format"] == "csv"


def test_an_export_that_fails_halfway_leaves_nothing(
    sessions: sessionmaker[Session],
    dataset: tuple[Labeled, dict],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = export_module._sha256
    calls: list[str] = []

    def dies_on_the_second_split(path: Path) -> str:  # each split's file is summed once written
        calls.append(path.name)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(path)

    monkeypatch.setattr(export_module, "_sha256", dies_on_the_second_split)
    exports = tmp_path / "exports"
    exports.mkdir()
    with sessions() as session, pytest.raises(OSError, match="disk full"):
        export_dataset(session, "exp", "parquet", exports / "exp")
    assert calls == ["train.parquet", "val.parquet"]
    assert list(exports.iterdir()) == []  # no folder, no partial folder


def test_bad_export_requests_are_clear_errors(
    sessions: sessionmaker[Session], dataset: tuple[Labeled, dict], tmp_path: Path
) -> None:
    exports = tmp_path / "exports"
    (exports / "there").mkdir(parents=True)
    with sessions() as session:
        with pytest.raises(ConfigError, match="exists: export into a new folder"):
            export_dataset(session, "exp", "parquet", exports / "there")
        with pytest.raises(ConfigError, match="--format 'xlsx': choose from parquet, jsonl, csv"):
            export_dataset(session, "exp", "xlsx", exports / "new")
        with pytest.raises(ConfigError, match="no dataset named 'nope'"):
            export_dataset(session, "nope", "parquet", exports / "new")
    assert [p.name for p in exports.iterdir()] == ["there"]


def test_a_failure_in_the_middle_of_the_postgres_stream_cancels_it_and_keeps_the_error(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parquet writer fails while COPY is still sending: the query is cancelled, the
    writer's own error is what the caller sees, nothing is left on disk, and the connection
    is good for the next statement."""
    from sqlalchemy import text

    from storage.session import make_engine, make_sessionmaker

    engine = make_engine(postgres_url)
    sessions = make_sessionmaker(engine)
    # 3,000 texts of 8,000 characters (the spec's max_chars): 24 MB, more than the reader
    # holds ahead (16 blocks of 1 MiB), so the server is still sending when the writer fails.
    rows = [ticket(n, body=f"{n} " + "word " * 1700) for n in range(3000)]
    store = load_tickets(sessions, rows)
    with sessions.begin() as session:
        for n in range(3000):
            write_label(session, store, f"t{n:05d}", QUEUES[n % 5])
        create_dataset(
            session,
            name="big",
            spec_id=store.spec_id,
            slice_names=store.spec.slice_fields,
            class_field="label",
            filters=DatasetFilters(),
            recipe=DatasetRecipe(),
        )

    def fails_after_the_first_block(path: Path, stream, columns) -> int:  # type: ignore[no-untyped-def]
        assert stream.read(1 << 16)
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "_parquet_from_csv", fails_after_the_first_block)
    exports = tmp_path / "exports"
    exports.mkdir()
    with sessions() as session:
        with pytest.raises(OSError, match="disk full"):
            export_dataset(session, "big", "parquet", exports / "big")
        session.rollback()
        assert session.execute(text("SELECT count(*) FROM dataset_items")).scalar() == 3000
    assert list(exports.iterdir()) == []
    engine.dispose()
