"""Storing a router's fallbacks (workers.fallback) on both stores: the same text is one item,
the sampling rules and the daily cap decide what datasets may take, and routers storing the
same inputs at the same moment on Postgres get one item each, never over the cap."""

from __future__ import annotations

import threading
from datetime import date
from typing import Any

import pytest
from sqlalchemy import func, select

from schemas.errors import PermanentError
from storage.models import IngestCounter, Item
from storage.session import make_engine, make_sessionmaker
from workers.fallback import ROUTED_PREFIX, fallbacks_of, routed_item, store_fallbacks
from workers.ingest import store_spec
from workers.sampling import SamplingRules
from workers.spec import load_spec

DAY = date(2026, 12, 3)


@pytest.fixture
def store(database_url: str) -> Any:
    engine = make_engine(database_url, pool_size=8)
    sessions = make_sessionmaker(engine)
    spec = load_spec("triage")
    with sessions.begin() as session:
        spec_id = store_spec(session, spec).id
    yield sessions, spec, spec_id
    engine.dispose()


def _texts(n: int, tag: str = "") -> list[str]:
    return [f"Shares in company {k}{tag} rose after the results were published." for k in range(n)]


def test_a_text_is_one_item_asked_again_and_rows_keep_their_ids(store: Any) -> None:
    sessions, spec, spec_id = store
    items = [routed_item(spec, text) for text in _texts(3)]
    assert all(item.external_id.startswith(ROUTED_PREFIX) for item in items)
    assert routed_item(spec, "  " + _texts(1)[0] + "\n").external_id == items[0].external_id
    row = routed_item(spec, {"id": "t-1", "headline": "Markets", "body": "Stocks fell."})
    assert row.external_id == "t-1" and "Stocks fell." in row.text
    with pytest.raises(PermanentError, match="empty"):
        routed_item(spec, "   ")
    with pytest.raises(PermanentError, match="must be a string"):
        routed_item(spec, 7)

    rules = SamplingRules()
    with sessions.begin() as session:
        first = store_fallbacks(
            session, spec, spec_id, [*items, row, items[0]], keep=True, rules=rules, day=DAY
        )
    assert len(first.item_ids) == 4 and first.inserted == set(first.item_ids)
    assert first.trainable == set(first.item_ids)
    with sessions.begin() as session:
        again = store_fallbacks(session, spec, spec_id, items, keep=True, rules=rules, day=DAY)
        found = fallbacks_of(session, spec_id, list(again.item_ids.values()))
    assert again.item_ids == {i.external_id: first.item_ids[i.external_id] for i in items}
    assert not again.inserted and not again.trainable
    assert all(f.state == "pending" and f.trainable and not f.labeled for f in found.values())


def test_the_daily_cap_and_the_rate_decide_what_datasets_may_take(store: Any) -> None:
    sessions, spec, spec_id = store
    capped = SamplingRules(daily_cap=5)
    with sessions.begin() as session:
        got = store_fallbacks(
            session,
            spec,
            spec_id,
            [routed_item(spec, t) for t in _texts(8)],
            keep=True,
            rules=capped,
            day=DAY,
        )
    assert len(got.inserted) == 8 and len(got.trainable) == 5
    with sessions.begin() as session:  # the next day has room again
        nxt = store_fallbacks(
            session,
            spec,
            spec_id,
            [routed_item(spec, t) for t in _texts(3, " (next day)")],
            keep=True,
            rules=capped,
            day=date(2026, 12, 4),
        )
        unsampled = store_fallbacks(
            session,
            spec,
            spec_id,
            [routed_item(spec, t) for t in _texts(4, " (none sampled)")],
            keep=True,
            rules=SamplingRules(rate=0.0),
            day=DAY,
        )
        not_kept = store_fallbacks(
            session,
            spec,
            spec_id,
            [routed_item(spec, t) for t in _texts(2, " (not kept)")],
            keep=False,
            rules=SamplingRules(),
            day=DAY,
        )
        flags = dict(session.execute(select(Item.external_id, Item.trainable)).all())
    assert len(nxt.trainable) == 3
    assert len(unsampled.inserted) == 4 and not unsampled.trainable
    assert len(not_kept.inserted) == 2 and not not_kept.trainable
    kept = got.trainable | nxt.trainable
    assert {ext for ext, trainable in flags.items() if trainable} == kept


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_routers_storing_the_same_inputs_at_once_share_items_and_the_cap(store: Any) -> None:
    sessions, spec, spec_id = store
    routers, rounds, cap = 4, 5, 30
    rules = SamplingRules(daily_cap=cap)
    results: list[Any] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(routers)

    def router(n: int) -> None:
        try:
            for r in range(rounds):
                # Half of each round's inputs are shared by every router, half its own.
                texts = _texts(6, f" round {r}") + _texts(6, f" round {r} router {n}")
                items = [routed_item(spec, t) for t in texts]
                barrier.wait(timeout=30)
                with sessions.begin() as session:
                    stored = store_fallbacks(
                        session, spec, spec_id, items, keep=True, rules=rules, day=DAY
                    )
                assert set(stored.item_ids) == {item.external_id for item in items}
                results.append(stored)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=router, args=(n,)) for n in range(routers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    with sessions() as session:
        items = session.scalar(select(func.count()).select_from(Item))
        trainable = session.scalar(select(func.count()).where(Item.trainable.is_(True)))
        counted = session.scalar(select(IngestCounter.accepted).where(IngestCounter.day == DAY))
    distinct = rounds * (6 + 6 * routers)
    assert items == distinct  # each shared input stored once
    ids: dict[str, int] = {}
    for stored in results:  # and every router was told the same item for it
        for ext, item_id in stored.item_ids.items():
            assert ids.setdefault(ext, item_id) == item_id
    assert trainable == counted == cap  # the cap held across the routers
    assert sum(len(s.inserted) for s in results) == distinct
