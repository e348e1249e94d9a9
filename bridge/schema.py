"""The events table, defined once in SQLAlchemy Core, and an idempotent ``migrate()``.

``migrate()`` runs through SQLAlchemy's async engine on asyncpg. It creates the database named in the
URL when the server says it does not exist (connecting to the ``postgres`` maintenance database for
``CREATE DATABASE``), then creates the table and its indexes if missing. Every engine is made and
disposed inside the coroutine: none outlives the event loop that made it.
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
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import INET, JSONB, TIMESTAMP, UUID
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from analytics_sdk._settings import redact_url

__all__ = [
    "TABLE_NAME",
    "asyncpg_dsn",
    "events_table",
    "metadata",
    "migrate",
    "schema_problem",
    "sqlalchemy_url",
]

logger = logging.getLogger(__name__)

TABLE_NAME = "analytics_events"
# Any constant: serialises concurrent migrate() calls (two workers starting at once) on one server.
_MIGRATE_LOCK = 0x616E616C79746963

metadata = MetaData()

events_table = Table(
    TABLE_NAME,
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
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
    # The arbiter of INSERT ... ON CONFLICT (event_id): one row per event, however often delivered.
    UniqueConstraint("event_id", name=f"uq_{TABLE_NAME}_event_id"),
    Index(f"ix_{TABLE_NAME}_event_type_created_at", "event_type", "created_at"),
    Index(f"ix_{TABLE_NAME}_user_id_created_at", "user_id", "created_at"),
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


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def _create_database(url: URL) -> None:
    """CREATE DATABASE ``url.database``, connected to the maintenance database of the same server."""
    name = url.database
    if not name:
        raise ValueError("the database URL names no database")
    admin = create_async_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            exists = text("SELECT 1 FROM pg_database WHERE datname = :n")
            if not await conn.scalar(exists, {"n": name}):
                try:
                    await conn.execute(text(f"CREATE DATABASE {_quote_ident(name)}"))
                    logger.info("created database %s", name)
                except Exception:
                    # A concurrent migrate() may have created it first ("already exists", or a unique
                    # violation on pg_database when both passed the check at once): that is success.
                    if not await conn.scalar(exists, {"n": name}):
                        raise
    finally:
        await admin.dispose()


async def _create_schema(conn: AsyncConnection) -> None:
    # A transaction-scoped advisory lock: a second migrate() waits, then finds everything in place
    # (create_all's check-then-create is otherwise racy and fails on pg_type's unique index).
    await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATE_LOCK})
    await conn.run_sync(metadata.create_all, checkfirst=True)


async def migrate(database_url: str) -> None:
    """Create the database (if missing and allowed), the events table and its indexes. Idempotent."""
    url = make_url(sqlalchemy_url(database_url))
    engine = create_async_engine(url)
    try:
        try:
            async with engine.begin() as conn:
                await _create_schema(conn)
        except Exception as exc:
            if not _is_missing_database(exc):
                raise
            await engine.dispose()
            await _create_database(url)
            async with engine.begin() as conn:
                await _create_schema(conn)
        logger.info("schema of %s is up to date", redact_url(database_url))
    finally:
        await engine.dispose()


def _is_missing_database(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(5):  # SQLAlchemy wraps the driver's error: look a few links down the chain
        if seen is None:
            break
        if isinstance(seen, asyncpg.InvalidCatalogNameError):
            return True
        seen = seen.__cause__ or getattr(seen, "orig", None)
    return False


async def schema_problem(conn: asyncpg.Connection[Any]) -> str | None:
    """What keeps the drain from writing to this database (table or columns missing), or None."""
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
    return None
