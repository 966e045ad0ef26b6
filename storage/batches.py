"""Provider batches in the store: what the pipeline reads back from them and what
``stillhouse batches`` lists (the steps themselves are ``workers.batches``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from storage.models import TeacherBatch, TeacherBatchRequest, TeacherCall

__all__ = [
    "OPEN_STEPS",
    "BatchAnswer",
    "batch_answers",
    "batch_call_id",
    "list_batches",
]

# A batch in one of these steps may still hold (or get) answers for its requests.
OPEN_STEPS = ("prepared", "uploaded", "creating", "submitted", "downloading", "received")


def batch_call_id(batch_id: int, request_hash: str) -> str:
    """The ledger's ``client_request_id`` of a batch request: one ledger row per request and
    batch, whichever of its items is labeled first (the column is unique)."""
    return f"batch-{batch_id}-{request_hash[:40]}"


@dataclass(frozen=True, slots=True)
class BatchAnswer:
    """A batch's paid answer to one request, not yet on the ledger."""

    request_hash: str
    body: dict[str, Any]
    prompt_tokens: int
    completion_tokens: int
    client_request_id: str
    price_factor: float


def batch_answers(session: Session, hashes: Sequence[str]) -> dict[str, BatchAnswer]:
    """Answers that batches got for these requests and that no ledger row records yet (the
    first item labeled with one pays for it; the rest are cache hits)."""
    if not hashes:
        return {}
    rows = session.execute(
        select(
            TeacherBatchRequest.request_hash,
            TeacherBatchRequest.batch_id,
            TeacherBatchRequest.response,
            TeacherBatchRequest.prompt_tokens,
            TeacherBatchRequest.completion_tokens,
            TeacherBatch.price_factor,
        )
        .join(TeacherBatch, TeacherBatch.id == TeacherBatchRequest.batch_id)
        .where(
            TeacherBatchRequest.request_hash.in_(list(set(hashes))),
            TeacherBatchRequest.state == "succeeded",
        )
        .order_by(TeacherBatchRequest.batch_id)
    ).all()
    found: dict[str, BatchAnswer] = {}
    for rhash, batch_id, body, prompt, completion, factor in rows:
        if rhash not in found and isinstance(body, dict):
            found[rhash] = BatchAnswer(
                rhash, body, prompt, completion, batch_call_id(batch_id, rhash), factor
            )
    ids = [a.client_request_id for a in found.values()]
    charged = set(
        session.scalars(
            select(TeacherCall.client_request_id).where(TeacherCall.client_request_id.in_(ids))
        )
    )
    return {h: a for h, a in found.items() if a.client_request_id not in charged}


def list_batches(
    session: Session, *, spec_name: str | None = None, limit: int = 50
) -> list[dict[str, Any]]:
    """The newest batches with their progress, for ``stillhouse batches``."""
    stmt = select(TeacherBatch).order_by(TeacherBatch.id.desc()).limit(limit)
    if spec_name is not None:
        stmt = stmt.where(TeacherBatch.spec_name == spec_name)
    batches = session.scalars(stmt).all()
    states: dict[int, dict[str, int]] = {}
    if batches:
        counted = session.execute(
            select(TeacherBatchRequest.batch_id, TeacherBatchRequest.state, func.count())
            .where(TeacherBatchRequest.batch_id.in_([b.id for b in batches]))
            .group_by(TeacherBatchRequest.batch_id, TeacherBatchRequest.state)
        )
        for batch_id, state, n in counted:
            states.setdefault(batch_id, {})[state] = int(n)
    out = []
    for b in batches:
        items = states.get(b.id, {})
        out.append(
            {
                "id": b.id,
                "spec": b.spec_name,
                "provider": b.provider,
                "provider_batch_id": b.provider_batch_id,
                "step": b.step,
                "status": b.status,
                "requests": b.requests,
                "items": sum(items.values()),
                "items_by_state": items,
                "succeeded": b.succeeded,
                "failed": b.failed,
                "expired": b.expired,
                "reserved_usd": round(b.reserved_usd, 6),
                "spent_usd": round(b.spent_usd, 6),
                "created_at": b.created_at.isoformat() if b.created_at else None,
                "ended_at": b.ended_at.isoformat() if b.ended_at else None,
                "error": b.error,
            }
        )
    return out
