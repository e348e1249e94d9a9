"""Running the revisions programmatically: ``migrate``, ``migrate --sql`` and ``migrate --check``.

The Alembic config is built in code (script location: this package), so users need no alembic.ini.

- :func:`upgrade` creates the database if the server says it does not exist (connecting to the
  ``postgres`` maintenance database), then, under a session advisory lock, adopts a database made by
  a release before versioned migrations (the table present, no version table: stamped ``0001``, the
  baseline, after checking it is our table), upgrades to head and creates the partitions of the
  current and the next two intervals. A second ``migrate`` waits for the lock by polling
  ``pg_try_advisory_lock`` from an idle session: a session *blocked* in ``pg_advisory_lock`` holds
  a snapshot, and CREATE INDEX CONCURRENTLY in the first one would wait for it (a deadlock).
- :func:`offline_sql` writes the SQL of the same revisions without a database (for DBAs).
- :func:`revision_of` reads the database's revision, for ``--check`` and the drain.

Every engine and connection is made and closed inside the coroutine that uses it.
"""

from __future__ import annotations

import asyncio
import io
import logging
from pathlib import Path
from typing import Any

import asyncpg
from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import create_async_engine

from analytics_sdk._settings import redact_url

from .._errors import postgres_error_of
from ..partitions import Interval, create_ahead
from ..schema import TABLE_NAME, asyncpg_dsn, events_table, revision_of, sqlalchemy_url
from . import BASELINE, HEAD, VERSION_TABLE

__all__ = ["MIGRATE_LOCK", "NotOurTable", "offline_sql", "upgrade", "upgrade_to"]

logger = logging.getLogger(__name__)

#: Any constant: serialises concurrent ``migrate`` runs (two deploy jobs, two workers) on one server.
MIGRATE_LOCK = 0x616E616C79746963
_LOCK_POLL = 0.2
# A revision's ACCESS EXCLUSIVE step gives up after its lock_timeout (55P03) rather than stall every
# insert queued behind it; the whole run is tried again (each step is idempotent).
_LOCK_ATTEMPTS = 12
_LOCK_PAUSE = 5.0


class NotOurTable(RuntimeError):
    """A table named analytics_events that no release of the bridge made: never adopted."""


def _config(interval: Interval, *, connection: Connection | None = None, output: Any = None) -> Config:
    config = Config(output_buffer=output) if output is not None else Config()
    config.set_main_option("script_location", str(Path(__file__).parent).replace("%", "%%"))
    config.attributes["partition_interval"] = interval
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def offline_sql(interval: Interval, *, start: str | None = None) -> str:
    """The SQL that upgrades a database from ``start`` (None: an empty database) to head.

    From ``0001`` (a database made by a release before versioned migrations) it starts by creating
    the version table and stamping the baseline, as :func:`upgrade` does when it adopts one."""
    out = io.StringIO()
    config = _config(interval, output=out)
    if start is None:
        command.upgrade(config, "head", sql=True)
    else:
        command.stamp(config, start, sql=True)
        command.upgrade(config, f"{start}:head", sql=True)
    return out.getvalue()


def _adopt(conn: Connection, interval: Interval) -> None:
    """Stamp a database the previous releases made (our table, no version table) as the baseline."""
    found = conn.execute(
        text(
            "SELECT c.relkind::text, array(SELECT attname FROM pg_attribute WHERE attrelid = c.oid "
            "AND attnum > 0 AND NOT attisdropped) FROM pg_class c WHERE c.oid = to_regclass(:t)"
        ),
        {"t": TABLE_NAME},
    ).first()
    versioned = conn.execute(text("SELECT to_regclass(:t) IS NOT NULL"), {"t": VERSION_TABLE}).scalar()
    if versioned:  # a version table without its row (emptied by hand) stamps nothing: adopt again
        versioned = conn.execute(text(f"SELECT EXISTS (SELECT 1 FROM {VERSION_TABLE})")).scalar()
    conn.commit()
    if found is None or versioned:
        return
    missing = [c.name for c in events_table.columns if c.name not in set(found[1])]
    if missing:
        raise NotOurTable(
            f"table {TABLE_NAME} exists but lacks column(s) {', '.join(missing)}: it was not made by the "
            "bridge. Rename it, or point ANALYTICS_DATABASE_URL at another database"
        )
    revision = HEAD if found[0] == "p" else BASELINE  # "p": partitioned (a --sql run, not stamped)
    logger.info("adopting %s made by an earlier release: stamping revision %s", TABLE_NAME, revision)
    command.stamp(_config(interval, connection=conn), revision)
    conn.commit()


