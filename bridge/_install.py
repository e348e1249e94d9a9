"""``bridge.install(app)``: the flush task on an application's existing Celery app.

Adds exactly three things to the app and changes nothing else of it (a test compares its whole
configuration before and after):

- the task ``flush_analytics_events`` (:mod:`bridge.tasks`: the same body, name, retry policy,
  late ack and, as the task's own attributes, the time limits and ``serializer="json"``), registered
  on this app only (not as a shared task, which Celery would add to every app of the process);
- a route ``flush_analytics_events -> queue "analytics"`` with ``serializer: json``, put in front of
  the app's ``task_routes``, so a message sent by name (``app.send_task``) is JSON too, whatever the
  app's ``task_serializer``;
- unless ``beat=False``, the beat entry ``flush-analytics-events`` every ``ANALYTICS_FLUSH_INTERVAL``;
- likewise the daily partition maintenance, ``analytics.maintain_partitions``: its task, route and beat
  entry ``maintain-analytics-partitions`` (:mod:`bridge._maintenance_task`).

It refuses, with :class:`~analytics_sdk.ConfigurationError` naming the setting and leaving the app as
it was, what would not work: soft time limit not below the hard one, a visibility timeout too short
for the heartbeat, a Celery broker on the Redis Cluster of the queue (:mod:`bridge._broker`), an
``accept_content`` without json (the worker would reject every flush message;
adding json to someone's accept list is their decision), a route or beat entry of the app's own for
the task elsewhere, another task already registered under the name (the old service's task).

Call it where the app is configured, after ``config_from_object``/``conf.update`` and before anything
is sent. Nothing connects: the worker's start-up checks run on a signal (:mod:`bridge._worker_start`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from analytics_sdk._exceptions import ConfigurationError
from analytics_sdk._sender import FLUSH_QUEUE, FLUSH_TASK
from analytics_sdk._settings import Settings, env_name

from . import _maintenance_task, _shutdown, _worker_start
from ._broker import check_broker
from .tasks import TASK_OPTIONS, flush

if TYPE_CHECKING:
    from celery import Celery, Task

__all__ = ["BEAT_ENTRY", "ROUTE", "beat_entry", "check_time_limits", "install"]

logger = logging.getLogger(__name__)

#: The beat schedule's key for the flush (the name the bridge's own app has always used).
BEAT_ENTRY = "flush-analytics-events"
#: The route added in front of the app's task_routes: the queue, and JSON for sends by name.
ROUTE: dict[str, Any] = {"queue": FLUSH_QUEUE, "serializer": "json"}


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
    if settings.analytics_drain_time_budget >= settings.analytics_task_soft_time_limit:
        # Not fatal (the claim/ack protocol keeps every event), but drains will be cut by the soft
        # limit instead of stopping cleanly between transactions and re-sending themselves.
        logger.warning(
            "%s=%s is not below %s=%s: long drains will hit the soft time limit",
            env_name("analytics_drain_time_budget"),
            settings.analytics_drain_time_budget,
            env_name("analytics_task_soft_time_limit"),
            settings.analytics_task_soft_time_limit,
        )


def beat_entry(settings: Settings) -> dict[str, Any]:
    return {
        "task": FLUSH_TASK,
        "schedule": timedelta(seconds=settings.analytics_flush_interval),
        # A tick nobody picked up before the next one is redundant: drop it, don't pile up.
        "options": {"queue": FLUSH_QUEUE, "expires": max(1.0, settings.analytics_flush_interval)},
    }


def _routes_with_ours(routes: Any) -> Any:
    """The app's task_routes with the flush route in front, in the form the app used."""
    if not routes:
        return {FLUSH_TASK: dict(ROUTE)}
    if isinstance(routes, Mapping):
        theirs = routes.get(FLUSH_TASK)
        queue = theirs if isinstance(theirs, str) else (theirs or {}).get("queue", FLUSH_QUEUE)
        if theirs is not None and queue != FLUSH_QUEUE:
            raise ConfigurationError(
                "task_routes",
                {FLUSH_TASK: theirs},
                f"routes {FLUSH_TASK} away from queue {FLUSH_QUEUE!r}, where the SDK sends it: "
                "remove that route",
            )
        # An exact name wins over glob and regex keys in Celery's map lookup, whatever the order.
        return {FLUSH_TASK: dict(ROUTE), **{k: v for k, v in routes.items() if k != FLUSH_TASK}}
    theirs_list = list(routes) if isinstance(routes, (list, tuple)) else [routes]
    # The first router with an answer wins: ours answers for the flush task only.
    return [{FLUSH_TASK: dict(ROUTE)}, *theirs_list]


