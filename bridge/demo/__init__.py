"""The demo of ``nox -s demo`` (``python -m bridge.demo``, ``analytics-bridge demo``): a real worker,
simulated users, and a summary read back from PostgreSQL. ``_main`` runs it, ``_worker`` starts and
stops the Celery worker, ``_site`` simulates the users and reads the results."""

from __future__ import annotations

from ._main import main

__all__ = ["main"]
