"""A labeled store built for a test: real items loaded through ``load_source`` (the spec's
slices and known-good records as ingest makes them), then labels, cached answers and ledger
rows written as the pipeline writes them, with outcomes the test chooses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from storage.models import CallStatus, Item, Label, SpecRow, TeacherCall, TeacherResponse, Verdict
from workers.ingest import SourceRow, load_source
from workers.spec import Spec, load_spec

QUEUES = ("business", "entertainment", "politics", "sport", "tech")


@dataclass(frozen=True)
class Labeled:
    spec: Spec
    spec_id: int
    item_ids: dict[str, int]  # external id -> item id


def ticket(n: int, queue: str | None = None, body: str | None = None) -> dict[str, Any]:
    queue = queue or QUEUES[n % len(QUEUES)]
    return {"id": f"t{n:05d}", "headline": f"ticket {n}", "body": body or f"about {queue} {n}",
            "queue": queue}  # fmt: skip


def load_tickets(sessions: sessionmaker[Session], rows: list[dict[str, Any]]) -> Labeled:
    spec = load_spec("triage")
    load_source(sessions, spec, [SourceRow(k + 1, row) for k, row in enumerate(rows)])
    with sessions() as session:
        spec_id = session.scalar(
            select(SpecRow.id).where(SpecRow.name == spec.name, SpecRow.version == spec.version)
        )
        ids = {e: i for e, i in session.execute(select(Item.external_id, Item.id))}
    assert spec_id is not None
    return Labeled(spec, int(spec_id), ids)


def write_label(
    session: Session,
    store: Labeled,
    external_id: str,
    label: str,
    *,
    verdict: Verdict = Verdict.ACCEPTED,
    confidence: float = 0.9,
    spec_id: int | None = None,
    model: str = "teacher-m",
    cost_usd: float = 0.002,
) -> Label:
    """A label with its cached answer and its paid ledger row, as a batch writes them."""
    item_id = store.item_ids[external_id]
    spec_id = spec_id or store.spec_id
    request_hash = f"{spec_id:04d}{item_id:060d}"
    output = {"label": label, "confidence": confidence}
    session.add(
        TeacherResponse(
            request_hash=request_hash,
            provider="openai",
            model=model,
            request={"messages": []},
            response={"choices": [{"message": {"content": str(output)}}]},
            prompt_tokens=100,
            completion_tokens=10,
        )
    )
    session.add(
        TeacherCall(
            item_id=item_id,
            spec_id=spec_id,
            request_hash=request_hash,
            attempt=1,
            status=CallStatus.OK,
            prompt_tokens=100,
            completion_tokens=10,
            cost_usd=cost_usd,
        )
    )
    known = session.get(Item, item_id)
    assert known is not None
    match = None if known.known_good is None else known.known_good.get("label") == label
    row = Label(
        item_id=item_id,
        spec_id=spec_id,
        output=output,
        verdict=verdict,
        reasons=[] if verdict == Verdict.ACCEPTED else ["known_good_mismatch"],
        problems=None if verdict == Verdict.ACCEPTED else [{"reason": "known_good_mismatch"}],
        confidence=confidence,
        agreement=1.0,
        known_good_match=match,
        request_hash=request_hash,
    )
    session.add(row)
    session.flush()
    return row


def cache_hit(session: Session, store: Labeled, external_id: str, of: Label) -> None:
    """A second ask of an answer already paid for: a free ledger row."""
    session.add(
        TeacherCall(
            item_id=store.item_ids[external_id],
            spec_id=store.spec_id,
            request_hash=of.request_hash or "",
            attempt=1,
            status=CallStatus.CACHE_HIT,
        )
    )
