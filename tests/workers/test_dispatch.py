"""The dispatcher and the sweeper, on SQLite and real Postgres; start-up checks on real Redis."""

from __future__ import annotations

import hashlib
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from schemas.errors import ConfigError
from storage.items import ItemIn, SpecSettings, claim_items, ensure_spec, upsert_items
from storage.leases import claim_ready, expire_leases, requeue_lost
from storage.models import Item, ItemState, SpecRow
from workers.dispatch import DispatchOptions, dispatch_once

LONG_AGO = datetime(2000, 1, 1, tzinfo=UTC)


def _load(sessions: sessionmaker[Session], n: int, *, max_attempts: int = 3) -> SpecRow:
    body = {"labeling": {"max_attempts": max_attempts, "batch_size": 4}}
    items = [
        ItemIn(f"e{i}", f"text {i}", {}, {}, hashlib.sha256(b"%d" % i).hexdigest())
        for i in range(n)
    ]
    with sessions.begin() as session:
        settings = SpecSettings(batch_size=4, max_attempts=max_attempts)
        spec = ensure_spec(session, "t", 1, "classification", body, "h1", settings)
        upsert_items(session, spec, items)
    return spec


def _states(sessions: sessionmaker[Session]) -> dict[str, int]:
    with sessions() as session:
        states = [ItemState(s).value for s in session.scalars(select(Item.state))]
    return {s: states.count(s) for s in set(states)}


