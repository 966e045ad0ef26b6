"""The `stillhouse` application, its command groups and what every command shares.

Settings are built once per process, here at the edge (:func:`settings`), and handed down as
values; data goes to stdout (``stillhouse.output``), messages to stderr (:data:`err`).
"""

from __future__ import annotations

import functools
import sys
from typing import Annotated

import typer
from rich.console import Console

from schemas.errors import StillhouseError
from stillhouse.output import plain
from stillhouse.settings import Settings

__all__ = [
    "JsonOpt",
    "SpecOpt",
    "app",
    "batches_app",
    "dataset_app",
    "db_app",
    "err",
    "main",
    "review_app",
    "route_app",
    "runs_app",
    "settings",
    "spec_app",
    "teacher_app",
]

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    help="stillhouse: teacher labels in, clean training data out.",
)
teacher_app = typer.Typer(no_args_is_help=True, help="Run a local OpenAI-compatible teacher.")
db_app = typer.Typer(no_args_is_help=True, help="Database schema (Alembic migrations).")
spec_app = typer.Typer(no_args_is_help=True, help="Spec files.")
review_app = typer.Typer(no_args_is_help=True, help="Labels waiting for a person's decision.")
runs_app = typer.Typer(no_args_is_help=True, help="Student runs: queued, running, finished.")
dataset_app = typer.Typer(no_args_is_help=True, help="Frozen datasets of labels, for training.")
batches_app = typer.Typer(help="Provider batches: half-price backfills, followed by a poller.")
route_app = typer.Typer(
    no_args_is_help=True, help="Serve a trained student with the teacher as its fallback."
)
app.add_typer(teacher_app, name="teacher")
app.add_typer(db_app, name="db")
app.add_typer(spec_app, name="spec")
app.add_typer(review_app, name="review")
app.add_typer(runs_app, name="runs")
app.add_typer(dataset_app, name="dataset")
app.add_typer(route_app, name="route")
app.add_typer(batches_app, name="batches")

err = Console(stderr=True, soft_wrap=True)

SpecOpt = Annotated[str, typer.Option("--spec", "-s", help="spec file, or a bundled example name")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON on stdout")]


@functools.cache
def settings() -> Settings:
    """This invocation's settings (environment and .env), read once, at the edge."""
    return Settings()


@app.callback()
def _invocation() -> None:
    """stillhouse: teacher labels in, clean training data out."""
    # Each invocation reads the environment afresh (one process may run several: tests).
    settings.cache_clear()


def main() -> None:
    """Entry point: known errors become one clear message and exit code 2."""
    try:
        app()
    except StillhouseError as exc:
        err.print(f"error: {plain(exc)}", style="bold red", markup=False, highlight=False)
        sys.exit(2)
