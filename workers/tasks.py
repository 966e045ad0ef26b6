"""Celery task adapters over the pipeline; the per-process runtime is built after the fork."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from typing import Any

from celery.signals import (
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)

from schemas.errors import BudgetExhausted, ConfigError
from storage.leases import hold_back
from workers.celery_app import LABEL_TASK, TRAIN_TASK, app
from workers.pipeline import LabelRuntime

__all__ = ["label_batch", "set_runtime_factory", "set_trainer_launcher", "train_run"]

log = logging.getLogger(__name__)

TRAIN_TIME_LIMIT_S = 7 * 24 * 3600
CONFIG_ERROR_WAIT_S = 30.0  # how long items wait before a worker tries them again
_state: dict[str, Any] = {"factory": None, "runtime": None, "stack": None, "trainer": None}
_lock = threading.Lock()  # the threads pool builds the runtime once, shared by its threads


def set_runtime_factory(factory: Callable[[], AbstractContextManager[LabelRuntime]]) -> None:
    """Register how a worker process opens its :class:`LabelRuntime` (from its settings): a
    context manager, entered once per process and left at its shutdown (the runtime's
    loop, clients and engine closed)."""
    _state["factory"] = factory


def set_trainer_launcher(launch: Callable[[int], dict[str, Any]]) -> None:
    """Register how a worker trains one run: ``launch(run_id)`` starts the trainer as its own
    process, waits for it and returns a small status (see ``workers.runs``)."""
    _state["trainer"] = launch


def _runtime() -> LabelRuntime:
    with _lock:
        if _state["runtime"] is None:
            factory = _state["factory"]
            if factory is None:
                raise RuntimeError("no runtime factory: start workers with `stillhouse worker`")
            stack = ExitStack()
            _state["runtime"] = stack.enter_context(factory())
            _state["stack"] = stack
        runtime: LabelRuntime = _state["runtime"]
    return runtime


@worker_process_init.connect
def _build_after_fork(**_: Any) -> None:
    # Engines, event loops and HTTP clients never cross a fork.
    _state["runtime"], _state["stack"] = None, None


@worker_ready.connect
def _wake_threads_pool(sender: Any = None, **_: Any) -> None:
    """Wake the consumer's event loop every 0.1 s under the threads pool.

    A task that finishes in a pool thread has its late ack (and so the next prefetch) sent
    only when the consumer's loop wakes, which with prefetch 1 can take many seconds
    (celery/celery#6941): batches sat in Redis while the worker idled. A no-op timer bounds it.
    """
    pool = getattr(sender, "pool", None)
    timer = getattr(sender, "timer", None)
    if timer is not None and type(pool).__module__ == "celery.concurrency.thread":
        timer.call_repeatedly(0.1, _noop)
        log.info("threads pool: the consumer wakes every 0.1 s to send acks promptly")


def _noop() -> None:
    """Nothing: being called is the point (see `_wake_threads_pool`)."""


@worker_process_shutdown.connect  # a prefork child exits
@worker_shutdown.connect  # the threads or solo pool's one process exits
def _close(**_: Any) -> None:
    with _lock:
        if _state["stack"] is not None:
            _state["stack"].close()
        _state["runtime"], _state["stack"] = None, None


@app.task(name=LABEL_TASK, bind=True)
def label_batch(self: Any, spec_id: int, item_ids: list[int]) -> dict[str, int]:
    """Label one batch of item ids; returns small counts (results are in the database)."""
    runtime = _runtime()
    try:
        summary = runtime.label_batch(spec_id, item_ids=item_ids)
    except BudgetExhausted as exc:
        log.warning("spec %s: %s", spec_id, exc)  # the pipeline parked the items, with why
        return {"claimed": 0, "labeled": 0}
    except ConfigError as exc:
        # A worker's configuration error (a key variable not set here, a teacher URL that
        # is not valid) goes where users look: on the items, in `status` and in the waiting
        # `backfill`, not only as a traceback in this worker's log.
        message = f"{exc.kind}: {exc} (on worker {socket.gethostname()})"
        with runtime.sessions.begin() as session:
            held = hold_back(session, item_ids, exc.kind, message, CONFIG_ERROR_WAIT_S)
        log.error("spec %s: %d items held back: %s", spec_id, held, exc)
        return {"claimed": 0, "labeled": 0, "held_back": held}
    log.info(
        "spec %s: %s of %s ids claimed, %s labeled, %s teacher calls, cpu_ms=%.1f call_cpu_ms=%.1f",
        spec_id,
        summary.claimed,
        len(item_ids),
        summary.labeled,
        summary.teacher_calls,
        summary.cpu_ms,
        summary.call_cpu_ms,
    )
    return {"claimed": summary.claimed, "labeled": summary.labeled}


# Acknowledged on receipt and with a week's time limit: a training job runs for as long as it
# needs, and is never redelivered to start a second trainer beside a running one (the run's
# row records what happened to it; a run is started once).
@app.task(
    name=TRAIN_TASK,
    acks_late=False,
    time_limit=TRAIN_TIME_LIMIT_S,
    soft_time_limit=TRAIN_TIME_LIMIT_S - 60,
)
def train_run(run_id: int) -> dict[str, Any]:
    """Train one recorded run in a process of its own; returns how it ended."""
    launch = _state["trainer"]
    if launch is None:
        raise RuntimeError("no trainer launcher: start workers with `stillhouse worker`")
    status: dict[str, Any] = launch(run_id)
    log.info("run %s: %s", run_id, status)
    return status
