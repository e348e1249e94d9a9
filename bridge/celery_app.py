"""The bridge's own Celery app, for teams without one: ``celery -A bridge worker -Q analytics``.

Configuration only: the task, its route and its beat entry are added by :func:`bridge.install`, the
same call an application makes on its own app, so both run the same task with the same checks.

Everything comes from ``Settings.from_env()`` (``ANALYTICS_*`` variables): the broker, the flush
interval, the time limits. Nothing here opens a connection: the prefork pool forks after import,
and an async client made before the fork would be shared by every child. Start-up refuses a
configuration that cannot work (:func:`check_time_limits`: the soft time limit must come before the
hard one, and the visibility timeout must leave the drain's heartbeat room to land a renewal even
when one times out); the Redis version and the table are checked when a worker starts
(:mod:`bridge._worker_start`).
"""

from __future__ import annotations

from typing import Any

from celery import Celery, Task

from analytics_sdk._sender import FLUSH_QUEUE
from analytics_sdk._settings import Settings

from ._install import check_time_limits, install

__all__ = ["app", "check_time_limits", "flush_analytics_events", "settings"]

settings = Settings.from_env()
check_time_limits(settings)

app = Celery("bridge", broker=settings.broker_dsn)
app.conf.update(
    # JSON only, in and out: nothing from the broker is ever unpickled.
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
    event_serializer="json",
    task_default_queue=FLUSH_QUEUE,
    # Prefetch 1 with the task's late ack: a killed worker's task does not vanish with a long queue
    # behind it, and a worker does not sit on flush requests another could run.
    task_acks_late=True,
    task_reject_on_worker_lost=False,
    # When the broker connection drops, end the running drain at once (it is safe: its batches stay
    # leased and are reclaimed). Left running, its result waits unread while the consumer blocks in
    # reconnecting; past the soft time limit billiard then sends SIGUSR1 to a child that already
    # finished, which corrupts the result pipe ("Unrecoverable error: UnicodeDecodeError") and
    # stops the worker for good. Fault scenario 7 (Redis restarted under a worker) caught it.
    worker_cancel_long_running_tasks_on_connection_loss=True,
    worker_prefetch_multiplier=1,
    task_time_limit=settings.analytics_task_time_limit,
    task_soft_time_limit=settings.analytics_task_soft_time_limit,
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    timezone="UTC",
    enable_utc=True,
)

flush_analytics_events: Task[Any, Any] = install(app)
