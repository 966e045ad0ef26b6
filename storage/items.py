"""Item queries: idempotent ingest, leases, releases."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
from sqlalchemy import Table, and_, bindparam, func, or_, select, text, update
from sqlalchemy.orm import Session

from schemas.errors import ConfigError
from storage.dialect import db_now, db_now_plus, insert_for, picked_ids
from storage.models import CONTENT_KEY, CONTENT_KEY_CHARS, Item, ItemAlias, ItemState, SpecRow
from storage.session import is_postgres

__all__ = [
    "ClaimedItem",
    "IngestCounts",
    "ItemIn",
    "LastError",
    "Requeued",
    "SpecSettings",
    "add_known_good",
    "claim_items",
    "ensure_spec",
    "item_fields",
    "known_good_for",
    "last_error",
    "new_item_row",
    "pending_item_ids",
    "requeue_for_version",
    "requeue_items",
    "store_aliases",
    "upsert_items",
]


@dataclass(frozen=True, slots=True)
class ItemIn:
    """One normalized source row, ready to load."""

    external_id: str
    text: str
    payload: dict[str, Any]
    slices: dict[str, Any]
    content_hash: str
    known_good: dict[str, Any] | None = None
    # The payload as JSON text when the caller has it already (the COPY path reuses it).
    payload_json: str | None = field(default=None, compare=False, repr=False)


@dataclass(slots=True)
class IngestCounts:
    inserted: int = 0
    existing: int = 0  # the id was loaded before (or earlier in the same load)
    duplicate_content: int = 0  # a new id whose normalized text is stored under another id
    relabel: int = 0
    changed: int = 0
    known_good: int = 0
    changed_ids: list[str] = field(default_factory=list)
    # (external id, content hash) of the duplicate_content rows: kept as aliases
    duplicates: list[tuple[str, str]] = field(default_factory=list, repr=False)

    def add(self, other: IngestCounts) -> None:
        self.inserted += other.inserted
        self.existing += other.existing
        self.duplicate_content += other.duplicate_content
        self.relabel += other.relabel
        self.changed += other.changed
        self.known_good += other.known_good
        self.changed_ids.extend(other.changed_ids[: max(0, 20 - len(self.changed_ids))])
        self.duplicates.extend(other.duplicates)


@dataclass(frozen=True, slots=True)
class ClaimedItem:
    id: int
    external_id: str
    text: str
    attempts: int


@dataclass(frozen=True, slots=True)
class SpecSettings:
    """A spec version's operational settings, as the parsed spec says (``workers.spec``):
    the columns the store's own queries use (claims, the sweeper, dispatch, the budget)."""

    batch_size: int = 50
    max_attempts: int = 5
    lease_s: int = 600
    budget_usd: float | None = None
    labeling_mode: str = "live"


def ensure_spec(
    session: Session,
    name: str,
    version: int,
    kind: str,
    body: dict[str, Any],
    content_hash: str,
    settings: SpecSettings = SpecSettings(),
) -> SpecRow:
    """Return the stored row for this spec version, creating it on first use.

    What a label means is immutable once a version is used: a changed ``content_hash`` under
    the same version is refused, because relabeling happens only when the version is bumped.
    Operational settings (budgets, limits) may change: the stored body and ``settings``
    follow the file.
    """
    columns = {
        "batch_size": settings.batch_size,
        "max_attempts": settings.max_attempts,
        "lease_s": settings.lease_s,
        "budget_usd": settings.budget_usd,
        "labeling_mode": settings.labeling_mode,
    }
    row = session.scalar(select(SpecRow).where(SpecRow.name == name, SpecRow.version == version))
    if row is None:
        row = SpecRow(
            name=name, version=version, kind=kind, body=body, content_hash=content_hash, **columns
        )
        session.add(row)
        session.flush()
        return row
    if row.content_hash != content_hash:
        raise ConfigError(
            f"spec {name!r} version {version} was changed after it was first used "
            f"(stored hash {row.content_hash[:12]}, file hash {content_hash[:12]}); "
            f"bump 'version' in the spec file to relabel with the new definition"
        )
    changed = row.body != body or any(getattr(row, k) != v for k, v in columns.items())
    if changed:
        row.body = body
        for key, value in columns.items():
            setattr(row, key, value)
        session.flush()
    return row


def item_fields(item: ItemIn) -> dict[str, Any]:
    """The columns an item's source row decides (the rest are the spec's and the state's)."""
    return {
        "external_id": item.external_id,
        "text": item.text,
        "content_hash": item.content_hash,
        "payload": item.payload,
        "slices": item.slices,
        "known_good": item.known_good,
    }


def new_item_row(spec_id: int, spec_name: str, item: ItemIn) -> dict[str, Any]:
    """Every column of a new ``items`` row, pending for the given spec version."""
    return {
        "spec_name": spec_name,
        "spec_id": spec_id,
        **item_fields(item),
        "state": ItemState.PENDING.value,
        "attempts": 0,
    }


