"""PostgreSQL writes through asyncpg: COPY into a staging table, then one INSERT ... ON CONFLICT.

COPY is the fastest way in but has no ON CONFLICT, and a plain INSERT of redelivered events would
fail on the unique key. So the rows are COPYed into a temporary staging table and moved with
``INSERT ... SELECT ... ON CONFLICT (event_id, created_at) DO NOTHING``, in one transaction:
redelivered or duplicated events become one row (a redelivered event carries its own created_at, so
it meets its first copy in the same partition). No per-row round trip anywhere.

Before the rows' transaction, :mod:`bridge._session` checks the schema once per connection and makes
the partitions the rows need and lack; if the insert still finds no partition for a row (one was
dropped under this connection), the partitions are made again and the insert runs once more.

The staging table stores ``event_metadata`` and ``ip_address`` as text and the INSERT casts them to
jsonb and inet: the server parses each value exactly once either way, and the client sends plain
strings instead of running asyncpg's per-row inet/jsonb encoders.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import asyncpg

from analytics_sdk._event import FIELDS, Event, metadata_text
from analytics_sdk._settings import Settings

from . import _session
from ._errors import is_connection_error, is_data_error, is_missing_partition
from .partitions import Interval
from .schema import TABLE_NAME, asyncpg_dsn

__all__ = [
    "APPLICATION_NAME",
    "COLUMNS",
    "STAGING_TABLE",
    "InsertResult",
    "close",
    "connect",
    "insert_events",
    "insert_copy_of_newest",
    "record",
    "is_connection_error",
    "is_data_error",
]

logger = logging.getLogger(__name__)

STAGING_TABLE = "analytics_events_staging"
#: How the drain's sessions show in pg_stat_activity (operators and the tests find them by it).
APPLICATION_NAME = "analytics-drain"
_CONNECT_TIMEOUT = 10.0
COLUMNS = FIELDS  # the staging table and the INSERT list take the event's own field order
_CASTS = {"event_metadata": "::jsonb", "ip_address": "::inet"}

# ON COMMIT DELETE ROWS: the table lives as long as the connection and empties itself at each commit
# (a rollback discards the staged rows anyway), so no per-transaction CREATE/DROP churns the catalog.
_CREATE_STAGING = f"""
CREATE TEMPORARY TABLE IF NOT EXISTS {STAGING_TABLE} (
    event_id uuid, event_type text, user_id text, session_id text, entity_type text, entity_id text,
    event_metadata text, ip_address text, user_agent text, referrer text, created_at timestamptz
) ON COMMIT DELETE ROWS
"""
# ORDER BY the unique key: drains inserting overlapping events (a redelivery racing its first
# delivery) take the key's index entries in one order, so they wait for each other instead of
# deadlocking (three overlapping inserts in different orders deadlocked five times in a row in CI).
_INSERT = (
    f"INSERT INTO {TABLE_NAME} ({', '.join(COLUMNS)}) "
    f"SELECT {', '.join(c + _CASTS.get(c, '') for c in COLUMNS)} FROM pg_temp.{STAGING_TABLE} "
    "ORDER BY event_id, created_at ON CONFLICT (event_id, created_at) DO NOTHING"
)

# A neighbour for a row that failed alone: the newest stored row, under a new event_id. Only our own
# columns are copied, so what a later migration added (a column, a default) applies as to our rows.
_COPY_NEWEST = (
    f"INSERT INTO {TABLE_NAME} ({', '.join(COLUMNS)}) "
    f"SELECT {', '.join('$1::uuid' if c == 'event_id' else c for c in COLUMNS)} "
    f"FROM {TABLE_NAME} ORDER BY id DESC LIMIT 1"
)


async def connect(settings: Settings) -> asyncpg.Connection[Any]:
    """The drain's PostgreSQL session (one per drain, closed by :func:`close` in the same loop)."""
    conn = await asyncpg.connect(
        asyncpg_dsn(settings.database_url),
        timeout=_CONNECT_TIMEOUT,
        server_settings={"application_name": APPLICATION_NAME},
        # No statement may hold a batch for ever, even where no hard time limit kills the drain (the
        # CLI's flush, a solo or threads pool): a timeout releases the batch instead.
        command_timeout=max(30.0, settings.analytics_visibility_timeout / 3),
    )
    interval: Interval = settings.analytics_partition_interval  # type: ignore[assignment]  # validated
    _session.session(conn, interval)
    return conn


