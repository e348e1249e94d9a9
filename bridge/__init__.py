"""The worker side: a Celery task that drains the Redis queue into PostgreSQL.

- ``celery -A bridge worker -Q analytics`` finds :data:`app` here: the bridge's own Celery app, for
  teams without one.
- ``bridge.install(app)`` puts the same task (its route, its beat entry, its start-up checks) on an
  application's existing Celery app (:mod:`bridge._install`).

Both are loaded on first access, so importing ``bridge.schema`` or ``bridge.drain`` (the CLI, tests)
neither reads the worker's configuration nor builds a Celery app.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery import Celery

    from ._install import install

    app: Celery

__all__ = ["app", "install"]


def __getattr__(name: str) -> Any:
    if name == "app":
        from .celery_app import app

        return app
    if name == "install":
        from ._install import install

        return install
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