def upsert_items(session: Session, spec: SpecRow, rows: Sequence[ItemIn]) -> IngestCounts:
    """Insert new items and their known-good records; idempotent on (spec name, external id).

    Existing items keep their content (a changed document is counted, not overwritten); items
    last labeled under an older spec version go back to pending for this version.
    """
    counts = IngestCounts()
    if not rows:
        return counts
    by_id = {row.external_id: row for row in rows}
    found = session.execute(
        select(Item.external_id, Item.id, Item.content_hash).where(
            Item.spec_name == spec.name, Item.external_id.in_(by_id)
        )
    ).all()
    existing = {ext: digest for ext, _, digest in found}
    new_rows = [row for ext, row in by_id.items() if ext not in existing]
    if new_rows:
        session.execute(
            insert_for(session, Item.__table__).on_conflict_do_nothing(),
            [new_item_row(spec.id, spec.name, r) for r in new_rows],
        )
    counts.inserted, counts.existing = len(new_rows), len(existing)
    changed = [ext for ext, h in existing.items() if by_id[ext].content_hash != h]
    counts.changed, counts.changed_ids = len(changed), changed[:20]
    if found:
        counts.relabel = requeue_for_version(session, spec, [item_id for _, item_id, _ in found])
        known = {ext: row.known_good for ext, row in by_id.items() if row.known_good}
        add_known_good(session, {item_id: known[ext] for ext, item_id, _ in found if ext in known})
    counts.known_good = sum(1 for row in by_id.values() if row.known_good)
    return counts


def _labeled_afresh(spec_id: int) -> dict[str, Any]:
    """An item back to pending under this spec version, as if new: no attempts used, no
    wait, no error, no lease (a new version, or `stillhouse requeue`)."""
    return {
        "spec_id": spec_id,
        "state": ItemState.PENDING,
        "attempts": 0,
        "retry_at": None,
        "last_error": None,
        "last_error_kind": None,
        "lease_owner": None,
        "lease_expires_at": None,
    }


def requeue_for_version(session: Session, spec: SpecRow, item_ids: Sequence[int]) -> int:
    """Those of these items last labeled under another version of the spec go back to
    pending for this one, their attempts starting again (a new version relabels on
    purpose); flush only. Returns how many."""
    if not item_ids:
        return 0
    result = session.execute(
        update(Item)
        .where(Item.id.in_(list(item_ids)), Item.spec_id != spec.id)
        .values(**_labeled_afresh(spec.id))
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)


# Postgres: one statement for a whole chunk (a re-run of a large backfill passes every row).
_KNOWN_GOOD_PG = """
UPDATE items SET known_good = x.fields::jsonb
FROM unnest(CAST(:ids AS bigint[]), CAST(:fields AS text[])) AS x(id, fields)
WHERE items.id = x.id AND items.known_good IS NULL
"""


def add_known_good(session: Session, records: dict[int, dict[str, Any]]) -> int:
    """Existing items gain the known-good record they lacked (one they have is never
    replaced: the first record loaded is the truth); flush only. Returns how many were
    offered."""
    if not records:
        return 0
    if is_postgres(session):
        fields = [orjson.dumps(record).decode() for record in records.values()]
        session.execute(text(_KNOWN_GOOD_PG), {"ids": list(records), "fields": fields})
        return len(records)
    items = cast(Table, Item.__table__)
    stmt = (
        update(items)
        .where(items.c.id == bindparam("item_id"), items.c.known_good.is_(None))
        .values(known_good=bindparam("kg"))
    )
    rows = [{"item_id": item_id, "kg": record} for item_id, record in records.items()]
    session.connection().execute(stmt, rows)  # one executemany, not a statement per row
    return len(records)


@dataclass(slots=True)
class Requeued:
    failed: int = 0
    rejected: int = 0


def requeue_items(
    session: Session,
    spec: SpecRow,
    *,
    failed: bool = True,
    rejected: bool = False,
    error_contains: str | None = None,
    external_ids: Sequence[str] | None = None,
) -> Requeued:
    """Put items of a spec name back to ``pending`` for its version ``spec`` (flush only).

    ``failed``: items that used their attempts (any version), with their attempts reset;
    ``error_contains`` keeps only those whose last error holds that text. ``rejected``:
    items whose rejected label belongs to an earlier version, to be labeled under this one
    (a rejection under this very version is its answer: bump the version to ask again).
    ``external_ids`` narrows either to these ids.
    """
    back = _labeled_afresh(spec.id)
    counts = Requeued()

    def run(*where: Any) -> int:
        conditions = [Item.spec_name == spec.name, *where]
        if external_ids is not None:
            conditions.append(Item.external_id.in_(list(external_ids)))
        result = session.execute(
            update(Item)
            .where(*conditions)
            .values(**back)
            .execution_options(synchronize_session=False)
        )
        return int(getattr(result, "rowcount", 0) or 0)

    if failed:
        where = [Item.state == ItemState.FAILED]
        if error_contains:
            where.append(Item.last_error.contains(error_contains, autoescape=True))
        counts.failed = run(*where)
    if rejected:
        counts.rejected = run(Item.state == ItemState.REJECTED, Item.spec_id != spec.id)
    return counts


