"""The worker side: a Celery app whose task drains the Redis queue into PostgreSQL.

``celery -A bridge worker -Q analytics`` finds :data:`app` here. It is loaded on first access, so
importing ``bridge.schema`` or ``bridge.drain`` (the CLI, tests) neither reads the worker's
configuration nor builds a Celery app.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery import Celery

    app: Celery

__all__ = ["app"]


def __getattr__(name: str) -> Any:
    if name == "app":
        from .celery_app import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
