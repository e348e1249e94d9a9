"""Time partitions of ``analytics_events``: interval arithmetic and creating the ones that are missing.

The table is partitioned by RANGE on ``created_at``, one partition per interval (``month``, ``week`` or
``day``, ``ANALYTICS_PARTITION_INTERVAL``), every bound at midnight UTC (weeks start on Monday, as ISO
weeks do). A partition is named after its lower bound, ``analytics_events_p20261101``, whatever the
interval: names sort by time, and a change of interval never reuses a name for a different range.

:func:`ensure_partitions` is safe to call from many drains at once (one advisory lock per table
serialises the DDL) and after the interval setting changed: a time that an existing partition already
covers, of whatever width, is left to that partition, and a new partition is clipped so it never
overlaps one (the legacy heap attached up to a cut-over in mid-interval, a day inside an old month).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, get_args

import asyncpg

__all__ = [
    "INTERVALS",
    "PARENT_TABLE",
    "Interval",
    "bounds",
    "create_ahead",
    "ensure_partitions",
    "missing_ahead",
    "parse_bound",
    "partition_name",
]

logger = logging.getLogger(__name__)

Interval = Literal["month", "week", "day"]
INTERVALS: tuple[str, ...] = get_args(Interval)
PARENT_TABLE = "analytics_events"
# Any constant distinct from the migration's lock: serialises partition DDL across drains and beat.
_PARTITION_LOCK = 0x616E616C70617274


def bounds(moment: datetime, interval: Interval) -> tuple[datetime, datetime]:
    """The ``[lower, upper)`` range of the interval holding ``moment`` (UTC midnights)."""
    if moment.tzinfo is None:
        raise ValueError(f"created_at {moment!r} has no time zone")
    day = moment.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if interval == "day":
        return day, day + timedelta(days=1)
    if interval == "week":
        lower = day - timedelta(days=day.weekday())
        return lower, lower + timedelta(days=7)
    if interval == "month":
        lower = day.replace(day=1)
        upper = (
            lower.replace(year=lower.year + 1, month=1)
            if lower.month == 12
            else lower.replace(month=lower.month + 1)
        )
        return lower, upper
    raise ValueError(f"partition interval {interval!r}: choose one of {', '.join(INTERVALS)}")


def partition_name(lower: datetime, table: str = PARENT_TABLE) -> str:
    return f"{table}_p{lower:%Y%m%d}"


async def _existing(
    conn: asyncpg.Connection[Any], table: str
) -> list[tuple[datetime | None, datetime | None]]:
    """The ``[lower, upper)`` of every partition of ``table``, whatever width it was made with."""
    # pg_get_expr prints the bound as PostgreSQL sees it: independent of the interval the partition was
    # made with (the setting may have changed since) and of the legacy heap's open-ended range.
    rows = await conn.fetch(
        """
        SELECT pg_get_expr(c.relpartbound, c.oid) AS bound
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = to_regclass($1)
        """,
        table,
    )
    # pg_get_expr answers NULL for a partition dropped since this statement's snapshot (the retention
    # dropping it right now): it no longer takes rows, so it is no range of ours
    return [_parse_bound(row["bound"]) for row in rows if row["bound"] is not None]


def _free_range(
    moment: datetime, interval: Interval, existing: list[tuple[datetime | None, datetime | None]]
) -> tuple[datetime, datetime] | None:
    """The interval holding ``moment``, clipped so it overlaps no existing partition; None if one
    already takes ``moment``."""
    lower, upper = bounds(moment, interval)
    for lo, hi in existing:
        if (lo is None or lo <= moment) and (hi is None or moment < hi):
            return None
        if hi is not None and lower < hi <= moment:
            lower = hi
        if lo is not None and moment < lo < upper:
            upper = lo
    return lower, upper


def _parse_bound(bound: str) -> tuple[datetime | None, datetime | None]:
    """``FOR VALUES FROM ('2026-11-01 00:00:00+00') TO (MAXVALUE)`` -> (lower, upper); None = unbounded."""
    if bound == "DEFAULT":
        return None, None
    from_part, to_part = bound.removeprefix("FOR VALUES FROM (").split(") TO (")
    return _parse_value(from_part), _parse_value(to_part.removesuffix(")"))


#: Public name of the bound parser, for the maintenance's listing of partitions.
parse_bound = _parse_bound


def _parse_value(value: str) -> datetime | None:
    if value in ("MINVALUE", "MAXVALUE"):
        return None
    return datetime.fromisoformat(value.strip("'"))


async def ensure_partitions(
    conn: asyncpg.Connection[Any],
    interval: Interval,
    moments: Iterable[datetime],
    *,
    table: str = PARENT_TABLE,
) -> list[str]:
    """Create the partitions that rows created at ``moments`` need and lack; return the names made.

    Runs in its own transaction (the caller must not be in one): partition DDL must not roll back
    with a batch of rows that failed for another reason.
    """
    wanted = sorted(set(moments))
    made: list[str] = []
    if not wanted:
        return made
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _PARTITION_LOCK)
        # pg_get_expr prints bounds in the session's time zone: UTC makes them parse the same anywhere
        await conn.execute("SET LOCAL TimeZone = 'UTC'")
        existing = await _existing(conn, table)
        for moment in wanted:
            free = _free_range(moment, interval, existing)
            if free is None:
                continue
            lower, upper = free
            name = partition_name(lower, table)
            # Not CREATE TABLE ... PARTITION OF: that takes ACCESS EXCLUSIVE on the parent (PostgreSQL
            # 15), so a drain making a backfill's partition would wait for every running report query
            # and stall every insert queued behind it. ATTACH takes SHARE UPDATE EXCLUSIVE, which
            # neither reads nor writes conflict with; the empty table is checked and indexed at once.
            await conn.execute(f'CREATE TABLE "{name}" (LIKE "{table}" INCLUDING DEFAULTS)')
            await conn.execute(
                f'ALTER TABLE "{table}" ATTACH PARTITION "{name}" FOR VALUES FROM '
                f"('{lower.isoformat()}') TO ('{upper.isoformat()}')"
            )
            existing.append((lower, upper))
            made.append(name)
    for name in made:
        logger.info("created partition %s", name)
    return made


def _ahead(now: datetime | None, interval: Interval, ahead: int) -> list[datetime]:
    """``now`` and a moment in each of the ``ahead`` intervals after it."""
    moment = now or datetime.now(UTC)
    moments = [moment]
    for _ in range(ahead):
        moment = bounds(moment, interval)[1]
        moments.append(moment)
    return moments


async def create_ahead(
    conn: asyncpg.Connection[Any],
    interval: Interval,
    *,
    now: datetime | None = None,
    ahead: int = 2,
    table: str = PARENT_TABLE,
) -> list[str]:
    """Make sure the current interval and the next ``ahead`` ones have partitions."""
    return await ensure_partitions(conn, interval, _ahead(now, interval, ahead), table=table)


async def missing_ahead(
    conn: asyncpg.Connection[Any],
    interval: Interval,
    *,
    now: datetime | None = None,
    ahead: int = 2,
    table: str = PARENT_TABLE,
) -> list[tuple[str, datetime, datetime]]:
    """What :func:`create_ahead` would create now, as (name, lower, upper); creates nothing."""
    missing: list[tuple[str, datetime, datetime]] = []
    async with conn.transaction():
        await conn.execute("SET LOCAL TimeZone = 'UTC'")
        existing = await _existing(conn, table)
    for moment in _ahead(now, interval, ahead):
        free = _free_range(moment, interval, existing)
        if free is not None:
            existing.append(free)
            missing.append((partition_name(free[0], table), *free))
    return missing
