"""`stillhouse dataset …` and `stillhouse export`: frozen datasets and their files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from stillhouse.commands.common import stored_spec_id
from stillhouse.context import open_database
from stillhouse.settings import Settings
from storage.datasets import DatasetFilters, DatasetRecipe
from workers.spec import Spec, load_spec

__all__ = [
    "freeze_dataset",
    "run_dataset_create",
    "run_dataset_diff",
    "run_dataset_list",
    "run_dataset_show",
    "run_export",
]


def run_dataset_create(
    settings: Settings,
    name: str,
    spec_ref: str,
    *,
    filters: DatasetFilters,
    recipe: DatasetRecipe,
) -> dict[str, Any]:
    """Create dataset ``name`` from the spec's current version."""
    spec = load_spec(spec_ref)
    with open_database(settings) as sessions:
        return freeze_dataset(sessions, spec, name, filters=filters, recipe=recipe)


def freeze_dataset(
    sessions: sessionmaker[Session],
    spec: Spec,
    name: str,
    *,
    filters: DatasetFilters,
    recipe: DatasetRecipe,
) -> dict[str, Any]:
    """Dataset ``name`` of the spec's current version, in one transaction (a dataset exists
    whole or not at all); shared by `dataset create` and `train --spec`."""
    from storage.datasets import create_dataset

    spec_id = stored_spec_id(sessions, spec)
    with sessions.begin() as session:
        return create_dataset(
            session,
            name=name,
            spec_id=spec_id,
            slice_names=spec.slice_fields,
            class_field=spec.class_field,
            filters=filters,
            recipe=recipe,
        )


def run_dataset_list(settings: Settings, spec_name: str | None) -> list[dict[str, Any]]:
    from storage.datasets import list_datasets

    with open_database(settings) as sessions, sessions() as session:
        return list_datasets(session, spec_name)


def run_dataset_show(settings: Settings, name: str) -> dict[str, Any]:
    from storage.datasets import dataset_by_name, dataset_info

    with open_database(settings) as sessions, sessions() as session:
        return dataset_info(dataset_by_name(session, name))


def run_dataset_diff(settings: Settings, a: str, b: str) -> dict[str, Any]:
    from storage.datasets import dataset_diff

    with open_database(settings) as sessions, sessions() as session:
        return dataset_diff(session, a, b)


def run_export(settings: Settings, name: str, fmt: str, out: Path) -> dict[str, Any]:
    """Write dataset ``name`` as files into the new folder ``out``; returns the manifest."""
    from workers.export import export_dataset

    with open_database(settings) as sessions, sessions() as session:
        return export_dataset(session, name, fmt, out)
