"""The dispatcher and the sweeper: Postgres decides what is ready, Redis only carries ids.

One pass sweeps (expired leases back to pending or failed, lost queue messages back to
pending), then claims ready items with ``FOR UPDATE SKIP LOCKED``, commits, and only then
publishes id batches, so a worker never receives an id it cannot see. Several dispatchers may
run at once: the row locks keep them from handing out an item twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sqlalchemy.orm import Session, sessionmaker

from storage.leases import (
    SweepCounts,
    batch_sizes,
    claim_ready,
    expire_leases,
    queued_counts,
    requeue_lost,
    return_to_pending,
)
from workers.spec import LABELING_DEFAULTS

__all__ = ["DispatchOptions", "DispatchPass", "Publisher", "dispatch_once", "run_dispatcher"]

log = logging.getLogger(__name__)

# publish(spec_id, ids) sends one batch; broker_idle() says the broker holds no label message.
Publisher = Callable[[int, list[int]], object]


@dataclass(frozen=True, slots=True)
class DispatchOptions:
    """How the dispatcher paces itself (all from settings, see ``stillhouse dispatch``)."""

    interval_s: float = 0.5
    # Never more than this many ids per spec waiting in the broker: Redis holds ids, not the
    # backlog; the rest stays pending in Postgres, where it is queryable and safe.
    max_queued: int = 5_000
    # A queued item nobody claimed for this long has lost its message (Redis flushed or
    # restarted without persistence): it goes back to pending.
    requeue_after_s: float = 300.0
    # When the broker says its label queue is empty, a queued item older than this is lost.
    requeue_idle_after_s: float = 15.0


@dataclass(slots=True)
class DispatchPass:
    sweep: SweepCounts = field(default_factory=SweepCounts)
    sent: int = 0
    batches: int = 0
    unsent: int = 0


def dispatch_once(
    sessions: sessionmaker[Session],
    publish: Publisher,
    options: DispatchOptions,
    *,
    spec_ids: Sequence[int] = (),
    broker_idle: Callable[[], bool] | None = None,
) -> DispatchPass:
    """One sweep and one dispatch; returns what it did."""
    result = DispatchPass()
    with sessions.begin() as session:
        result.sweep = expire_leases(session)
        lost_after = options.requeue_after_s
        if broker_idle is not None and _safe(broker_idle):
            lost_after = min(lost_after, options.requeue_idle_after_s)
        result.sweep.requeued = requeue_lost(session, older_than_s=lost_after)
    with sessions.begin() as session:
        waiting = queued_counts(session)
        sizes = batch_sizes(session)
        room = {
            spec_id: options.max_queued - waiting.get(spec_id, 0) for spec_id in (spec_ids or sizes)
        }
        claimed = claim_ready(session, limits=room, spec_ids=spec_ids)
    # Publish after commit; a failed publish puts the rest back at once (no wait for a sweep).
    for spec_id, ids in claimed.items():
        size = sizes.get(spec_id, LABELING_DEFAULTS["batch_size"])
        for start in range(0, len(ids), size):
            batch = ids[start : start + size]
            try:
                publish(spec_id, batch)
            except Exception as exc:
                rest = ids[start:]
                with sessions.begin() as session:
                    return_to_pending(session, rest)
                result.unsent += len(rest)
                log.warning("broker publish failed (%s); %d ids back to pending", exc, len(rest))
                break
            result.sent += len(batch)
            result.batches += 1
    return result


def _safe(check: Callable[[], bool]) -> bool:
    try:
        return bool(check())
    except Exception:  # a broker that cannot answer is not known to be idle
        return False


def run_dispatcher(
    sessions: sessionmaker[Session],
    publish: Publisher,
    options: DispatchOptions,
    stop: threading.Event,
    *,
    broker_idle: Callable[[], bool] | None = None,
    on_pass: Callable[[DispatchPass], None] | None = None,
) -> None:
    """Dispatch and sweep every ``interval_s`` until ``stop`` is set; survives outages."""
    while not stop.is_set():
        started = time.monotonic()
        try:
            done = dispatch_once(sessions, publish, options, broker_idle=broker_idle)
        except Exception as exc:  # the database or broker is down: log, wait, try again
            log.warning("dispatch pass failed: %s", exc)
        else:
            if on_pass is not None:
                on_pass(done)
            if done.sent or done.sweep.expired or done.sweep.failed or done.sweep.requeued:
                log.info(
                    "dispatched %d ids in %d batches; leases expired %d, failed %d, requeued %d",
                    done.sent,
                    done.batches,
                    done.sweep.expired,
                    done.sweep.failed,
                    done.sweep.requeued,
                )
        stop.wait(max(0.0, options.interval_s - (time.monotonic() - started)))