def _expire_all_leases(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        session.execute(
            update(Item).where(Item.state == ItemState.LEASED).values(lease_expires_at=LONG_AGO)
        )


def test_expired_leases_go_back_to_pending_until_the_last_attempt(
    sessions: sessionmaker[Session],
) -> None:
    spec = _load(sessions, 2, max_attempts=2)
    for attempt in (1, 2):
        with sessions.begin() as session:
            claimed = claim_items(session, spec.id, "dies", 600, limit=2, max_attempts=2)
        assert len(claimed) == 2 and {c.attempts for c in claimed} == {attempt}
        _expire_all_leases(sessions)
        with sessions.begin() as session:
            counts = expire_leases(session)
        if attempt == 1:
            assert (counts.expired, counts.failed) == (2, 0)
            assert _states(sessions) == {"pending": 2}
    # The second lease ran out on the last allowed attempt: a poison document cannot loop.
    assert (counts.expired, counts.failed) == (0, 2)
    assert _states(sessions) == {"failed": 2}
    with sessions() as session:
        errors = set(session.scalars(select(Item.last_error)))
    assert len(errors) == 1 and "labeling.max_attempts" in str(errors.pop())


def test_a_worker_never_reclaims_an_expired_lease_on_its_last_attempt(
    sessions: sessionmaker[Session],
) -> None:
    spec = _load(sessions, 1, max_attempts=1)
    with sessions.begin() as session:
        assert len(claim_items(session, spec.id, "dies", 600, max_attempts=1)) == 1
    _expire_all_leases(sessions)
    with sessions.begin() as session:
        assert claim_items(session, spec.id, "next", 600, max_attempts=1) == []


def test_live_leases_are_left_alone(sessions: sessionmaker[Session]) -> None:
    spec = _load(sessions, 3)
    with sessions.begin() as session:
        claim_items(session, spec.id, "alive", 600, limit=3)
    with sessions.begin() as session:
        counts = expire_leases(session)
        assert (counts.expired, counts.failed) == (0, 0)
        assert requeue_lost(session, older_than_s=0.0) == 0
    assert _states(sessions) == {"leased": 3}


def test_claim_ready_honors_waits_and_limits(sessions: sessionmaker[Session]) -> None:
    spec = _load(sessions, 10)
    with sessions.begin() as session:
        session.execute(
            update(Item)
            .where(Item.external_id.in_(["e0", "e1"]))
            .values(retry_at=datetime.now(UTC) + timedelta(hours=1))
        )
    with sessions.begin() as session:
        first = claim_ready(session, limits={spec.id: 5})
    with sessions.begin() as session:
        second = claim_ready(session)
    assert len(first[spec.id]) == 5 and len(second[spec.id]) == 3
    assert not set(first[spec.id]) & set(second[spec.id])
    assert _states(sessions) == {"queued": 8, "pending": 2}


def test_lost_messages_are_requeued(sessions: sessionmaker[Session]) -> None:
    _load(sessions, 4)
    with sessions.begin() as session:
        claim_ready(session)
        session.execute(update(Item).values(updated_at=LONG_AGO))
    with sessions.begin() as session:
        assert requeue_lost(session, older_than_s=60) == 4
    assert _states(sessions) == {"pending": 4}


def test_dispatch_publishes_batches_after_commit_and_puts_back_what_failed(
    sessions: sessionmaker[Session],
) -> None:
    spec = _load(sessions, 10)
    sent: list[tuple[int, list[int]]] = []

    def publish(spec_id: int, ids: list[int]) -> None:
        with sessions() as session:  # the ids are committed before they are published
            states = set(session.scalars(select(Item.state).where(Item.id.in_(ids))))
        assert states == {ItemState.QUEUED}
        if len(sent) == 2:
            raise ConnectionError("broker down")
        sent.append((spec_id, ids))

    done = dispatch_once(sessions, publish, DispatchOptions())
    assert [len(ids) for _, ids in sent] == [4, 4] and {s for s, _ in sent} == {spec.id}
    assert (done.sent, done.batches, done.unsent) == (8, 2, 2)
    assert _states(sessions) == {"queued": 8, "pending": 2}


def test_dispatch_keeps_at_most_max_queued_in_the_broker(sessions: sessionmaker[Session]) -> None:
    _load(sessions, 10)
    options = DispatchOptions(max_queued=6)
    assert dispatch_once(sessions, lambda *_: None, options).sent == 6
    assert dispatch_once(sessions, lambda *_: None, options).sent == 0
    assert _states(sessions) == {"queued": 6, "pending": 4}


@pytest.mark.postgres
def test_concurrent_dispatchers_never_hand_out_an_item_twice(postgres_url: str) -> None:
    from storage.session import make_engine, make_sessionmaker

    engine = make_engine(postgres_url)
    sessions = make_sessionmaker(engine)
    _load(sessions, 400)
    got: list[list[int]] = []
    lock = threading.Lock()

    def dispatcher() -> None:
        for _ in range(20):
            with sessions.begin() as session:
                claimed = claim_ready(session, limits={1: 15})
            with lock:
                got.extend(claimed.values())

    threads = [threading.Thread(target=dispatcher) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ids = [i for batch in got for i in batch]
    engine.dispose()
    assert len(ids) == len(set(ids)) == 400


def test_operational_checks_refuse_pickle_and_short_visibility() -> None:
    from celery import Celery

    from workers.celery_app import configure, operational_problems

    app = configure(Celery("t", set_as_current=False), "redis://127.0.0.1:6379/13")
    assert operational_problems(app) == []
    app.conf.task_serializer = "pickle"
    app.conf.accept_content = ["json", "pickle"]
    app.conf.broker_transport_options = {"visibility_timeout": 60}
    problems = operational_problems(app)
    assert any("task_serializer includes pickle" in p for p in problems)
    assert any("accept_content includes pickle" in p for p in problems)
    assert any(
        "visibility_timeout 60 s is shorter than task_time_limit 900 s" in p for p in problems
    )


def test_pickle_is_refused_by_its_content_type_and_not_by_a_substring() -> None:
    from celery import Celery

    from workers.celery_app import configure, operational_problems

    app = configure(Celery("t", set_as_current=False), "redis://127.0.0.1:6379/13")
    # pickle's content type: the substring test let it through.
    app.conf.accept_content = ["json", "application/x-python-serialize"]
    assert any("accept_content includes pickle" in p for p in operational_problems(app))
    app.conf.accept_content = ["json", "application/json"]
    app.conf.task_serializer = " Pickle "
    assert any("task_serializer includes pickle" in p for p in operational_problems(app))


def test_a_sites_celery_config_is_applied_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from celery import Celery

    from workers.celery_app import configure

    (tmp_path / "site_celery.py").write_text(
        "worker_prefetch_multiplier = 4\n"
        "broker_transport_options = {'visibility_timeout': 7200, 'socket_timeout': 5}\n"
        "import os\n_private = 1\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    app = configure(
        Celery("t", set_as_current=False),
        "redis://127.0.0.1:6379/13",
        config_module="site_celery",
    )
    # The site's values win over stillhouse's own (prefetch 1, visibility 1800 s).
    assert app.conf.worker_prefetch_multiplier == 4
    assert app.conf.broker_transport_options["visibility_timeout"] == 7200
    assert app.conf.task_acks_late is True  # what the site did not set stays ours
    with pytest.raises(ConfigError, match="no_such_module"):
        configure(Celery("t", set_as_current=False), "redis://x", config_module="no_such_module")


@pytest.mark.redis
def test_operational_checks_refuse_an_evicting_redis(redis_url: str) -> None:
    import redis
    from celery import Celery

    from workers.celery_app import configure, operational_problems

    client = redis.Redis.from_url(redis_url)
    app = configure(Celery("t", set_as_current=False), redis_url)
    before = client.config_get("maxmemory-policy")["maxmemory-policy"]
    try:
        client.config_set("maxmemory-policy", "allkeys-lru")
        [problem] = operational_problems(app, client)
        assert "allkeys-lru" in problem and "noeviction" in problem
        client.config_set("maxmemory-policy", "noeviction")
        assert operational_problems(app, client) == []
    finally:
        client.config_set("maxmemory-policy", before)
        client.close()


@pytest.mark.redis
def test_broker_idle_reads_the_label_queue(redis_url: str) -> None:
    import redis

    from workers.celery_app import broker_idle

    client = redis.Redis.from_url(redis_url)
    assert broker_idle(client)
    client.lpush("label", "message")
    assert not broker_idle(client)
    client.delete("label")
    client.hset("unacked", "tag", "message")
    assert not broker_idle(client)
    client.close()
