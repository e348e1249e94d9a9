"""``analytics.maintain_partitions``: the daily partition maintenance as a Celery task.

:func:`bridge.install` registers it beside the flush task, on the same app, with the same route
(queue ``analytics``, JSON) and, unless ``beat=False``, the beat entry ``maintain-analytics-partitions``
once a day, at 03:07 in the app's time zone. The body is ``asyncio.run(maintain(...))``
(:mod:`bridge.maintenance`): a fresh event loop and one connection made and closed inside it, so
nothing async outlives a run or crosses the fork.

Daily is enough for every interval: partitions are made two intervals ahead (two days with
``ANALYTICS_PARTITION_INTERVAL=day``), and a drain creates a missing one on the spot anyway. Running
it more often, or twice at once, is harmless: a second concurrent run skips (an advisory lock). A
connection error is retried like the flush's; an environment error (table missing or not yet
partitioned, read-only database) is one ERROR line with what to do, and tomorrow's run tries again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from celery.schedules import crontab

from analytics_sdk._exceptions import ConfigurationError
from analytics_sdk._sender import FLUSH_QUEUE
from analytics_sdk._settings import Settings

from ._errors import CONNECTION_ERRORS, NotMigrated, advice, is_environment_error
from .maintenance import maintain

if TYPE_CHECKING:
    from celery import Celery, Task

__all__ = [
    "MAINTAIN_BEAT_ENTRY",
    "MAINTAIN_TASK",
    "maintain_partitions",
    "register",
    "with_beat",
    "with_route",
]

logger = logging.getLogger(__name__)

MAINTAIN_TASK = "analytics.maintain_partitions"
MAINTAIN_BEAT_ENTRY = "maintain-analytics-partitions"
#: Daily at 03:07 in the app's ``timezone`` (UTC for the bridge's own app). A wall-clock time, not
#: ``timedelta(days=1)``: beat counts an interval from its own start, so a beat restarted more often
#: than daily (every deploy, a container without its schedule file) would never run it.
MAINTAIN_AT = {"minute": 7, "hour": 3}
_ROUTE: dict[str, Any] = {"queue": FLUSH_QUEUE, "serializer": "json"}

TASK_OPTIONS: dict[str, Any] = {
    "name": MAINTAIN_TASK,
    "serializer": "json",  # JSON whatever the app's own task_serializer, as the flush task
    "ignore_result": True,
    "autoretry_for": CONNECTION_ERRORS,
    "max_retries": 3,
    "retry_backoff": True,
    "retry_backoff_max": 300,
    "retry_jitter": True,
}


class MaintenanceFailed(Exception):
    """Some partition past the retention could not be dropped (the next run tries again)."""


def maintain_partitions() -> dict[str, Any]:
    """Run :func:`bridge.maintenance.maintain` with the worker's settings; return its report."""
    settings = Settings.from_env()
    try:
        report = asyncio.run(maintain(settings))
    except NotMigrated as exc:
        logger.error("partition maintenance did not run: %s", exc)
        return {"error": str(exc)}
    except Exception as exc:
        if is_environment_error(exc):
            logger.error("partition maintenance did not run: %s", advice(exc))
            return {"error": advice(exc)}
        raise
    if report.failed:
        raise MaintenanceFailed(f"could not drop {', '.join(sorted(report.failed))}: {report.failed}")
    return report.as_dict()


def beat_entry() -> dict[str, Any]:
    # A tick nobody ran within an hour is dropped: tomorrow's comes, and maintenance is idempotent.
    return {
        "task": MAINTAIN_TASK,
        # a fresh crontab per app: beat binds a schedule object to the app it runs
        "schedule": crontab(**MAINTAIN_AT),
        "options": {"queue": FLUSH_QUEUE, "expires": 3600},
    }


def with_route(routes: Any) -> Any:
    """``routes`` (as :func:`bridge._install` made them, ours in front) with the maintenance's route."""
    if isinstance(routes, Mapping):
        return {**routes, MAINTAIN_TASK: dict(_ROUTE)}
    return [{MAINTAIN_TASK: dict(_ROUTE)}, *routes]


def with_beat(schedule: dict[str, Any]) -> dict[str, Any]:
    """``schedule`` with the daily entry; refuses an app that schedules the task or uses the key."""
    for key, entry in schedule.items():
        if key == MAINTAIN_BEAT_ENTRY or (isinstance(entry, Mapping) and entry.get("task") == MAINTAIN_TASK):
            raise ConfigurationError(
                "beat_schedule",
                {key: entry.get("task") if isinstance(entry, Mapping) else entry},
                f"already schedules {MAINTAIN_TASK} or uses the key {MAINTAIN_BEAT_ENTRY!r}: remove that "
                "entry (install adds it, daily) or call install(app, beat=False)",
            )
    return {**schedule, MAINTAIN_BEAT_ENTRY: beat_entry()}


def register(app: Celery, settings: Settings) -> Task[Any, Any]:
    """Register the task on ``app`` only (not shared), with the flush's time limits; refuses another
    task already registered under the name."""
    decorate: Any = app.task  # the options are a dict, which the stubs' overloads cannot match
    task: Task[Any, Any] = decorate(
        shared=False,
        lazy=False,
        time_limit=settings.analytics_task_time_limit,
        soft_time_limit=settings.analytics_task_soft_time_limit,
        **TASK_OPTIONS,
    )(maintain_partitions)
    # Celery hands back the task already registered under the name, if any: it must be ours.
    if getattr(type(task), "__wrapped__", None) is not maintain_partitions:
        raise ConfigurationError(
            "task name", MAINTAIN_TASK, "the app already has another task of this name: rename or remove it"
        )
    return task
