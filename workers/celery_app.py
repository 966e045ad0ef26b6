"""The Celery application: configuration only. Tasks live in ``workers.tasks``.

Messages carry ids and small JSON, never documents; pickle is refused. Delivery is
at-least-once (``acks_late`` + ``task_reject_on_worker_lost``); the lease protocol in Postgres
turns that into exactly one label per item and spec version.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

__all__ = ["LABEL_QUEUE", "LABEL_TASK", "app", "configure"]

LABEL_QUEUE = "label"
LABEL_TASK = "stillhouse.label_batch"

app = Celery("stillhouse", set_as_current=False)


def configure(celery: Celery, broker_url: str, *, task_time_limit_s: int = 900) -> Celery:
    """Apply stillhouse's settings; called at the edges (CLI, worker start), never at import."""
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
        task_routes={LABEL_TASK: {"queue": LABEL_QUEUE}},
        task_time_limit=task_time_limit_s,
        task_soft_time_limit=task_time_limit_s - 30,
        # Longer than any task may run, so Redis does not redeliver a message still in work.
        broker_transport_options={"visibility_timeout": task_time_limit_s * 2},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return celery


def send_label_batch(celery: Celery, spec_id: int, item_ids: list[int]) -> Any:
    """Enqueue one batch of item ids (call only after the transaction that queued them commits)."""
    return celery.send_task(LABEL_TASK, args=[spec_id, item_ids], queue=LABEL_QUEUE)
