"""The Celery application: configuration only. Tasks live in ``workers.tasks``.

Messages carry ids and small JSON, never documents; pickle is refused. Delivery is
at-least-once (``acks_late`` + ``task_reject_on_worker_lost``); the lease protocol in Postgres
turns that into exactly one label per item and spec version.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

__all__ = [
    "LABEL_QUEUE",
    "LABEL_TASK",
    "TRAIN_QUEUE",
    "TRAIN_TASK",
    "app",
    "broker_idle",
    "configure",
    "operational_problems",
    "send_label_batch",
    "send_training",
]

LABEL_QUEUE = "label"
LABEL_TASK = "stillhouse.label_batch"
# Training runs on its own queue, so a `stillhouse worker --queues train` takes it and label
# workers never wait behind a training job.
TRAIN_QUEUE = "train"
TRAIN_TASK = "stillhouse.train_run"

app = Celery("stillhouse", set_as_current=False)


def configure(
    celery: Celery,
    broker_url: str,
    *,
    task_time_limit_s: int = 900,
    config_module: str | None = None,
) -> Celery:
    """Apply stillhouse's settings; called at the edges (CLI, worker start), never at import.

    ``config_module`` (a site's own Celery settings, e.g. broker TLS options) is applied last;
    :func:`operational_problems` then refuses settings that would lose or corrupt work.
    """
    celery.conf.update(
        broker_url=broker_url,
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=LABEL_QUEUE,
        task_routes={LABEL_TASK: {"queue": LABEL_QUEUE}, TRAIN_TASK: {"queue": TRAIN_QUEUE}},
        task_time_limit=task_time_limit_s,
        task_soft_time_limit=task_time_limit_s - 30,
        # Longer than any task may run, so Redis does not redeliver a message still in work.
        broker_transport_options={"visibility_timeout": task_time_limit_s * 2},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    if config_module:
        # Applied on top of ours, as documented: `config_from_object` alone would only fill
        # in what `conf.update` above did not set, and stillhouse's own values would win.
        celery.conf.update(_settings_of(config_module))
    return celery


def _settings_of(config_module: str) -> dict[str, Any]:
    """The Celery settings a site's module defines (its public, non-module attributes)."""
    import importlib
    import types

    try:
        module = importlib.import_module(config_module)
    except ImportError as exc:
        from schemas.errors import ConfigError

        raise ConfigError(
            f"STILLHOUSE_CELERY_CONFIG names {config_module!r}, which cannot be imported: {exc}"
        ) from exc
    return {
        name: value
        for name, value in vars(module).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }


# kombu's name and content type for pickle: a message in it runs code when it is read.
_PICKLE = {"pickle", "application/x-python-serialize"}


def _is_pickle(serializer: object) -> bool:
    from kombu.serialization import registry  # type: ignore[attr-defined]

    name = str(serializer).strip().lower()
    return name in _PICKLE or registry.name_to_type.get(name, name) in _PICKLE


def operational_problems(celery: Celery, redis_client: Any | None = None) -> list[str]:
    """What in the effective configuration would lose work or run foreign code, in words.

    Refused at start: a pickle serializer (a broker message could run code), a visibility
    timeout shorter than the task time limit (Redis would hand a running batch to a second
    worker), and a Redis that evicts keys under memory pressure (queued ids would vanish).
    """
    conf = celery.conf
    problems = []
    serializers = {
        "task_serializer": [conf.task_serializer],
        "result_serializer": [conf.result_serializer],
        "accept_content": list(conf.accept_content or []),
        "event_serializer": [conf.event_serializer],
    }
    for name, values in serializers.items():
        if any(_is_pickle(v) for v in values):
            problems.append(
                f"Celery {name} includes pickle: set it to json (messages carry only ids)"
            )
    visibility = (conf.broker_transport_options or {}).get("visibility_timeout")
    limit = conf.task_time_limit
    if visibility is not None and limit is not None and float(visibility) < float(limit):
        problems.append(
            f"broker_transport_options visibility_timeout {visibility} s is shorter than "
            f"task_time_limit {limit} s: Redis would redeliver batches still in work; set "
            f"visibility_timeout to at least {int(limit) * 2} s or lower the time limit"
        )
    if redis_client is not None:
        problems += _redis_problems(redis_client)
    return problems


def _redis_problems(redis_client: Any) -> list[str]:
    try:
        policy = redis_client.config_get("maxmemory-policy").get("maxmemory-policy")
    except Exception:  # managed Redis often disables CONFIG: nothing to check then
        return []
    if policy and policy != "noeviction":
        return [
            f"Redis maxmemory-policy is {policy!r}, which evicts keys under memory pressure "
            f"(queued ids would vanish): run `CONFIG SET maxmemory-policy noeviction` and set "
            f"it in redis.conf"
        ]
    return []


def broker_idle(redis_client: Any) -> bool:
    """True when the label queue is empty and no delivered message is unacknowledged.

    Reads kombu's Redis layout: the queue is a list named after it, unacked deliveries sit
    in the ``unacked`` hash until acknowledged.
    """
    return int(redis_client.llen(LABEL_QUEUE)) == 0 and int(redis_client.hlen("unacked")) == 0


def send_label_batch(celery: Celery, spec_id: int, item_ids: list[int]) -> Any:
    """Enqueue one batch of item ids (call only after the transaction that queued them commits)."""
    return celery.send_task(LABEL_TASK, args=[spec_id, item_ids], queue=LABEL_QUEUE)


def send_training(celery: Celery, run_id: int) -> Any:
    """Enqueue one recorded run (after the transaction that recorded it commits)."""
    return celery.send_task(TRAIN_TASK, args=[run_id], queue=TRAIN_QUEUE)
