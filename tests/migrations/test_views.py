"""The public views are a contract: their columns are held here, so a migration cannot drop
or rename one under a consumer's query; and what they show is checked row by row, on both
databases."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker
from support.store import cache_hit, load_tickets, ticket, write_label

from storage.models import Verdict

LABELED = [
    "external_id", "item_id", "label_id", "text", "slices", "output", "confidence",
    "agreement", "known_good", "known_good_match", "spec_name", "spec_version",
    "teacher_model", "labeled_at",
]  # fmt: skip
CONTRACT = {
    "labeled_clean": LABELED,
    "labeled_rejected": [*LABELED, "verdict", "reasons", "problems", "raw_response"],
    "label_stats": [
        "spec_name", "spec_version", "slice_name", "slice_value", "class", "labels", "accepted",
        "rejected", "needs_review", "with_known_good", "known_good_agree",
        "known_good_agreement",
    ],
    "teacher_spend": [
        "spec_name", "model", "day", "calls", "ok", "errors", "in_flight", "cache_hits",
        "prompt_tokens", "completion_tokens", "cost_usd", "cache_saved_usd",
    ],
    "dataset_rows": [
        "dataset", "dataset_hash", "split", "weight", "external_id", "class", "verdict", "text",
        "slices", "output", "confidence", "agreement", "known_good", "known_good_match",
        "spec_name", "spec_version", "label_id", "labeled_at",
    ],
}  # fmt: skip


def columns(session: Session, view: str) -> list[str]:
    return list(session.execute(text(f"SELECT * FROM {view} LIMIT 0")).keys())


@pytest.mark.parametrize("view", sorted(CONTRACT))
def test_a_view_keeps_its_columns_in_order(sessions: sessionmaker[Session], view: str) -> None:
    with sessions() as session:
        assert columns(session, view) == CONTRACT[view]


def test_the_views_show_each_label_once_per_submitted_id_with_its_spend(
    sessions: sessionmaker[Session],
) -> None:
    # t00001's text is submitted again as dup-1: one item, two ids, both in labeled_clean.
    rows = [ticket(0), ticket(1), ticket(2, "sport"), {**ticket(1), "id": "dup-1"}]
    store = load_tickets(sessions, rows)
    with sessions.begin() as session:
        first = write_label(session, store, "t00000", "business")
        write_label(session, store, "t00001", "entertainment", confidence=0.7)
        write_label(session, store, "t00002", "politics", verdict=Verdict.REJECTED)
        cache_hit(session, store, "t00000", first)
    with sessions() as session:
        clean = session.execute(
            text("SELECT external_id, output, teacher_model FROM labeled_clean ORDER BY 1")
        ).all()
        rejected = session.execute(
            text("SELECT external_id, verdict, reasons, raw_response FROM labeled_rejected")
        ).all()
        stats = session.execute(
            text(
                "SELECT slice_name, slice_value, class AS klass, labels, accepted, rejected, "
                "with_known_good, known_good_agree FROM label_stats "
                "WHERE slice_name IS NULL OR slice_name = 'queue' ORDER BY 1, 2, 3"
            )
        ).all()
        (spend,) = session.execute(
            text(
                "SELECT model, calls, ok, cache_hits, prompt_tokens, cost_usd, cache_saved_usd "
                "FROM teacher_spend"
            )
        ).all()
    assert [r.external_id for r in clean] == ["dup-1", "t00000", "t00001"]
    assert {r.teacher_model for r in clean} == {"teacher-m"}
    assert _json(clean[1].output)["label"] == "business"
    (bad,) = rejected
    assert (bad.external_id, bad.verdict) == ("t00002", "rejected")
    assert _json(bad.reasons) == ["known_good_mismatch"] and _json(bad.raw_response)["choices"]
    overall = {r.klass: r for r in stats if r.slice_name is None}
    assert (overall["business"].labels, overall["business"].known_good_agree) == (1, 1)
    assert (overall["entertainment"].with_known_good, overall["entertainment"].accepted) == (1, 1)
    assert (overall["politics"].rejected, overall["politics"].known_good_agree) == (1, 0)
    sport = [r for r in stats if r.slice_value == "sport"]
    assert [(r.klass, r.labels, r.rejected) for r in sport] == [("politics", 1, 1)]
    assert (spend.model, spend.calls, spend.ok, spend.cache_hits) == ("teacher-m", 4, 3, 1)
    assert spend.prompt_tokens == 300
    assert spend.cost_usd == pytest.approx(0.006)
    assert spend.cache_saved_usd == pytest.approx(0.002)  # what the paid ask of it cost


def _json(value: object) -> object:
    import json

    return json.loads(value) if isinstance(value, str) else value