def _schedule_with_ours(schedule: Mapping[str, Any] | None, settings: Settings) -> dict[str, Any]:
    schedule = dict(schedule or {})
    for key, entry in schedule.items():
        if isinstance(entry, Mapping) and entry.get("task") == FLUSH_TASK:
            raise ConfigurationError(
                "beat_schedule",
                {key: entry.get("task")},
                f"already schedules {FLUSH_TASK}: remove that entry (install adds "
                f"{BEAT_ENTRY!r} every {env_name('analytics_flush_interval')}) or call "
                "install(app, beat=False)",
            )
    if BEAT_ENTRY in schedule:
        raise ConfigurationError(
            "beat_schedule", BEAT_ENTRY, "the app has an entry of its own under this key"
        )
    return {**schedule, BEAT_ENTRY: beat_entry(settings)}


def _is_ours(task: object) -> bool:
    return getattr(type(task), "__wrapped__", None) is flush


def install(app: Celery, *, beat: bool = True) -> Task[Any, Any]:
    """Register ``flush_analytics_events`` on ``app``, route it to the ``analytics`` queue and (unless
    ``beat=False``) schedule it; return the task. Settings come from the ``ANALYTICS_*`` environment.

    A second call on the same app returns the task and changes nothing. Raises
    :class:`~analytics_sdk.ConfigurationError` (the app left unchanged) for what could not work.
    """
    done = _worker_start.installed(app)
    if done is not None:
        return done.task
    settings = Settings.from_env()
    check_time_limits(settings)
    conf = app.conf
    # Next to a Redis Cluster the broker must be elsewhere (kombu cannot use a cluster): both the
    # SDK's (where clients send the flush task) and this app's (where the worker consumes).
    check_broker(settings)
    check_broker(settings, conf.broker_url or None, where="broker_url")
    _worker_start.check_accepts_json(app)
    routes = _maintenance_task.with_route(_routes_with_ours(conf.task_routes))
    schedule = _schedule_with_ours(conf.beat_schedule, settings) if beat else None
    schedule = _maintenance_task.with_beat(schedule) if schedule is not None else None
    # shared=False: on this app only; lazy=False: the task now (this does not finalize the app). The
    # options are a dict shared with nothing else, which the stubs' overloads cannot match.
    register: Any = app.task
    task: Task[Any, Any] = register(
        shared=False,
        lazy=False,
        time_limit=settings.analytics_task_time_limit,
        soft_time_limit=settings.analytics_task_soft_time_limit,
        **TASK_OPTIONS,
    )(flush)
    if not _is_ours(task):
        raise ConfigurationError(
            "task name",
            FLUSH_TASK,
            f"the app already has a task of this name ({type(task).__module__}."
            f"{type(task).__qualname__}), perhaps the service the bridge replaces: remove it, "
            "install registers the bridge's own",
        )
    _maintenance_task.register(app, settings)
    # New values assigned, never the app's dicts mutated in place (a default is shared by every app).
    conf.task_routes = routes
    if schedule is not None:
        conf.beat_schedule = schedule
    # The stop flag must exist before the prefork pool forks: install runs when the worker imports
    # the app's module, in its main process.
    _shutdown.arm()
    _worker_start.connect()
    _worker_start.remember(app, _worker_start.Installed(task, settings))
    logger.debug("installed %s on Celery app %r (beat=%s)", FLUSH_TASK, app.main, beat)
    return task
