"""``flush_analytics_events``: the Celery task, a sync shell around ``asyncio.run(drain(...))``.

The body is defined once here, as the plain function :func:`flush`, and bound to a Celery app by
:func:`bridge.install` with :data:`TASK_OPTIONS`: to the bridge's own app (``celery -A bridge worker``,
see :mod:`bridge.celery_app`) or to an application's existing app (``bridge.install(app)``).
``bridge.tasks.flush_analytics_events`` is the task as bound to the bridge's own app, built on first
access, so importing this module neither reads the worker's configuration nor builds an app.

Each run makes a fresh event loop and :func:`bridge.drain.drain` makes and closes its own Redis
client and PostgreSQL connection inside it, so nothing async outlives a run or crosses the fork.

Retries: only connection-class and transient errors (Redis or PostgreSQL unreachable, dropped, timing
out, a lock timeout; see :mod:`bridge._errors`) are retried, at most 3 times with exponential backoff
and jitter. An environment error (read-only or full database, table missing, wrong credentials) is
not: it is logged as one ERROR line with what to do, the task ends with ``HeldByEnvironment`` (logged
by Celery at INFO, no traceback) and the next beat tick tries again. The soft and hard time limits are
the task's own (set by :func:`bridge.install` from the settings), so they hold in an app whose own
limits differ. A data error never reaches this level: the drain dead-letters the rows it can never
insert and commits the rest.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from analytics_sdk._sender import FLUSH_EXPIRES, FLUSH_QUEUE, FLUSH_TASK
from analytics_sdk._settings import Settings

from ._errors import (
    CONNECTION_ERRORS,
    ConnectionLostError,
    HeldByEnvironment,
    advice,
    is_connection_error,
    is_environment_error,
    sqlstate_of,
    was_reported,
)
from .drain import drain

if TYPE_CHECKING:
    from celery import Task

    flush_analytics_events: Task[Any, Any]

__all__ = ["TASK_OPTIONS", "flush", "flush_analytics_events"]

logger = logging.getLogger(__name__)

#: How the task is registered on any app (time limits are added per app from the settings). The
#: queue is not here: it comes from the app's task_routes (Celery 5.7 deprecates the task's own
#: queue attribute), which :func:`bridge.install` extends.
TASK_OPTIONS: dict[str, Any] = {
    "name": FLUSH_TASK,
    "bind": True,
    # JSON whatever the app's own task_serializer: nothing of ours is ever pickled.
    "serializer": "json",
    # The events live in Redis under their own claim/ack protocol; the task message only says "drain
    # now". A late ack keeps a killed worker's task from vanishing with a long queue behind it; a
    # lost task is not re-queued (beat sends another), so a poison batch that kills its worker does
    # not turn into a redelivery loop of the task itself.
    "acks_late": True,
    "reject_on_worker_lost": False,
    "ignore_result": True,
    "autoretry_for": CONNECTION_ERRORS,
    "max_retries": 3,
    "retry_backoff": True,
    "retry_backoff_max": 60,
    "retry_jitter": True,
    # An environment error is expected operation (the events wait in flight, the ERROR line says what
    # to do): Celery logs it at INFO without a traceback instead of 30 lines every beat tick.
    "throws": (HeldByEnvironment,),
}


def _report(exc: Exception) -> None:
    """The one ERROR line of an environment error (unless the drain logged it where it held a batch).
    Not retried: waiting seconds does not fix a read-only database or a missing table; the next beat
    tick tries again, and the released batches wait for it."""
    if not was_reported(exc):
        logger.error("drain held its events in flight, none dead-lettered: %s", advice(exc))


def flush(self: Task[Any, Any], time_budget: float | None = None) -> dict[str, Any]:
    """Drain the queue; return the summary (claimed, inserted, duplicates, dead_lettered, reclaimed,
    batches, seconds, backlog). When the time budget ran out with events still queued, send itself
    again so the backlog keeps moving without waiting for the next beat."""
    current = Settings.from_env()  # read per run: cheap, and follows the worker's environment
    try:
        summary = asyncio.run(drain(current, time_budget=time_budget))
    except Exception as exc:
        if is_environment_error(exc):
            _report(exc)
            if isinstance(exc, HeldByEnvironment):
                raise
            raise HeldByEnvironment(advice(exc), sqlstate=sqlstate_of(exc), constraint=None) from exc
        if is_connection_error(exc) and not isinstance(exc, CONNECTION_ERRORS):
            # e.g. asyncpg's "connection is closed" InterfaceError: give autoretry a type it knows.
            raise ConnectionLostError(f"{type(exc).__name__}: {exc}") from exc
        raise
    if summary.budget_spent and not summary.stopped and summary.backlog and not self.request.is_eager:
        try:
            self.apply_async(kwargs={"time_budget": time_budget}, queue=FLUSH_QUEUE, expires=FLUSH_EXPIRES)
            logger.info(
                "%s events still queued after the time budget: sent %s again", summary.backlog, FLUSH_TASK
            )
        except Exception as exc:  # the events are safe in Redis; beat will come back for them
            logger.warning("could not re-send %s (%s); beat will continue the drain", FLUSH_TASK, exc)
    return summary.as_dict()


def __getattr__(name: str) -> Any:
    if name == "flush_analytics_events":
        from .celery_app import flush_analytics_events

        return flush_analytics_events
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
