"""The distributed edge: the Celery app, start-up checks, the dispatcher process, workers."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from schemas.errors import ConfigError, DatabaseUnreachable
from stillhouse.context import connect_database, open_database, open_runtime
from stillhouse.servers.teacher.process import stop_process
from stillhouse.settings import Settings
from storage.session import make_sessionmaker
from workers.dispatch import (
    DispatchOptions,
    DispatchPass,
    Publisher,
    dispatch_once,
    run_dispatcher,
)

__all__ = [
    "dispatch_options",
    "open_celery",
    "run_dispatch",
    "run_worker",
    "spec_dispatcher",
    "submit_training",
    "trainer_argv",
]

log = logging.getLogger(__name__)


def _require_distributed(settings: Settings, what: str) -> str:
    if not settings.broker_url:
        raise ConfigError(f"{what} needs STILLHOUSE_BROKER_URL (e.g. redis://127.0.0.1:6379/0)")
    if settings.is_sqlite:
        raise ConfigError(
            f"{what} needs a shared database: set STILLHOUSE_DATABASE_URL to postgresql+psycopg://…"
        )
    return settings.broker_url


def _redis(settings: Settings) -> Any | None:
    url = str(settings.broker_url or "")
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return None
    import redis

    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)


def open_celery(settings: Settings, *, check: bool = True) -> Any:
    """The configured Celery app; refuses to go on with settings that would lose work."""
    from workers.celery_app import app, configure, operational_problems

    configure(
        app,
        _require_distributed(settings, "distributed mode"),
        task_time_limit_s=settings.task_time_limit_s,
        config_module=settings.celery_config,
    )
    if check:
        client = _redis(settings)
        try:
            problems = operational_problems(app, client)
        finally:
            if client is not None:
                client.close()
        if problems:
            raise ConfigError("refusing to start:\n  - " + "\n  - ".join(problems))
    return app


def dispatch_options(settings: Settings) -> DispatchOptions:
    return DispatchOptions(
        interval_s=settings.dispatch_interval_s,
        max_queued=settings.dispatch_max_queued,
        requeue_after_s=settings.requeue_after_s,
    )


@dataclass(frozen=True, slots=True)
class _Broker:
    """What a dispatch pass needs from the broker: where to publish, whether it is idle."""

    publish: Publisher
    idle: Callable[[], bool] | None


def _broker(settings: Settings) -> _Broker:
    from workers.celery_app import broker_idle, send_label_batch

    celery = open_celery(settings)
    client = _redis(settings)
    return _Broker(
        publish=lambda spec_id, ids: send_label_batch(celery, spec_id, ids),
        idle=(lambda: broker_idle(client)) if client is not None else None,
    )


def spec_dispatcher(
    settings: Settings, sessions: sessionmaker[Session], spec_ids: Sequence[int] = ()
) -> Callable[[], DispatchPass]:
    """A function that runs one dispatch pass (for ``backfill --wait``, which follows one spec)."""
    broker, options = _broker(settings), dispatch_options(settings)
    return lambda: dispatch_once(
        sessions, broker.publish, options, spec_ids=spec_ids, broker_idle=broker.idle
    )


def run_dispatch(settings: Settings, *, once: bool) -> DispatchPass | None:
    """`stillhouse dispatch`: sweep and dispatch once, or every interval until stopped."""
    broker, options = _broker(settings), dispatch_options(settings)
    if once:
        once_sessions = _sessions_of(settings)
        return dispatch_once(once_sessions, broker.publish, options, broker_idle=broker.idle)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    sessions = _wait_for_database(settings, stop)
    if sessions is None:
        return None
    log.info("dispatcher running every %.2f s", options.interval_s)
    run_dispatcher(sessions, broker.publish, options, stop, broker_idle=broker.idle)
    return None


def _sessions_of(settings: Settings) -> sessionmaker[Session]:
    """Sessions for this process's lifetime (the dispatcher's loop)."""
    return make_sessionmaker(connect_database(settings))


def _wait_for_database(settings: Settings, stop: threading.Event) -> sessionmaker[Session] | None:
    """A long-running dispatcher outlives a database restart, at start as in its loop."""
    while not stop.is_set():
        try:
            return _sessions_of(settings)
        except DatabaseUnreachable as exc:  # an old schema, say, is raised: waiting will not fix it
            log.warning("%s; trying again in 2 s", exc)
            stop.wait(2.0)
    return None


@contextmanager
def _dispatcher_process(enabled: bool) -> Iterator[None]:
    """`worker --beat`: the dispatcher and the batch poller, each in its own process (no
    threads across Celery's fork), started again if one dies while the worker runs."""
    if not enabled:
        yield
        return
    commands = {
        "the dispatcher": [sys.executable, "-m", "stillhouse", "dispatch"],
        "the batch poller": [sys.executable, "-m", "stillhouse", "batches", "poll", "--forever"],
    }
    children = {name: subprocess.Popen(argv, env=os.environ) for name, argv in commands.items()}
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(2.0):
            for name, argv in commands.items():
                if children[name].poll() is not None:
                    log.warning(
                        "%s exited (%s); starting it again", name, children[name].returncode
                    )
                    children[name] = subprocess.Popen(argv, env=os.environ)

    watcher = threading.Thread(target=watch, name="stillhouse-beat-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
        for child in children.values():
            stop_process(child, timeout=15)


def submit_training(settings: Settings, run_id: int) -> None:
    """Put a recorded run on the train queue (``stillhouse train --queue``)."""
    from workers.celery_app import send_training

    send_training(open_celery(settings, check=False), run_id)


def trainer_argv(run_id: int) -> list[str]:
    """The trainer's own process: this Python, this CLI, the run's id."""
    return [sys.executable, "-m", "stillhouse", "runs", "exec", str(run_id)]


def _train(settings: Settings, run_id: int) -> dict[str, Any]:
    """One training job, from the worker that took it (an engine of its own, after any fork)."""
    from workers.runs import launch_trainer

    with open_database(settings) as sessions:
        return launch_trainer(sessions, run_id, trainer_argv(run_id))


def run_worker(
    settings: Settings,
    *,
    concurrency: int | None,
    pool: str,
    loglevel: str,
    beat: bool,
    queues: str = "label",
) -> None:
    """`stillhouse worker`: Celery label workers (and, with ``beat``, the dispatcher); with
    ``queues`` naming ``train``, training jobs, each run as its own process."""
    from workers import tasks
    from workers.celery_app import LABEL_QUEUE, TRAIN_QUEUE

    names = [name.strip() for name in queues.split(",") if name.strip()]
    unknown = sorted(set(names) - {LABEL_QUEUE, TRAIN_QUEUE})
    if unknown or not names:
        raise ConfigError(
            f"--queues takes {LABEL_QUEUE} and/or {TRAIN_QUEUE}, comma-separated; got {queues!r}"
        )
    celery = open_celery(settings)
    connect_database(settings).dispose()  # fail fast on a bad URL or an old schema
    tasks.set_runtime_factory(lambda: open_runtime(settings, config_pause_s=60.0))
    tasks.set_trainer_launcher(lambda run_id: _train(settings, run_id))
    # httpx logs every request at INFO: hundreds of lines a second that say nothing the
    # ledger does not (errors still come through at WARNING).
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    with _dispatcher_process(beat):
        celery.worker_main(
            [
                "worker",
                f"--loglevel={loglevel}",
                f"--pool={pool}",
                f"--concurrency={concurrency or settings.worker_concurrency}",
                f"--queues={','.join(names)}",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ]
        )