def _upgrade(conn: Connection, interval: Interval) -> None:
    _adopt(conn, interval)
    command.upgrade(_config(interval, connection=conn), "head")
    conn.commit()


async def _connect_or_create(url: URL) -> asyncpg.Connection[Any]:
    dsn = asyncpg_dsn(url.render_as_string(hide_password=False))
    try:
        return await asyncpg.connect(dsn, timeout=10)
    except asyncpg.InvalidCatalogNameError:
        await _create_database(url)
        return await asyncpg.connect(dsn, timeout=10)


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def _create_database(url: URL) -> None:
    """CREATE DATABASE ``url.database``, connected to the maintenance database of the same server."""
    name = url.database
    if not name:
        raise ValueError("the database URL names no database")
    admin = await asyncpg.connect(
        asyncpg_dsn(url.set(database="postgres").render_as_string(hide_password=False)), timeout=10
    )
    try:
        exists = "SELECT 1 FROM pg_database WHERE datname = $1"
        if not await admin.fetchval(exists, name):
            try:
                await admin.execute(f"CREATE DATABASE {_quote_ident(name)}")
                logger.info("created database %s", name)
            except asyncpg.PostgresError:
                # A concurrent migrate may have created it first ("already exists", or a unique
                # violation on pg_database when both passed the check at once): that is success.
                if not await admin.fetchval(exists, name):
                    raise
    finally:
        await admin.close()


async def _lock(conn: asyncpg.Connection[Any]) -> None:
    waiting = False
    while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", MIGRATE_LOCK):
        if not waiting:
            logger.info("another migrate is running on this server: waiting for it to finish")
            waiting = True
        await asyncio.sleep(_LOCK_POLL)


async def _run_revisions(url: URL, interval: Interval) -> None:
    engine = create_async_engine(url)
    try:
        for attempt in range(1, _LOCK_ATTEMPTS + 1):
            try:
                async with engine.connect() as conn:
                    await conn.run_sync(_upgrade, interval)
                return
            except Exception as exc:
                timed_out = isinstance(postgres_error_of(exc), asyncpg.LockNotAvailableError)
                if not timed_out or attempt == _LOCK_ATTEMPTS:
                    raise
                logger.warning(
                    "migrate waited too long for a lock on %s (a long transaction holds it; attempt "
                    "%s of %s): trying again in %.0f s",
                    TABLE_NAME,
                    attempt,
                    _LOCK_ATTEMPTS,
                    _LOCK_PAUSE,
                )
                await asyncio.sleep(_LOCK_PAUSE)
    finally:
        await engine.dispose()


async def upgrade(database_url: str, *, interval: Interval = "month") -> list[str]:
    """Create the database if missing, adopt, upgrade to head, create partitions ahead. Idempotent;
    returns the names of the partitions it created."""
    url = make_url(sqlalchemy_url(database_url))
    lock = await _connect_or_create(url)
    try:
        await _lock(lock)
        await _run_revisions(url, interval)
        made = await create_ahead(lock, interval)
        logger.info("schema of %s is at revision %s", redact_url(database_url), await revision_of(lock))
        return made
    finally:
        try:
            await lock.execute("SELECT pg_advisory_unlock($1)", MIGRATE_LOCK)
        finally:
            await lock.close()


async def upgrade_to(database_url: str, revision: str, *, interval: Interval = "month") -> None:
    """Run the revisions up to ``revision`` only: no lock, no adoption, no partitions. How tests and
    the upgrade benchmark make the state an older release left."""

    def run(conn: Connection) -> None:
        command.upgrade(_config(interval, connection=conn), revision)
        conn.commit()

    engine = create_async_engine(make_url(sqlalchemy_url(database_url)))
    try:
        async with engine.connect() as conn:
            await conn.run_sync(run)
    finally:
        await engine.dispose()
