"""The application's Celery app: its own configuration and tasks, plus the analytics flush task.

    celery -A api.celery_app worker --loglevel=info -Q analytics,api
    celery -A api.celery_app beat

``bridge.install(app)`` registers ``flush_analytics_events``, routes it to the ``analytics`` queue
(JSON whatever this app's serializer) and adds its beat entry; the ``ANALYTICS_*`` environment
variables say where the events queue and the table are.
"""

from __future__ import annotations

from celery import Celery

import bridge

app = Celery("api", include=["api.tasks"])
app.config_from_object("api.celeryconfig")

# After the app is configured, before anything is sent.
bridge.install(app)
