"""The history of the events table: Alembic revisions shipped inside the package.

``analytics-bridge migrate`` runs them programmatically (:mod:`bridge.migrations._run`, no
``alembic.ini``); this module holds only what the drain needs to know without importing Alembic:
the revisions in order and the name of our own version table. An application's Alembic history on
the same database lives in its ``alembic_version`` table, which we never read or write.

- ``0001`` the baseline: the heap every release before partitioning created (a database made by
  such a release is adopted: stamped ``0001``, then upgraded).
- ``0002`` ``analytics_events`` partitioned by RANGE on ``created_at``; the old heap, if it holds
  rows, becomes the partition ``analytics_events_legacy`` covering everything before a cut-over.
"""

from __future__ import annotations

__all__ = ["BASELINE", "HEAD", "REVISIONS", "VERSION_TABLE"]

#: Every revision, oldest first (a test checks this against the scripts in versions/).
REVISIONS: tuple[str, ...] = ("0001", "0002")
BASELINE = REVISIONS[0]
HEAD = REVISIONS[-1]
#: Ours, not ``alembic_version``: an application's own Alembic history stays untouched.
VERSION_TABLE = "analytics_alembic_version"
