"""The events table at head, defined once in SQLAlchemy Core; ``migrate()``; the checks of a database.

The table's history lives in Alembic revisions shipped in :mod:`bridge.migrations`; ``metadata`` is
what the newest one makes (a test compares a migrated database with it). ``analytics_events`` is
partitioned by RANGE on ``created_at`` (:mod:`bridge.partitions` creates the partitions), so its keys
include ``created_at``: the primary key is ``(id, created_at)`` and the arbiter of the drain's
``ON CONFLICT`` is ``(event_id, created_at)`` -- a redelivered event carries its own created_at, so
it is still one row.

:func:`schema_problem` tells the worker, ``flush`` and the drain what keeps them from writing:
a missing table or column, or a revision older than the code's (run ``analytics-bridge migrate``).
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from sqlalchemy import (
    BigInteger,
    Column,
    Identity,
    Index,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import INET, JSONB, TIMESTAMP, UUID

from analytics_sdk._settings import redact_url

from .migrations import HEAD, REVISIONS, VERSION_TABLE
from .partitions import Interval

__all__ = [
    "EVENT_KEY",
    "TABLE_NAME",
    "asyncpg_dsn",
    "events_table",
    "metadata",
    "migrate",
    "revision_of",
    "revision_problem",
    "schema_problem",
    "sqlalchemy_url",
]

logger = logging.getLogger(__name__)

TABLE_NAME = "analytics_events"
#: The arbiter of INSERT ... ON CONFLICT (event_id, created_at): one row per event.
EVENT_KEY = f"uq_{TABLE_NAME}_event_id_created_at"

metadata = MetaData()

events_table = Table(
    TABLE_NAME,
    metadata,
    Column("id", BigInteger, Identity(always=False), nullable=False),
    Column("event_id", UUID(as_uuid=False), nullable=False),
    Column("user_id", Text),
    Column("session_id", Text),
    Column("event_type", Text, nullable=False),
    Column("entity_type", Text),
    Column("entity_id", Text),
    Column("event_metadata", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("ip_address", INET),
    Column("user_agent", Text),
    Column("referrer", Text),
    Column("created_at", TIMESTAMP(timezone=True), nullable=False),
    Column("received_at", TIMESTAMP(timezone=True), nullable=False, server_default=func.now()),
    # A partitioned table's keys must include its partition key.
    PrimaryKeyConstraint("id", "created_at", name=f"{TABLE_NAME}_pkey"),
    UniqueConstraint("event_id", "created_at", name=EVENT_KEY),
    Index(f"ix_{TABLE_NAME}_event_type_created_at", "event_type", "created_at"),
    Index(f"ix_{TABLE_NAME}_user_id_created_at", "user_id", "created_at"),
    postgresql_partition_by="RANGE (created_at)",
)


def sqlalchemy_url(url: str) -> str:
    """``postgresql://...`` (or ``postgres://``, ``postgresql+asyncpg://``) as SQLAlchemy's asyncpg URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres", "postgresql+asyncpg"):
        raise ValueError(f"not a PostgreSQL URL: {redact_url(url)}")
    return urlunsplit(parts._replace(scheme="postgresql+asyncpg"))


def asyncpg_dsn(url: str) -> str:
    """Any of the forms above as the plain ``postgresql://`` DSN asyncpg.connect() takes."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres", "postgresql+asyncpg"):
        raise ValueError(f"not a PostgreSQL URL: {redact_url(url)}")
    return urlunsplit(parts._replace(scheme="postgresql"))


async def migrate(database_url: str, *, interval: Interval = "month") -> list[str]:
    """Create the database (if missing and allowed), adopt a database an earlier release made, run
    every revision up to head, create the partitions ahead. Idempotent; returns the partitions made.

    ``interval`` is the width of the partitions this run creates (ANALYTICS_PARTITION_INTERVAL); the
    partitioned table itself does not depend on it."""
    from .migrations._run import upgrade  # Alembic is imported only by those who migrate

    return await upgrade(database_url, interval=interval)


async def revision_of(conn: asyncpg.Connection[Any]) -> str | None:
    """The database's revision in our version table; None when there is none (not versioned yet)."""
    if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", VERSION_TABLE):
        return None
    version = await conn.fetchval(f"SELECT version_num FROM {VERSION_TABLE}")
    return None if version is None else str(version)


async def revision_problem(conn: asyncpg.Connection[Any]) -> str | None:
    """Why the table is older than this code expects, or None (at head, or a revision this code does
    not know: a newer release migrated it, and revisions only add what older drains can ignore)."""
    version = await revision_of(conn)
    if version == HEAD or (version is not None and version not in REVISIONS):
        return None
    at = f"revision {version}" if version else "the schema of a release before versioned migrations"
    return (
        f"table {TABLE_NAME} is at {at}, this bridge needs revision {HEAD}: run `analytics-bridge "
        "migrate` against this database (the held events land at the first drain after it)"
    )


async def schema_problem(conn: asyncpg.Connection[Any]) -> str | None:
    """What keeps the drain from writing to this database (table or columns missing, a revision older
    than this code's), or None."""
    found = await conn.fetch(
        "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass($1) AND attnum > 0 "
        "AND NOT attisdropped",
        TABLE_NAME,
    )
    if not found:
        return f"table {TABLE_NAME} does not exist: run `analytics-bridge migrate` against this database"
    missing = [c.name for c in events_table.columns if c.name not in {r["attname"] for r in found}]
    if missing:
        return (
            f"table {TABLE_NAME} lacks column(s) {', '.join(missing)}: run `analytics-bridge migrate`, "
            "compare the table with bridge/schema.py"
        )
    return await revision_problem(conn)
