"""A router's fallbacks as items of the spec: what the teacher is asked when the student is
unsure is stored and labeled like any other item, so the next dataset learns from it.

An input becomes an item in one of two ways: a source row (an object, as a backfill reads
it: the spec's template renders it, its id and slices are the row's), or a string, taken as
the document the teacher sees (the rendered input text; no fields, no slices). An input
without an id gets ``routed:`` and 32 hex digits of its text's hash, so the same text asked
again is the same item: its stored label answers, and the teacher is never paid twice.

Every fallback is stored, because every teacher call is on the ledger against its item and
answered from the cache by its request. Whether datasets may take it (``Item.trainable``) is
the storing rule: the spec's sampling rules (rate, per-slice rates, daily cap) as for a live
sample, and ``router.store_fallbacks`` (false keeps every fallback out of training).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from schemas.errors import PermanentError
from storage.intake import add_daily_count, insert_new_items, lock_daily_count
from storage.items import ItemIn
from storage.models import Item, ItemState, Label
from workers.ingest import make_item, normalize_text
from workers.sampling import SamplingRules
from workers.spec import Spec

__all__ = [
    "ROUTED_PREFIX",
    "Fallback",
    "Stored",
    "fallbacks_of",
    "routed_item",
    "store_fallbacks",
]

ROUTED_PREFIX = "routed:"


def routed_item(spec: Spec, value: Any) -> ItemIn:
    """The item for one router input (a source row or a document string); a
    :class:`PermanentError` says what is wrong with it."""
    if isinstance(value, str):
        text = normalize_text(value)
        if not text:
            raise PermanentError("the input text is empty")
        limit = spec.body["input"].get("max_chars")
        if limit and len(text) > int(limit):
            text = text[: int(limit)]
        digest = hashlib.sha256(text.encode()).hexdigest()
        return ItemIn(
            external_id=ROUTED_PREFIX + digest[:32],
            text=text,
            payload={},
            slices={},
            content_hash=digest,
        )
    if not isinstance(value, dict):
        raise PermanentError(
            f"an input must be a string (the document) or an object (a source row with the "
            f"fields of the spec's input.text template), got {type(value).__name__}"
        )
    row = dict(value)
    if row.get(spec.id_field) in (None, ""):
        digest = hashlib.sha256(repr(sorted(row.items())).encode()).hexdigest()
        row[spec.id_field] = ROUTED_PREFIX + digest[:32]
    return make_item(spec, row)


@dataclass(frozen=True, slots=True)
class Stored:
    """Where each fallback is: its item id, whether it was new, and whether datasets may
    take it."""

    item_ids: dict[str, int]  # external id -> item id
    inserted: frozenset[str]
    trainable: frozenset[str]


def store_fallbacks(
    session: Session,
    spec: Spec,
    spec_id: int,
    items: Sequence[ItemIn],
    *,
    keep: bool,
    rules: SamplingRules,
    day: date,
) -> Stored:
    """Store the fallbacks not stored before (pending, for the labeling pipeline) and find
    the ones that were. A new item is trainable when ``keep`` and the sampling rules take it
    and the spec's daily cap has room (the cap counts it as a live sample)."""
    by_id: dict[str, ItemIn] = {}
    for item in items:
        by_id.setdefault(item.external_id, item)
    stmt = select(Item.external_id, Item.id).where(
        Item.spec_name == spec.name, Item.external_id.in_(list(by_id))
    )
    found = {str(ext): int(item_id) for ext, item_id in session.execute(stmt)}
    fresh = [item for ext, item in by_id.items() if ext not in found]
    wanted = [
        item.external_id
        for item in fresh
        if keep and rules.keeps(spec.name, item.external_id, item.payload)
    ]
    trainable: set[str] = set()
    if wanted:
        taken = lock_daily_count(session, spec.name, day)
        room = len(wanted) if rules.daily_cap is None else max(0, rules.daily_cap - taken)
        trainable = set(wanted[:room])
    inserted = insert_new_items(session, spec_id, spec.name, fresh)
    raced = [item.external_id for item in fresh if item.external_id not in inserted]
    if raced:  # another router stored them since the look above (and committed)
        stmt = select(Item.external_id, Item.id).where(
            Item.spec_name == spec.name, Item.external_id.in_(raced)
        )
        found.update({str(ext): int(item_id) for ext, item_id in session.execute(stmt)})
    kept_out = [item_id for ext, item_id in inserted.items() if ext not in trainable]
    if kept_out:
        session.execute(update(Item).where(Item.id.in_(kept_out)).values(trainable=False))
    counted = len(trainable & set(inserted))
    if counted:
        add_daily_count(session, spec.name, day, counted)
    return Stored(
        item_ids={**found, **inserted},
        inserted=frozenset(inserted),
        trainable=frozenset(trainable & set(inserted)),
    )


@dataclass(frozen=True, slots=True)
class Fallback:
    """Where a stored fallback is: the teacher's label under the spec version once written
    (as the checks left it), else the item's state and last error."""

    state: str
    trainable: bool
    output: dict[str, Any] | None = None
    verdict: str | None = None
    reasons: tuple[Any, ...] = ()
    confidence: float | None = None
    last_error: str | None = None

    @property
    def labeled(self) -> bool:
        return self.verdict is not None

    @property
    def in_progress(self) -> bool:
        """Whether a worker may still be labeling it (queued or leased, no label yet)."""
        return not self.labeled and self.state in (ItemState.QUEUED, ItemState.LEASED)


def fallbacks_of(session: Session, spec_id: int, item_ids: Sequence[int]) -> dict[int, Fallback]:
    """Each item's :class:`Fallback`."""
    if not item_ids:
        return {}
    rows = session.execute(
        select(
            Item.id,
            Item.state,
            Item.trainable,
            Item.last_error,
            Label.output,
            Label.verdict,
            Label.reasons,
            Label.confidence,
        )
        .outerjoin(Label, (Label.item_id == Item.id) & (Label.spec_id == spec_id))
        .where(Item.id.in_(list(item_ids)))
    )
    return {
        int(item_id): Fallback(
            state=str(state),
            trainable=bool(trainable),
            output=output,
            verdict=None if verdict is None else str(verdict),
            reasons=tuple(reasons or ()),
            confidence=confidence,
            last_error=last_error,
        )
        for item_id, state, trainable, last_error, output, verdict, reasons, confidence in rows
    }
