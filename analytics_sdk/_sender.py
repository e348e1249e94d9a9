"""Sends the bridge's flush task through the Celery broker, without importing the bridge."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from ._settings import Settings

__all__ = ["FLUSH_QUEUE", "FLUSH_TASK", "TaskSender"]

logger = logging.getLogger(__name__)

#: The task name and queue the bridge registers; the two sides share only these strings.
FLUSH_TASK = "flush_analytics_events"
FLUSH_QUEUE = "analytics"
#: A flush request nobody picked up within this many seconds is discarded by the worker: a newer
#: one (or beat) will drain the same queue, so a stalled worker does not pile up copies.
FLUSH_EXPIRES = 300


class TaskSender:
    """A minimal Celery producer, made on first use and again after a fork.

    ``send()`` blocks on the broker: async callers run it in a worker thread.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._app: Any = None
        self._pid = 0
        self._lock = threading.Lock()  # first-use construction only, never on the track() path

    def _get_app(self) -> Any:
        if self._app is None or self._pid != os.getpid():
            with self._lock:
                if self._app is None or self._pid != os.getpid():
                    from celery import Celery  # imported lazily: apps that never flush don't pay

                    app = Celery("analytics_sdk", broker=self._settings.broker_dsn, set_as_current=False)
                    app.conf.update(
                        task_serializer="json",
                        accept_content=["json"],
                        broker_connection_retry_on_startup=False,
                        broker_transport_options={"max_retries": 2},
                    )
                    self._app, self._pid = app, os.getpid()
        return self._app

    def send(self, countdown: float | None = None, **kwargs: Any) -> str:
        """Send ``flush_analytics_events`` to the ``analytics`` queue, to run now or ``countdown``
        seconds from now; return the task id."""
        result = self._get_app().send_task(
            FLUSH_TASK,
            kwargs=kwargs,
            countdown=countdown,
            queue=FLUSH_QUEUE,
            expires=FLUSH_EXPIRES,
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0.1, "interval_step": 0.5},
        )
        logger.debug("sent %s as task %s", FLUSH_TASK, result.id)
        return str(result.id)

    def close(self) -> None:
        app, self._app = self._app, None
        if app is not None and self._pid == os.getpid():
            app.close()
