"""The daily partition maintenance: create partitions ahead, drop those wholly past the retention.

:func:`maintain` (the Celery task ``analytics.maintain_partitions`` and ``analytics-bridge partitions
maintain`` both run it) does, in this order:

1. finishes what a crashed run left: a table it had detached but not dropped yet is dropped; a
   detach left pending (``DETACH ... CONCURRENTLY`` interrupted between its two transactions) is
   completed with ``DETACH ... FINALIZE``. PostgreSQL refuses every other concurrent detach on the
   table while one is pending, so a pending detach that is not ours is finalized too, but its table
   is left in place (whoever detached it wanted it kept, e.g. to archive it);
2. creates the partitions of the current interval and the next two (:func:`bridge.partitions.create_ahead`);
3. when ``ANALYTICS_RETENTION_DAYS`` > 0, detaches and drops every partition whose *whole* range ends
   at or before ``now - retention``: a partition with an unbounded upper end, or one ending after the
   cutoff, may hold newer rows and is kept (the legacy heap, ``FROM (MINVALUE) TO (cut-over)``, goes
   once the cut-over itself is past the cutoff). Each dropped partition is logged with its range,
   estimated rows and size.

Dropping a whole partition costs no DELETE, no bloat and no vacuum. ``DETACH ... CONCURRENTLY`` takes
only a SHARE UPDATE EXCLUSIVE lock on the parent, which does not conflict with the drains' inserts,
and it cannot run in a transaction block: the connection here stays in autocommit between statements.
Before detaching, a partition is marked with a table comment (:data:`MARKER`), so that step 1 of the
next run knows which detached tables are ours to drop. One run at a time per database (a session
advisory lock); a second one reports that it skipped.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import asyncpg

from analytics_sdk._settings import Settings

from ._errors import NotMigrated
from .partitions import PARENT_TABLE, Interval, create_ahead, missing_ahead, parse_bound
from .schema import asyncpg_dsn

__all__ = [
    "MARKER",
    "MaintenanceReport",
    "Partition",
    "check_partitioned",
    "cutoff_for",
    "expired",
    "list_partitions",
    "maintain",
    "maintain_on",
]

logger = logging.getLogger(__name__)

#: The comment put on a partition about to be detached and dropped by the retention.
MARKER = "analytics retention: detaching to drop"
# Distinct from the partition-creation and migration locks: only maintenance runs exclude each other.
_MAINTENANCE_LOCK = 0x616E616C6D61696E


@dataclass(frozen=True, slots=True)
class Partition:
    """One partition of the events table, as the catalog sees it."""

    name: str
    lower: datetime | None  # None: MINVALUE (the legacy heap) or a DEFAULT partition
    upper: datetime | None  # None: MAXVALUE or DEFAULT
    rows: int | None  # pg_class.reltuples, an estimate; None until the table was first analysed
    bytes: int  # pg_total_relation_size: heap, indexes and TOAST
    detach_pending: bool
    marked: bool  # carries MARKER: a retention run started to detach it

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("lower", "upper"):
            data[key] = data[key].isoformat() if data[key] is not None else None
        return data

    @property
    def range(self) -> str:
        lower = self.lower.isoformat() if self.lower else "MINVALUE"
        upper = self.upper.isoformat() if self.upper else "MAXVALUE"
        return f"[{lower}, {upper})"


@dataclass(slots=True)
class MaintenanceReport:
    """What a run did (or, with ``dry_run``, would do)."""

    dry_run: bool
    cutoff: datetime | None  # None: retention off
    created: list[str] = field(default_factory=list)
    finalized: list[str] = field(default_factory=list)  # pending detaches completed
    dropped: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # partitions left in place
    failed: dict[str, str] = field(default_factory=dict)  # partition -> error
    skipped: str | None = None  # why nothing ran (another run holds the lock)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["cutoff"] = self.cutoff.isoformat() if self.cutoff else None
        return data


async def list_partitions(conn: asyncpg.Connection[Any], table: str = PARENT_TABLE) -> list[Partition]:
    """The partitions of ``table``, oldest first (the unbounded-below ones first)."""
    async with conn.transaction():
        # pg_get_expr prints bounds in the session's time zone: UTC makes them parse the same anywhere
        await conn.execute("SET LOCAL TimeZone = 'UTC'")
        rows = await conn.fetch(
            """
            SELECT c.relname AS name, pg_get_expr(c.relpartbound, c.oid) AS bound,
                   c.reltuples, pg_total_relation_size(c.oid) AS bytes,
                   i.inhdetachpending AS pending,
                   coalesce(obj_description(c.oid, 'pg_class') = $2, false) AS marked
            FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = to_regclass($1)
            """,
            table,
            MARKER,
        )
    found = []
    for row in rows:
        if row["bound"] is None:  # dropped since this statement's snapshot (a concurrent maintenance)
            continue
        lower, upper = parse_bound(row["bound"])
        rows_estimate = int(row["reltuples"]) if row["reltuples"] >= 0 else None
        found.append(
            Partition(row["name"], lower, upper, rows_estimate, row["bytes"], row["pending"], row["marked"])
        )
    oldest = datetime.min.replace(tzinfo=UTC)
    return sorted(found, key=lambda p: (p.lower or oldest, p.name))


def cutoff_for(now: datetime, retention_days: int) -> datetime | None:
    """Rows created before this are past the retention; None when the retention is off (0)."""
    return now - timedelta(days=retention_days) if retention_days > 0 else None


def expired(partitions: list[Partition], cutoff: datetime) -> list[Partition]:
    """The partitions whose whole range lies before ``cutoff``: an unbounded upper end never does."""
    return [p for p in partitions if p.upper is not None and p.upper <= cutoff]


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def check_partitioned(conn: asyncpg.Connection[Any], table: str = PARENT_TABLE) -> None:
    """Raise :class:`~bridge._errors.NotMigrated` unless ``table`` exists and is partitioned."""
    kind = await conn.fetchval("SELECT relkind::text FROM pg_class WHERE oid = to_regclass($1)", table)
    if kind != "p":
        what = "does not exist" if kind is None else "is not partitioned yet"
        raise NotMigrated(f"table {table} {what}: run `analytics-bridge migrate` against this database")


async def _leftovers(conn: asyncpg.Connection[Any]) -> list[str]:
    """Tables a crashed run detached (they carry MARKER) but did not drop."""
    rows = await conn.fetch(
        "SELECT relname FROM pg_class WHERE relkind = 'r' AND NOT relispartition "
        "AND obj_description(oid, 'pg_class') = $1 AND relnamespace = current_schema()::regnamespace",
        MARKER,
    )
    return sorted(r["relname"] for r in rows)


def _describe(p: Partition) -> str:
    rows = "?" if p.rows is None else f"~{p.rows:,}"
    return f"{p.name} {p.range}, {rows} rows, {p.bytes:,} bytes"


async def _finish_crashed(
    conn: asyncpg.Connection[Any], table: str, partitions: list[Partition], report: MaintenanceReport
) -> list[Partition]:
    """Step 1: drop what a crashed run detached, finalize pending detaches; return the rest."""
    for name in await _leftovers(conn):
        if not report.dry_run:
            await conn.execute(f"DROP TABLE {_quote(name)}")
            logger.info("dropped table %s, detached by an earlier maintenance run that stopped", name)
        report.dropped.append(name)
    rest = []
    for p in partitions:
        if not p.detach_pending:
            rest.append(p)
            continue
        if not report.dry_run:
            await conn.execute(f"ALTER TABLE {_quote(table)} DETACH PARTITION {_quote(p.name)} FINALIZE")
            logger.info("finalized the pending detach of %s", _describe(p))
        report.finalized.append(p.name)
        if p.marked:  # ours: the retention had decided to drop it
            if not report.dry_run:
                await conn.execute(f"DROP TABLE {_quote(p.name)}")
                logger.info("dropped partition %s (past the retention)", _describe(p))
            report.dropped.append(p.name)
        else:
            logger.warning("%s was being detached by someone else: detached, left in place", p.name)
    return rest


async def _drop(conn: asyncpg.Connection[Any], table: str, p: Partition, cutoff: datetime) -> None:
    # The mark first: a crash after the detach still leaves the next run knowing the table is ours.
    await conn.execute(f"COMMENT ON TABLE {_quote(p.name)} IS '{MARKER}'")
    await conn.execute(f"ALTER TABLE {_quote(table)} DETACH PARTITION {_quote(p.name)} CONCURRENTLY")
    await conn.execute(f"DROP TABLE {_quote(p.name)}")
    logger.info("dropped partition %s: all of it older than the cutoff %s", _describe(p), cutoff.isoformat())


async def maintain_on(
    conn: asyncpg.Connection[Any],
    interval: Interval,
    retention_days: int,
    *,
    now: datetime | None = None,
    dry_run: bool = False,
    table: str = PARENT_TABLE,
) -> MaintenanceReport:
    """Run the maintenance on ``conn`` (which must not be in a transaction); see the module doc."""
    await check_partitioned(conn, table)
    now = now or datetime.now(UTC)
    report = MaintenanceReport(dry_run=dry_run, cutoff=cutoff_for(now, retention_days))
    if not dry_run and not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _MAINTENANCE_LOCK):
        report.skipped = "another maintenance run holds the lock on this database"
        logger.info("partition maintenance skipped: %s", report.skipped)
        return report
    try:
        partitions = await _finish_crashed(conn, table, await list_partitions(conn, table), report)
        if dry_run:
            report.created = [
                name for name, _, _ in await missing_ahead(conn, interval, now=now, table=table)
            ]
        else:
            report.created = await create_ahead(conn, interval, now=now, table=table)
        doomed = expired(partitions, report.cutoff) if report.cutoff else []
        for p in doomed:
            try:
                if not dry_run:
                    await _drop(conn, table, p, cast(datetime, report.cutoff))
                report.dropped.append(p.name)
            except asyncpg.PostgresError as exc:
                # the others may still go; a partition left marked or pending is finished next run
                logger.error("could not drop partition %s: %s", p.name, exc)
                report.failed[p.name] = str(exc)
        report.kept = [p.name for p in partitions if p not in doomed]
        for p in partitions:
            if p.marked and p not in doomed and not dry_run:
                # marked by a run that stopped before its detach, and kept now (the retention grew):
                # unmarked, or a later detach by someone else would read as ours to drop
                await conn.execute(f"COMMENT ON TABLE {_quote(p.name)} IS NULL")
    finally:
        # a lost connection released the lock with its session: don't hide the error that lost it
        if not dry_run and not conn.is_closed():
            with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                await conn.execute("SELECT pg_advisory_unlock($1)", _MAINTENANCE_LOCK)
    return report


async def maintain(
    settings: Settings, *, now: datetime | None = None, dry_run: bool = False
) -> MaintenanceReport:
    """:func:`maintain_on` a connection of its own, made and closed here, with the settings' interval
    and retention."""
    conn = await asyncpg.connect(asyncpg_dsn(settings.database_url))
    try:
        return await maintain_on(
            conn,
            cast(Interval, settings.analytics_partition_interval),
            settings.analytics_retention_days,
            now=now,
            dry_run=dry_run,
        )
    finally:
        await conn.close()