async def close(conn: asyncpg.Connection[Any]) -> None:
    try:
        await asyncio.wait_for(conn.close(), 5)
    except Exception:  # a broken connection cannot say goodbye: drop the socket
        conn.terminate()


class InsertResult(NamedTuple):
    inserted: int  # new rows
    duplicates: int  # events whose event_id was already in the table (or twice in this call)


def record(event: Event) -> tuple[Any, ...]:
    return (
        event.event_id,
        event.event_type,
        event.user_id,
        event.session_id,
        event.entity_type,
        event.entity_id,
        metadata_text(event),  # the wire's own JSON text when decoded from it: never re-encoded
        event.ip_address,
        event.user_agent,
        event.referrer,
        event.created_at,
    )


async def _load(conn: asyncpg.Connection[Any], records: list[tuple[Any, ...]]) -> int:
    await conn.copy_records_to_table(STAGING_TABLE, records=records, columns=COLUMNS, schema_name="pg_temp")
    status = await conn.execute(_INSERT)
    return int(status.rsplit(" ", 1)[-1])  # "INSERT 0 <rows>"


async def insert_events(
    conn: asyncpg.Connection[Any],
    events: Sequence[Event],
    *,
    before_commit: Callable[[], None] | None = None,
) -> InsertResult:
    """Insert ``events``; one transaction; duplicates (an (event_id, created_at) the table holds, or
    twice in ``events``) are skipped and counted.

    First, outside the rows' transaction: the schema is checked once per connection
    (:class:`bridge._errors.NotMigrated` if it is older than this code) and the partitions the rows
    lack are made (:mod:`bridge._session`).

    Opens its own transaction, and calls ``before_commit()`` (if given) inside it after the rows are
    sent. Called inside the caller's transaction it joins that one instead (the caller commits).
    Raises asyncpg errors unchanged; classify them with :func:`is_data_error` (bisect the batch) and
    :func:`is_connection_error` (retry later).
    """
    if not events:
        return InsertResult(0, 0)
    records = [record(e) for e in events]
    moments = [e.created_at for e in events]
    state = _session.session(conn)
    await _session.prepare(conn, state, moments)
    if conn.is_in_transaction():
        # The staging table may not exist yet, or hold rows of an earlier call in this transaction.
        await conn.execute(f"{_CREATE_STAGING}; DELETE FROM pg_temp.{STAGING_TABLE}")
        inserted = await _load(conn, records)
        if before_commit is not None:
            before_commit()
        return InsertResult(inserted, len(records) - inserted)
    restaged = repartitioned = False
    while True:
        if not state.staged:
            await conn.execute(_CREATE_STAGING)
            state.staged = True
        try:
            async with conn.transaction():
                inserted = await _load(conn, records)
                if before_commit is not None:
                    before_commit()
        except asyncpg.UndefinedTableError:
            # A pool's reset (DISCARD ALL) drops temporary tables behind our back: make it again.
            state.staged = False
            if restaged:
                raise
            restaged = True
            continue
        except asyncpg.CheckViolationError as exc:
            if repartitioned or not is_missing_partition(exc):
                raise
            logger.info("no partition for a row (%s): making the partitions again", exc)
            await _session.refresh(conn, state, moments)
            repartitioned = True
            continue
        return InsertResult(inserted, len(records) - inserted)


async def insert_copy_of_newest(conn: asyncpg.Connection[Any]) -> int:
    """Insert a copy of the newest stored row under a fresh event_id and roll it back: 1 if the table
    takes it, 0 if the table is empty; raises what PostgreSQL refuses (as for the real rows).

    The drain's evidence for a lone row that failed: if a row the table already holds goes in where
    the lone row does not, the lone row is at fault; if it fails the same way, the table is."""
    transaction = conn.transaction()
    await transaction.start()
    try:
        status = await conn.execute(_COPY_NEWEST, str(uuid.uuid4()))
        return int(status.rsplit(" ", 1)[-1])
    finally:
        await transaction.rollback()
