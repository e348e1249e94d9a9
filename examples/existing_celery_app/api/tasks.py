"""The application's own task: "sends" a welcome email and leaves a marker in Redis.

The marker (``api:welcome:<user_id>``, in the Redis at ``API_REDIS_URL``, by default the broker) is
there so a test, or you, can see the task ran.
"""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime

import redis

from .celery_app import app

logger = logging.getLogger(__name__)


@app.task
def send_welcome_email(user_id: str) -> None:
    logger.info("welcome email to user %s", user_id)
    url = os.environ.get("API_REDIS_URL") or app.conf.broker_url
    # A client per call, closed at once: nothing made at import crosses the prefork pool's fork.
    with redis.Redis.from_url(url) as client:
        client.set(f"api:welcome:{user_id}", datetime.now(UTC).isoformat())
