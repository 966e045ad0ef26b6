"""`stillhouse review …`: labels waiting for a person."""

from __future__ import annotations

from typing import Annotated

import typer

from schemas.errors import ConfigError
from stillhouse.cli.root import JsonOpt, SpecOpt, err, review_app, settings
from stillhouse.output import (
    print_json,
    show_review_decision,
    show_review_queue,
    show_review_sample,
    show_review_suspects,
    show_review_tasks,
    show_task_decision,
)

__all__ = ["review_list", "review_resolve", "review_sample", "review_suspects"]


@review_app.command("list")
def review_list(
    spec: SpecOpt,
    reason: Annotated[
        str | None,
        typer.Option(
            help="suspect_record (records that look wrong), sample (sampled labels to decide); "
            "default: labels that disagree with their record while the teacher was confident"
        ),
    ] = None,
    limit: Annotated[int, typer.Option(help="how many")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """What waits for a person: labels that disagree with their known-good record while the
    teacher was confident, or (--reason) suspect records or sampled labels, highest rank
    first.

    Example: stillhouse review list --spec triage

    Example: stillhouse review list --spec triage --reason suspect_record
    """
    from stillhouse.commands import run_review_list

    queue = run_review_list(settings(), spec, limit=limit, reason=reason)
    if as_json:
        print_json(queue.entries)
    elif queue.reason is None:
        show_review_queue(queue.title, queue.entries, err)
    else:
        show_review_tasks(queue.title, queue.reason, queue.entries, err)


@review_app.command("suspects")
def review_suspects(
    spec: SpecOpt,
    folds: Annotated[int, typer.Option(min=2, max=20, help="out-of-fold model's folds")] = 5,
    as_json: JsonOpt = False,
) -> None:
    """Find known-good records that look wrong and queue them as suspect_record.

    A record is suspect when the teacher and a model trained on the other folds' records
    agree on another class with high confidence (confident learning, as cleanlab does it);
    the queue is ranked by how likely the record is wrong. Needs the train extra.

    Example: stillhouse review suspects --spec triage
    """
    from stillhouse.commands import run_review_suspects

    result = run_review_suspects(settings(), spec, folds=folds)
    show_review_suspects(result, err)
    if as_json:
        print_json(result)


@review_app.command("sample")
def review_sample(
    spec: SpecOpt,
    n: Annotated[int, typer.Option("--n", "-n", help="how many labels to draw")] = 200,
    as_json: JsonOpt = False,
) -> None:
    """Draw a stratified sample of labels without a record for a person to decide.

    Strata are predicted class x confidence band, rare classes over-represented. Each
    decision (`review resolve --reason sample`) becomes the item's known-good record, which
    `stillhouse calibrate` and the report learn from; the command says how many more
    decisions would tighten the interval.

    Example: stillhouse review sample --spec moderation --n 200
    """
    from stillhouse.commands import run_review_sample

    result = run_review_sample(settings(), spec, n=n)
    show_review_sample(result, err)
    if as_json:
        print_json(result)


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
    record: Annotated[
        str | None,
        typer.Option(
            metavar="JSON",
            help="with --reason suspect_record or sample: the right record, e.g. "
            '\'{"label": "tech"}\'',
        ),
    ] = None,
    by: Annotated[
        str | None, typer.Option(help="who decides, kept with the record (default: $USER)")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="say which, decide nothing")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Decide waiting labels: --accept (the teacher was right, the record wrong) or --reject.

    Give the items' ids, or filters (--label, --reason, --min/--max-confidence) or --all for
    a bulk decision; --dry-run lists what a decision would cover.

    With --reason suspect_record: --accept corrects the record to the suggestion (or to
    --record), --reject keeps it. With --reason sample: --accept makes the teacher's answer
    the item's record, --reject takes the right one from --record (a two-class spec infers
    it). The record before and after, --by and the time are kept.

    Example: stillhouse review resolve bbc/tech/042 --spec triage --accept --note "record wrong"

    Example: stillhouse review resolve --spec triage --reject --label sport --max-confidence 0.5

    Example: stillhouse review resolve bbc/tech/042 --spec triage --reason suspect_record --accept
    """
    from stillhouse.commands import run_review_resolve
    from stillhouse.commands.review import TASK_REASONS
    from storage.review import ReviewFilter

    if reason in TASK_REASONS:
        _resolve_tasks(spec, reason, items, accept, every, record, by, note, dry_run, as_json)
        return
    if record is not None:
        raise ConfigError("--record is for --reason suspect_record or --reason sample")

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


def _resolve_tasks(
    spec: str,
    reason: str,
    items: list[str] | None,
    accept: bool,
    every: bool,
    record: str | None,
    by: str | None,
    note: str | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    import getpass
    import json

    from stillhouse.commands import run_task_resolve

    if bool(items) == every:
        raise ConfigError(f"say which {reason} reviews: item ids, or --all (not both)")
    given = None
    if record is not None:
        try:
            given = json.loads(record)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--record {record!r} is not JSON: {exc.msg}") from exc
        if not isinstance(given, dict):
            raise ConfigError(
                f'--record {record!r}: give a JSON object, e.g. \'{{"label": "tech"}}\''
            )
    result = run_task_resolve(
        settings(),
        spec,
        reason,
        items or [],
        accept=accept,
        record=given,
        by=by or getpass.getuser(),
        note=note,
        every=every,
        dry_run=dry_run,
    )
    show_task_decision(result, err)
    if as_json:
        print_json(result)
