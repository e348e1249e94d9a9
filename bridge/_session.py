"""What :mod:`bridge.store` knows about one PostgreSQL connection, so it asks the server only once.

- **The schema**: the first insert on a connection checks the table's revision; one older than this
  code's (a worker deployed before ``analytics-bridge migrate`` ran) raises
  :class:`bridge._errors.NotMigrated`, an environment refusal: the events stay in flight, nothing is
  dead-lettered, the ERROR line says to run migrate, and the first drain after it lands them. A
  missing table is left to the insert, whose 42P01 says the same.
- **The partitions**: the ranges of the existing partitions are read once per connection. A row whose
  created_at falls outside all of them (a backfill from two years ago, the first event of a new month
  before the daily maintenance made its partition) gets its partition made by
  :func:`bridge.partitions.ensure_partitions` before the COPY, in a transaction of its own, so the
  DDL never rolls back with the rows. The common batch costs a few comparisons per row and no query.
  A partition dropped under a long-lived connection (retention) shows up as "no partition of relation
  found for row": :func:`refresh` forgets what this connection knew and makes the partitions again.
- **The staging table**: whether this connection's temporary table exists (a pool's DISCARD ALL
  drops it behind our back: the store then makes it again).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from ._errors import NotMigrated
from .partitions import Interval, _existing, ensure_partitions
from .schema import TABLE_NAME, revision_problem

__all__ = ["Session", "prepare", "refresh", "session"]

_EARLIEST = datetime.min.replace(tzinfo=UTC)
_LATEST = datetime.max.replace(tzinfo=UTC)


@dataclass
class Session:
    interval: Interval = "month"
    staged: bool = False
    checked: bool = False
    ranges: list[tuple[datetime, datetime]] | None = None  # None: not read yet
    hit: tuple[datetime, datetime] = (_LATEST, _LATEST)  # the range the last row fell in


_sessions: weakref.WeakKeyDictionary[asyncpg.Connection[Any], Session] = weakref.WeakKeyDictionary()


def session(conn: asyncpg.Connection[Any], interval: Interval | None = None) -> Session:
    """This connection's state; ``interval`` (the drain's ANALYTICS_PARTITION_INTERVAL) is recorded
    when given, else the state keeps what it had (``month`` for a connection the drain did not make)."""
    state = _sessions.get(conn)
    if state is None:
        state = _sessions[conn] = Session()
    if interval is not None:
        state.interval = interval
    return state


def _utc(moment: datetime) -> datetime:
    # A naive created_at is stored as UTC (asyncpg sends it so): compare it as UTC too.
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _outside(state: Session, moments: Iterable[datetime]) -> list[datetime]:
    """The moments no known partition holds (rows mostly share a range: try the last hit first)."""
    ranges = state.ranges or []
    hit = state.hit
    missing: list[datetime] = []
    for moment in map(_utc, moments):
        if hit[0] <= moment < hit[1]:
            continue
        for candidate in ranges:
            if candidate[0] <= moment < candidate[1]:
                hit = candidate
                break
        else:
            missing.append(moment)
    state.hit = hit
    return missing


async def _read(conn: asyncpg.Connection[Any], state: Session) -> None:
    async with conn.transaction():
        # bounds print in the session's time zone: UTC makes them parse the same anywhere
        await conn.execute("SET LOCAL TimeZone = 'UTC'")
        found = await _existing(conn, TABLE_NAME)
        kind = await conn.fetchval(
            "SELECT relkind::text FROM pg_class WHERE oid = to_regclass($1)", TABLE_NAME
        )
    # A plain table (relkind r: a heap a DBA made, the benchmark's baseline) takes every created_at
    state.ranges = (
        [(_EARLIEST, _LATEST)] if kind == "r" else [(lo or _EARLIEST, hi or _LATEST) for lo, hi in found]
    )
    state.hit = (_LATEST, _LATEST)


async def prepare(conn: asyncpg.Connection[Any], state: Session, moments: Sequence[datetime]) -> None:
    """Before rows created at ``moments`` are inserted: the schema is current (else
    :class:`NotMigrated`), and every moment has a partition (made here if missing)."""
    if not state.checked:
        if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", TABLE_NAME):
            problem = await revision_problem(conn)
            if problem is not None:
                raise NotMigrated(problem)
        state.checked = True
    if state.ranges is None:
        await _read(conn, state)
    missing = _outside(state, moments)
    if missing:
        await ensure_partitions(conn, state.interval, missing, table=TABLE_NAME)
        await _read(conn, state)


async def refresh(conn: asyncpg.Connection[Any], state: Session, moments: Sequence[datetime]) -> None:
    """After "no partition of relation found for row": forget the known ranges, make what is missing."""
    state.ranges = None
    state.hit = (_LATEST, _LATEST)
    await ensure_partitions(conn, state.interval, [_utc(m) for m in moments], table=TABLE_NAME)
    await _read(conn, state)
