"""`stillhouse review …`: labels waiting for a person."""

from __future__ import annotations

from typing import Annotated

import typer

from schemas.errors import ConfigError
from stillhouse.cli.root import JsonOpt, SpecOpt, err, review_app, settings
from stillhouse.output import print_json, show_review_decision, show_review_queue

__all__ = ["review_list", "review_resolve"]


@review_app.command("list")
def review_list(
    spec: SpecOpt,
    limit: Annotated[int, typer.Option(help="how many")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """Labels that disagree with their known-good record while the teacher was confident.

    Example: stillhouse review list --spec triage
    """
    from stillhouse.commands import run_review_list

    queue = run_review_list(settings(), spec, limit=limit)
    if as_json:
        print_json(queue.entries)
    else:
        show_review_queue(queue.title, queue.entries, err)


@review_app.command("resolve")
def review_resolve(
    spec: SpecOpt,
    accept: Annotated[bool, typer.Option("--accept/--reject", help="the teacher was right")],
    items: Annotated[
        list[str] | None, typer.Argument(help="external ids to decide (or use the filters)")
    ] = None,
    every: Annotated[
        bool, typer.Option("--all", help="every waiting label (with the filters: every match)")
    ] = False,
    label: Annotated[str | None, typer.Option(help="only labels the teacher gave this")] = None,
    reason: Annotated[
        str | None, typer.Option(metavar="TEXT", help="only labels with a reason holding TEXT")
    ] = None,
    min_confidence: Annotated[float | None, typer.Option(help="only at least this")] = None,
    max_confidence: Annotated[float | None, typer.Option(help="only at most this")] = None,
    note: Annotated[str | None, typer.Option(help="why, kept with each label")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="say which, decide nothing")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Decide waiting labels: --accept (the teacher was right, the record wrong) or --reject.

    Give the items' ids, or filters (--label, --reason, --min/--max-confidence) or --all for
    a bulk decision; --dry-run lists what a decision would cover.

    Example: stillhouse review resolve bbc/tech/042 --spec triage --accept --note "record wrong"

    Example: stillhouse review resolve --spec triage --reject --label sport --max-confidence 0.5
    """
    from stillhouse.commands import run_review_resolve
    from storage.review import ReviewFilter

    which = ReviewFilter(label, reason, min_confidence, max_confidence)
    filtered = any(v is not None for v in (label, reason, min_confidence, max_confidence))
    if items and (filtered or every):
        raise ConfigError("give item ids or filters (--all, --label, …), not both")
    if not items and not (filtered or every):
        raise ConfigError(
            "say which labels: item ids, a filter (--label, --reason, --min-confidence, "
            "--max-confidence), or --all"
        )
    result = run_review_resolve(
        settings(),
        spec,
        items or [],
        accept=accept,
        note=note,
        which=which,
        dry_run=dry_run,
    )
    show_review_decision(result, err)
    if as_json:
        print_json(result)
