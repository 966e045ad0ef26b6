"""A dataset written as files: one per split (Parquet, JSONL or CSV), ``manifest.json`` and a
dataset card (``README.md``), streamed in bounded memory.

Everything is written into a hidden folder beside the target and renamed to it once complete:
an export that fails or is interrupted never leaves a folder that looks finished (a failure
removes its partial folder; a killed process leaves only ``.NAME.partial-PID``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from schemas.errors import ConfigError
from storage.datasets import SPLITS, dataset_by_name, dataset_info, member_rows, open_member_csv

__all__ = ["COLUMNS", "FORMATS", "ExportColumn", "export_dataset"]

FORMATS = ("parquet", "jsonl", "csv")
_BATCH = 20_000


@dataclass(frozen=True, slots=True)
class ExportColumn:
    name: str
    arrow: str  # the Arrow type, as the manifest states it
    description: str


COLUMNS = (
    ExportColumn("external_id", "string", "the item's id as it was submitted"),
    ExportColumn("text", "string", "the input as the teacher saw it (rendered by the spec)"),
    ExportColumn("label", "string", "the class (classification specs; null otherwise)"),
    ExportColumn("output", "string", "the teacher's whole answer, as JSON text"),
    ExportColumn("verdict", "string", "accepted, rejected or needs_review, when frozen"),
    ExportColumn("weight", "double", "training weight: class balance and oversampling"),
    ExportColumn("confidence", "double", "the teacher's confidence, when it gave one"),
    ExportColumn("agreement", "double", "share of samples or jury teachers that agreed"),
    ExportColumn("known_good", "string", "the known-good record, as JSON text (or null)"),
    ExportColumn("known_good_match", "bool", "the answer agrees with the record (or null)"),
    ExportColumn("label_id", "int64", "the label's id in the store (its exact version)"),
    ExportColumn("labeled_at", "timestamp[us, UTC]", "when the label was written"),
)


def export_dataset(session: Session, name: str, fmt: str, out: Path) -> dict[str, Any]:
    """Write dataset ``name`` to the folder ``out`` (which must not exist); returns the
    manifest. Each of the spec's slices becomes a ``slice_NAME`` column."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: choose from {', '.join(FORMATS)}")
    if out.exists():
        raise ConfigError(f"{out} exists: export into a new folder (nothing was written)")
    dataset = dataset_by_name(session, name)
    out.parent.mkdir(parents=True, exist_ok=True)
    slices = list(dataset.recipe.get("slices", []))  # the spec's slices: the same columns always
    columns = [*COLUMNS, *(ExportColumn(f"slice_{n}", "string", f"slice {n!r}") for n in slices)]
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    partial.mkdir()
    started = time.monotonic()
    try:
        files = {}
        fast = fmt == "parquet" and session.get_bind().dialect.name == "postgresql"
        for split in SPLITS:
            path = partial / f"{split}.{fmt}"
            if fast:  # Postgres writes the CSV, Arrow parses it: no Python per row
                with open_member_csv(session, dataset.id, split, slices) as stream:
                    count = _parquet_from_csv(path, stream, columns)
            else:
                rows = _rows(member_rows(session, dataset.id, split), slices)
                count = _WRITERS[fmt](path, rows, columns)
            files[split] = {"path": path.name, "rows": count, "sha256": _sha256(path)}
        info = dataset_info(dataset)
        manifest = {
            "dataset": info["name"],
            "content_hash": info["content_hash"],
            "spec": info["spec"],
            "version": info["version"],
            "spec_hash": info["spec_hash"],
            "teacher_models": info["teacher_models"],
            "filters": info["filters"],
            "recipe": info["recipe"],
            "counts": info["counts"],
            "format": fmt,
            "files": files,
            "columns": [
                {"name": c.name, "type": c.arrow, "description": c.description} for c in columns
            ],
            "created_at": info["created_at"],
            "exported_at": datetime.now(UTC).isoformat(),
        }
        (partial / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        (partial / "README.md").write_text(_card(manifest))
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    manifest["seconds"] = round(time.monotonic() - started, 3)
    manifest["out"] = str(out)
    return manifest


def _rows(members: Iterator[tuple[Any, ...]], slices: Sequence[str]) -> Iterator[list[Any]]:
    """Members as export rows, in the order of ``COLUMNS`` and then the slices."""
    for (
        external_id,
        class_value,
        verdict,
        weight,
        text,
        item_slices,
        output,
        confidence,
        agreement,
        known_good,
        match,
        label_id,
        labeled_at,
    ) in members:
        if labeled_at is not None and labeled_at.tzinfo is None:  # SQLite keeps UTC, naive
            labeled_at = labeled_at.replace(tzinfo=UTC)
        row = [
            external_id,
            text,
            class_value,
            output,
            verdict,
            weight,
            confidence,
            agreement,
            None if known_good in (None, "null") else known_good,
            None if match is None else bool(match),
            label_id,
            labeled_at,
        ]
        item_slices = item_slices or {}
        row += [None if item_slices.get(n) is None else str(item_slices[n]) for n in slices]
        yield row


def _parquet(path: Path, rows: Iterator[list[Any]], columns: Sequence[ExportColumn]) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _arrow_schema(columns)
    count = 0
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for batch in _batches(rows):
            arrays = [
                pa.array([row[k] for row in batch], type=field.type)
                for k, field in enumerate(schema)
            ]
            writer.write_batch(pa.record_batch(arrays, schema=schema))
            count += len(batch)
    return count


def _arrow_schema(columns: Sequence[ExportColumn]) -> Any:
    import pyarrow as pa

    types = {
        "string": pa.string(),
        "double": pa.float64(),
        "bool": pa.bool_(),
        "int64": pa.int64(),
        "timestamp[us, UTC]": pa.timestamp("us", tz="UTC"),
    }
    return pa.schema([pa.field(c.name, types[c.arrow]) for c in columns])


def _parquet_from_csv(path: Path, stream: Any, columns: Sequence[ExportColumn]) -> int:
    """Parquet from ``storage.datasets.open_member_csv``'s stream, batch by batch (bounded
    memory); its ``labeled_at`` comes as microseconds and is cast to the timestamp."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    schema = _arrow_schema(columns)
    as_read = {f.name: (pa.int64() if pa.types.is_timestamp(f.type) else f.type) for f in schema}
    reader = pacsv.open_csv(
        stream,
        read_options=pacsv.ReadOptions(
            column_names=schema.names, block_size=1 << 20, use_threads=False
        ),
        parse_options=pacsv.ParseOptions(newlines_in_values=True),
        convert_options=pacsv.ConvertOptions(
            column_types=as_read,
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
            null_values=[""],
            true_values=["t"],
            false_values=["f"],
        ),
    )
    count = 0
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for batch in reader:
            arrays = [
                column.cast(field.type) if column.type != field.type else column
                for column, field in zip(batch.columns, schema, strict=True)
            ]
            writer.write_batch(pa.record_batch(arrays, schema=schema))
            count += batch.num_rows
    return count


def _jsonl(path: Path, rows: Iterator[list[Any]], columns: Sequence[ExportColumn]) -> int:
    names = [json.dumps(c.name) for c in columns]
    raw = {"output", "known_good"}  # already JSON text: written as the object it is
    count = 0
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            parts = []
            for column, key, value in zip(columns, names, row, strict=True):
                if column.name in raw and value is not None:
                    parts.append(f"{key}: {value}")
                elif isinstance(value, datetime):
                    parts.append(f'{key}: "{value.isoformat()}"')
                else:
                    parts.append(f"{key}: {json.dumps(value, ensure_ascii=False)}")
            f.write("{" + ", ".join(parts) + "}\n")
            count += 1
    return count


def _csv(path: Path, rows: Iterator[list[Any]], columns: Sequence[ExportColumn]) -> int:
    count = 0
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([c.name for c in columns])
        for row in rows:
            writer.writerow(
                [
                    v.isoformat() if isinstance(v, datetime) else ("" if v is None else v)
                    for v in row
                ]
            )
            count += 1
    return count


_WRITERS = {"parquet": _parquet, "jsonl": _jsonl, "csv": _csv}


def _batches(rows: Iterator[list[Any]]) -> Iterator[list[list[Any]]]:
    batch: list[list[Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= _BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _card(manifest: dict[str, Any]) -> str:
    """The dataset card: what it is, how it was chosen, its counts, how to load it."""
    counts = manifest["counts"]
    fmt = manifest["format"]
    lines = [
        f"# {manifest['dataset']}",
        "",
        f"Teacher labels for spec `{manifest['spec']}` v{manifest['version']}, exported by "
        f"stillhouse. Content hash `{manifest['content_hash']}` (the same in "
        f"`manifest.json` and in `stillhouse dataset show {manifest['dataset']}`).",
        "",
        f"- teacher models: {', '.join(manifest['teacher_models']) or 'unknown'}",
        f"- filters: `{json.dumps(manifest['filters'])}`",
        f"- split and weights: `{json.dumps(manifest['recipe'])}` (the split is a stable hash "
        f"of the external id: an item keeps its split in every dataset with the same seed)",
        "",
        "| split | rows | file |",
        "| --- | ---: | --- |",
    ]
    for split, entry in manifest["files"].items():
        lines.append(f"| {split} | {entry['rows']} | `{entry['path']}` |")
    classes = counts.get("classes", {})
    if classes:
        lines += ["", "Classes per split:", ""]
        for split, per_class in classes.items():
            shown = ", ".join(f"{k} {v}" for k, v in per_class.items())
            lines.append(f"- {split}: {shown}")
    lines += ["", "Columns:", ""]
    lines += [f"- `{c['name']}` ({c['type']}): {c['description']}" for c in manifest["columns"]]
    if fmt == "parquet":
        lines += [
            "",
            "Loading it:",
            "",
            "```python",
            'import pandas as pd; train = pd.read_parquet("train.parquet")',
            'import polars as pl; train = pl.read_parquet("train.parquet")',
            "import duckdb; duckdb.sql(\"SELECT label, count(*) FROM 'train.parquet' GROUP BY 1\")",
            "from datasets import load_dataset",
            'ds = load_dataset("parquet", data_files={"train": "train.parquet", '
            '"validation": "val.parquet", "test": "test.parquet"})',
            "```",
        ]
    return "\n".join(lines) + "\n"
