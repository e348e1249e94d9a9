"""``flush_analytics_events``: the Celery task, a sync shell around ``asyncio.run(drain(...))``.

Each run makes a fresh event loop and :func:`bridge.drain.drain` makes and closes its own Redis
client and PostgreSQL connection inside it, so nothing async outlives a run or crosses the fork.

Retries: only connection-class and transient errors (Redis or PostgreSQL unreachable, dropped, timing
out, a lock timeout; see :mod:`bridge._errors`) are retried, at most 3 times with exponential backoff
and jitter. An environment error (read-only or full database, table missing, wrong credentials) is
not: it is logged as one ERROR line with what to do, the task ends with ``HeldByEnvironment`` (logged
by Celery at INFO, no traceback) and the next beat tick tries again. The soft and hard time limits come
from the app's configuration (``task_soft_time_limit``/``task_time_limit``, set from the settings,
which the stubs type as int while Celery takes fractions of a second). A data error never reaches this
level: the drain dead-letters the rows it can never insert and commits the rest.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from celery import Task
from celery.signals import worker_shutting_down

from analytics_sdk._sender import FLUSH_EXPIRES, FLUSH_QUEUE, FLUSH_TASK
from analytics_sdk._settings import Settings

from . import _shutdown
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
from .celery_app import app
from .drain import drain

__all__ = ["flush_analytics_events"]

logger = logging.getLogger(__name__)

# The stop flag is made here, at import, in the worker's main process: before the prefork pool forks,
# so every pool process shares it (see bridge._shutdown). A warm shutdown raises it.
_shutdown.arm()


@worker_shutting_down.connect
def _stop_drains(**_: Any) -> None:
    _shutdown.request_stop()


def _report(exc: Exception) -> None:
    """The one ERROR line of an environment error (unless the drain logged it where it held a batch).
    Not retried: waiting seconds does not fix a read-only database or a missing table; the next beat
    tick tries again, and the released batches wait for it."""
    if not was_reported(exc):
        logger.error("drain held its events in flight, none dead-lettered: %s", advice(exc))


# The queue comes from the app's task_routes (Celery 5.7 deprecates the task's own queue attribute).
@app.task(
    name=FLUSH_TASK,
    bind=True,
    acks_late=True,
    autoretry_for=CONNECTION_ERRORS,
    max_retries=3,
    retry_backoff=True,
    retry_backoff_max=60,
    retry_jitter=True,
    # An environment error is expected operation (the events wait in flight, the ERROR line says what
    # to do): Celery logs it at INFO without a traceback instead of 30 lines every beat tick.
    throws=(HeldByEnvironment,),
)
def flush_analytics_events(self: Task[Any, Any], time_budget: float | None = None) -> dict[str, Any]:
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
