"""The application's own Celery settings, as it had them before the analytics bridge.

Nothing here mentions analytics: ``bridge.install(app)`` in :mod:`api.celery_app` adds the flush
task's route and beat entry and leaves these settings as they are.
"""

from __future__ import annotations

import os

broker_url = os.environ.get("CELERY_BROKER_URL", "redis://localhost:6379/1")
# The application's tasks go to its own queue; the flush task goes to "analytics".
task_default_queue = "api"
task_routes = {"api.tasks.*": {"queue": "api"}}
task_serializer = "json"
accept_content = ["json"]
task_ignore_result = True
worker_prefetch_multiplier = 4
# Recommended with the bridge (the worker logs a WARNING without it): when the broker connection
# drops, running tasks are cancelled instead of outliving it; the drain's events are safe in Redis.
worker_cancel_long_running_tasks_on_connection_loss = True
broker_connection_retry_on_startup = True
timezone = "Europe/Paris"
