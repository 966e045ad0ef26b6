"""`stillhouse review`: labels waiting for a person's decision."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from stillhouse.commands.common import stored_spec_id
from stillhouse.context import open_database
from stillhouse.settings import Settings
from workers.spec import load_spec

__all__ = ["ReviewQueue", "run_review_list", "run_review_resolve"]


@dataclass(frozen=True, slots=True)
class ReviewQueue:
    """The labels waiting for review under one spec version (``entries`` is what `review
    list --json` prints)."""

    spec: str
    version: int
    entries: list[dict[str, Any]]

    @property
    def title(self) -> str:
        return f"{self.spec} v{self.version}"


def run_review_list(settings: Settings, spec_ref: str, *, limit: int) -> ReviewQueue:
    """The labels waiting for review (``stillhouse.output.show_review_queue`` prints them)."""
    from storage.review import review_queue

    spec = load_spec(spec_ref)
    with open_database(settings) as sessions:
        spec_id = stored_spec_id(sessions, spec)
        with sessions() as session:
            entries = review_queue(session, spec_id, limit=limit)
    return ReviewQueue(spec.name, spec.version, [asdict(e) for e in entries])


def run_review_resolve(
    settings: Settings,
    spec_ref: str,
    items: list[str],
    *,
    accept: bool,
    note: str | None,
    which: Any = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Decide the waiting labels of ``items``, or every waiting label ``which`` covers
    (``stillhouse.output.show_review_decision`` prints what it decided)."""
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
    return {"verdict": verdict, "decided": decided, "dry_run": dry_run}
