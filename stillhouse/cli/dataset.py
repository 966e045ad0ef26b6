"""`stillhouse dataset …` and `stillhouse export`: frozen datasets, and files of them."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer

from schemas.errors import ConfigError
from stillhouse.cli.root import JsonOpt, SpecOpt, app, dataset_app, err, settings
from stillhouse.output import (
    print_json,
    show_dataset,
    show_dataset_diff,
    show_datasets,
    show_export,
)
from storage.datasets import DatasetFilters, DatasetRecipe

__all__ = ["dataset_create", "dataset_diff", "dataset_list", "dataset_show", "export"]

NameArg = Annotated[str, typer.Argument(help="the dataset's name, e.g. triage-2026-12")]


@dataset_app.command("create")
def dataset_create(
    name: NameArg,
    spec: SpecOpt,
    verdict: Annotated[
        list[str] | None,
        typer.Option(help="labels with this verdict (repeatable; default accepted)"),
    ] = None,
    min_confidence: Annotated[
        float | None, typer.Option(help="only labels whose confidence is at least this")
    ] = None,
    min_agreement: Annotated[
        float | None, typer.Option(help="only labels whose sample or jury agreement is at least")
    ] = None,
    slice_: Annotated[
        list[str] | None,
        typer.Option("--slice", metavar="NAME=VALUE", help="only this slice value (repeatable)"),
    ] = None,
    labeled_after: Annotated[
        datetime | None, typer.Option(help="only labels written at or after (UTC)")
    ] = None,
    labeled_before: Annotated[
        datetime | None, typer.Option(help="only labels written before (UTC)")
    ] = None,
    split: Annotated[
        str, typer.Option(metavar="TRAIN/VAL/TEST", help="shares of the splits")
    ] = "80/10/10",
    seed: Annotated[int, typer.Option(help="salts the split hash (keep it to keep splits)")] = 0,
    balance: Annotated[
        bool, typer.Option("--balance", help="weight the classes to count equally")
    ] = False,
    oversample: Annotated[
        list[str] | None,
        typer.Option(
            metavar="class:VALUE=F|SLICE:VALUE=F",
            help="multiply the weight of a class or a slice value by F (repeatable)",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Freeze a dataset from the spec's current version: its members, splits and weights.

    The split is a stable hash of each external id, so an item keeps its split in every
    dataset built with the same seed, and the test split never leaks into training.
    Balancing and oversampling are recorded as weights, never as copies.

    Example: stillhouse dataset create triage-2026-12 --spec triage --min-confidence 0.5

    Example: stillhouse dataset create tickets-billing --spec triage --slice queue=billing
    --balance --oversample class:sport=2
    """
    from stillhouse.commands.dataset import run_dataset_create

    filters = DatasetFilters(
        verdicts=tuple(verdict or ("accepted",)),
        min_confidence=min_confidence,
        min_agreement=min_agreement,
        slices=_slices(slice_ or []),
        labeled_after=labeled_after,
        labeled_before=labeled_before,
    )
    recipe = DatasetRecipe(
        shares=_shares(split), seed=seed, balance=balance, oversample=_factors(oversample or [])
    )
    info = run_dataset_create(settings(), name, spec, filters=filters, recipe=recipe)
    if as_json:
        print_json(info)
    else:
        show_dataset(info, err)


@dataset_app.command("list")
def dataset_list(
    spec: Annotated[str | None, typer.Option("--spec", "-s", help="only this spec name")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Every dataset, oldest first: spec, rows per split, content hash.

    Example: stillhouse dataset list --json
    """
    from stillhouse.commands.dataset import run_dataset_list

    found = run_dataset_list(settings(), spec)
    if as_json:
        print_json(found)
    else:
        show_datasets(found, err)


@dataset_app.command("show")
def dataset_show(name: NameArg, as_json: JsonOpt = False) -> None:
    """One dataset: content hash, spec and teacher versions, filters, counts by split,
    class and slice.

    Example: stillhouse dataset show triage-2026-12 --json
    """
    from stillhouse.commands.dataset import run_dataset_show

    info = run_dataset_show(settings(), name)
    if as_json:
        print_json(info)
    else:
        show_dataset(info, err)


@dataset_app.command("diff")
def dataset_diff(
    a: Annotated[str, typer.Argument(help="the older dataset")],
    b: Annotated[str, typer.Argument(help="the newer dataset")],
    as_json: JsonOpt = False,
) -> None:
    """Items added, removed and relabeled from dataset A to dataset B, by external id.

    Example: stillhouse dataset diff triage-2026-11 triage-2026-12
    """
    from stillhouse.commands.dataset import run_dataset_diff

    diff = run_dataset_diff(settings(), a, b)
    if as_json:
        print_json(diff)
    else:
        show_dataset_diff(diff, err)


@app.command()
def export(
    name: NameArg,
    out: Annotated[Path, typer.Option(help="a new folder for the files")],
    fmt: Annotated[str, typer.Option("--format", help="parquet, jsonl or csv")] = "parquet",
    as_json: JsonOpt = False,
) -> None:
    """Write a dataset as one file per split, manifest.json and a dataset card (README.md).

    The Parquet files load unchanged in pandas, polars, DuckDB and Hugging Face datasets.
    Written under a temporary name and renamed when complete.

    Example: stillhouse export triage-2026-12 --format parquet --out exports/triage-2026-12
    """
    from stillhouse.commands.dataset import run_export

    manifest = run_export(settings(), name, fmt, out)
    if as_json:
        print_json(manifest)
    else:
        show_export(manifest, err)


def _slices(given: list[str]) -> dict[str, list[str]]:
    slices: dict[str, list[str]] = {}
    for entry in given:
        slice_name, sep, value = entry.partition("=")
        if not sep or not slice_name:
            raise ConfigError(f"--slice {entry!r}: write NAME=VALUE, e.g. --slice queue=billing")
        slices.setdefault(slice_name, []).append(value)
    return slices


def _shares(split: str) -> tuple[float, float, float]:
    try:
        parts = [float(p) for p in split.split("/")]
    except ValueError:
        parts = []
    if len(parts) != 3:
        raise ConfigError(f"--split {split!r}: three shares TRAIN/VAL/TEST, e.g. 80/10/10")
    total = sum(parts)
    scale = 100.0 if total > 1.5 else 1.0
    return (parts[0] / scale, parts[1] / scale, parts[2] / scale)


def _factors(given: list[str]) -> dict[tuple[str, str], float]:
    factors: dict[tuple[str, str], float] = {}
    for entry in given:
        target, sep, factor = entry.rpartition("=")
        on, colon, value = target.partition(":")
        try:
            number = float(factor)
        except ValueError:
            number = None
        if not sep or not colon or not on or number is None:
            raise ConfigError(
                f"--oversample {entry!r}: write class:VALUE=FACTOR or SLICE:VALUE=FACTOR, "
                f"e.g. --oversample class:sport=3"
            )
        factors[(on, value)] = number
    return factors
