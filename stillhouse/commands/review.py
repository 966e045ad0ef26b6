"""`stillhouse review`: labels waiting for a person's decision."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table

from stillhouse.commands.common import stored_spec_id
from stillhouse.context import open_database
from stillhouse.output import cell, plain, table_console
from stillhouse.settings import Settings
from workers.spec import load_spec

__all__ = ["run_review_list", "run_review_resolve"]


def run_review_list(
    settings: Settings, spec_ref: str, *, limit: int, as_json: bool
) -> list[dict[str, Any]]:
    """The labels waiting for review (what `review list --json` prints); the table unless
    ``as_json``."""
    from dataclasses import asdict

    from storage.review import review_queue

    spec = load_spec(spec_ref)
    with open_database(settings) as sessions:
        spec_id = stored_spec_id(sessions, spec)
        with sessions() as session:
            entries = review_queue(session, spec_id, limit=limit)
        if as_json:
            return [asdict(e) for e in entries]
        table = Table(title=f"{spec.name} v{spec.version}: waiting for review ({len(entries)})")
        for column in ("item", "teacher", "known-good", "confidence", "text"):
            table.add_column(column)
        for e in entries:
            table.add_row(
                cell(e.external_id),
                cell(json.dumps(e.output, ensure_ascii=False)),
                cell(json.dumps(e.known_good, ensure_ascii=False)),
                "n/a" if e.confidence is None else f"{e.confidence:.2f}",
                cell(e.text.replace("\n", " "), limit=80),
            )
        table_console().print(table)
        return [asdict(e) for e in entries]


def run_review_resolve(
    settings: Settings,
    spec_ref: str,
    items: list[str],
    *,
    accept: bool,
    note: str | None,
    which: Any = None,
    dry_run: bool = False,
    console: Console,
) -> dict[str, Any]:
    """Decide the waiting labels of ``items``, or every waiting label ``which`` covers."""
    from storage.review import resolve_review, resolve_reviews

    spec = load_spec(spec_ref)
    with open_database(settings) as sessions:
        spec_id = stored_spec_id(sessions, spec)
        decided: list[str] = []
        with sessions() as session:
            if items:
                for item in items:  # each must be waiting: the error names the one that is not
                    resolve_review(session, spec_id, item, accept=accept, note=note)
                    decided.append(item)
            else:
                decided = resolve_reviews(
                    session, spec_id, accept=accept, which=which, note=note, dry_run=dry_run
                )
            if dry_run:
                session.rollback()
            else:
                session.commit()
        verdict = "accepted" if accept else "rejected"
        shown = ", ".join(plain(i, one_line=True) for i in decided[:10])
        more = f" and {len(decided) - 10} more" if len(decided) > 10 else ""
        console.print(
            f"{'would decide' if dry_run else 'decided'} {len(decided)} labels: {verdict}"
            + (f" ({shown}{more})" if decided else ""),
            markup=False,
            highlight=False,
        )
        return {"verdict": verdict, "decided": decided, "dry_run": dry_run}
