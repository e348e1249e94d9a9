"""The Celery app of the bridge: configuration only.

Everything comes from ``Settings.from_env()`` (``ANALYTICS_*`` variables): the broker, the flush
interval, the time limits. Nothing here opens a connection: the prefork pool forks after import,
and an async client made before the fork would be shared by every child.

At worker start-up (``celeryd_after_setup``) :func:`preflight` checks the Redis version and the
table. Start-up refuses a configuration that cannot work: the soft time limit must come before the hard one,
and the visibility timeout must leave the drain's heartbeat (a renewal every quarter of it) room to
land a renewal even when one times out. The visibility timeout need not exceed the time limits: a
drain renews its leases while it works, and a drain that was paused past its lease is fenced (its
late ack does nothing), so two drains never both ack one batch.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from celery import Celery
from celery.signals import celeryd_after_setup

from analytics_sdk._exceptions import ConfigurationError
from analytics_sdk._sender import FLUSH_QUEUE, FLUSH_TASK
from analytics_sdk._settings import Settings, env_name

__all__ = ["app", "check_time_limits", "preflight", "settings"]

logger = logging.getLogger(__name__)


def check_time_limits(settings: Settings) -> None:
    """Raise :class:`ConfigurationError` unless soft limit < hard limit and the visibility timeout
    is at least twice the Redis timeout."""
    hard = settings.analytics_task_time_limit
    if settings.analytics_task_soft_time_limit >= hard:
        raise ConfigurationError(
            env_name("analytics_task_soft_time_limit"),
            settings.analytics_task_soft_time_limit,
            f"must be less than {env_name('analytics_task_time_limit')}={hard}",
        )
    # The heartbeat renews every visibility/4; one renewal may take up to the Redis timeout before it
    # fails, and the next must still land before the lease runs out: v/4 + T + v/4 <= v.
    floor = 2 * settings.analytics_redis_timeout
    if settings.analytics_visibility_timeout < floor:
        raise ConfigurationError(
            env_name("analytics_visibility_timeout"),
            settings.analytics_visibility_timeout,
            f"must be at least 2 x {env_name('analytics_redis_timeout')} = {floor:g}: the drain renews "
            "its leases every quarter of it, and a renewal may take a Redis timeout to fail",
        )


settings = Settings.from_env()
check_time_limits(settings)
if settings.analytics_drain_time_budget >= settings.analytics_task_soft_time_limit:
    # Not fatal (the claim/ack protocol keeps every event), but drains will be cut by the soft limit
    # instead of stopping cleanly between transactions and re-sending themselves.
    logger.warning(
        "%s=%s is not below %s=%s: long drains will hit the soft time limit",
        env_name("analytics_drain_time_budget"),
        settings.analytics_drain_time_budget,
        env_name("analytics_task_soft_time_limit"),
        settings.analytics_task_soft_time_limit,
    )

app = Celery("bridge", broker=settings.broker_dsn, include=["bridge.tasks"])
app.conf.update(
    # JSON only, in and out: nothing from the broker is ever unpickled.
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
    event_serializer="json",
    task_default_queue=FLUSH_QUEUE,
    task_routes={FLUSH_TASK: {"queue": FLUSH_QUEUE}},
    # The events live in Redis under their own claim/ack protocol; the task message only says "drain
    # now". Late acks and prefetch 1 keep a killed worker's task from vanishing with a long queue
    # behind it; a lost task is not re-queued (beat sends another), so a poison batch that kills
    # its worker does not turn into a redelivery loop of the task itself.
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
    beat_schedule={
        "flush-analytics-events": {
            "task": FLUSH_TASK,
            "schedule": timedelta(seconds=settings.analytics_flush_interval),
            # A tick nobody picked up before the next one is redundant: drop it, don't pile up.
            "options": {"queue": FLUSH_QUEUE, "expires": max(1.0, settings.analytics_flush_interval)},
        }
    },
)


def preflight(sender: object = None, instance: object = None, **_: object) -> None:
    """At worker start-up (logging set up, pool not yet forked): Redis >= 7.0 or refuse to start, and
    one ERROR naming `analytics-bridge migrate` if the table is missing (see bridge/_preflight.py).
    Connected to a signal rather than run here: importing the app must not connect to anything."""
    if getattr(instance, "app", None) is not app:
        return  # another app's worker in this process
    from ._preflight import worker_preflight

    worker_preflight(settings)


celeryd_after_setup.connect(preflight, weak=False)