def store_aliases(session: Session, spec_name: str, duplicates: Sequence[tuple[str, str]]) -> int:
    """Keep the ids of duplicate_content rows as aliases of the item that holds their text
    (the first stored, by id), so every submitted id can be looked up; flush only. An id that
    is an item itself, or already an alias, is left as it is."""
    if not duplicates:
        return 0
    by_id = dict(duplicates)
    hashes = set(by_id.values())
    owners = dict(
        session.execute(
            select(Item.content_hash, func.min(Item.id))
            .where(
                Item.spec_name == spec_name,
                CONTENT_KEY.in_({h[:CONTENT_KEY_CHARS] for h in hashes}),
                Item.content_hash.in_(hashes),
            )
            .group_by(Item.content_hash)
        ).all()
    )
    items = set(
        session.scalars(
            select(Item.external_id).where(
                Item.spec_name == spec_name, Item.external_id.in_(list(by_id))
            )
        )
    )
    rows = [
        {"spec_name": spec_name, "external_id": ext, "item_id": owners[digest]}
        for ext, digest in by_id.items()
        if digest in owners and ext not in items
    ]
    if rows:
        session.execute(insert_for(session, ItemAlias.__table__).on_conflict_do_nothing(), rows)
    return len(rows)


def _claimable(session: Session, max_attempts: int | None = None) -> Any:
    now = db_now(session)
    waiting = or_(Item.retry_at.is_(None), Item.retry_at <= now)
    expired = and_(Item.state == ItemState.LEASED, Item.lease_expires_at < now)
    if max_attempts is not None:
        # An expired lease on the last attempt is the sweeper's to fail, not another try.
        expired = and_(expired, Item.attempts < max_attempts)
    return or_(and_(Item.state.in_([ItemState.PENDING, ItemState.QUEUED]), waiting), expired)


def pending_item_ids(session: Session, spec_id: int, *, limit: int | None = None) -> list[int]:
    """Ids of items that are ready to be labeled now, oldest first."""
    stmt = (
        select(Item.id)
        .where(Item.spec_id == spec_id, _claimable(session))
        .order_by(Item.id)
        .limit(limit)
    )
    return list(session.scalars(stmt))


def claim_items(
    session: Session,
    spec_id: int,
    owner: str,
    lease_s: float,
    *,
    item_ids: Sequence[int] | None = None,
    limit: int = 100,
    max_attempts: int | None = None,
) -> list[ClaimedItem]:
    """Lease claimable items to ``owner``; an id already leased by someone else is skipped."""
    pick = select(Item.id).where(Item.spec_id == spec_id, _claimable(session, max_attempts))
    if item_ids is not None:
        pick = pick.where(Item.id.in_(list(item_ids)))
    pick = pick.order_by(Item.id).limit(limit).with_for_update(skip_locked=True)
    stmt = (
        update(Item)
        .where(Item.id.in_(picked_ids(session, pick)))
        .values(
            state=ItemState.LEASED,
            lease_owner=owner,
            attempts=Item.attempts + 1,
            lease_expires_at=db_now_plus(session, lease_s),
        )
        .returning(Item.id, Item.external_id, Item.text, Item.attempts)
        .execution_options(synchronize_session=False)
    )
    rows = session.execute(stmt).all()
    return sorted((ClaimedItem(*row) for row in rows), key=lambda c: c.id)


@dataclass(frozen=True, slots=True)
class LastError:
    """An item's last error: its kind (what code decides on) and its message (for people)."""

    kind: str | None
    message: str


def last_error(session: Session, spec_id: int) -> LastError | None:
    """The most recent error recorded on an item of this spec version, if any."""
    stmt = (
        select(Item.last_error_kind, Item.last_error)
        .where(Item.spec_id == spec_id, Item.last_error.is_not(None))
        .order_by(Item.updated_at.desc())
        .limit(1)
    )
    row = session.execute(stmt).first()
    return None if row is None else LastError(row[0], row[1] or "")


def known_good_for(session: Session, item_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    if not item_ids:
        return {}
    rows = session.execute(
        select(Item.id, Item.known_good).where(
            Item.id.in_(list(item_ids)), Item.known_good.is_not(None)
        )
    )
    return {item_id: fields for item_id, fields in rows.all() if fields is not None}
