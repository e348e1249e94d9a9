"""Retention on the partitioned table: exactly the partitions wholly past it go, while a worker drains.

Every test gets its own database with the partitioned ``analytics_events`` (tests/partitioned.py) and
runs the real maintenance against it; the drain is the real ``drain()`` on the real Redis.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from analytics_sdk import AnalyticsClient, Settings
from analytics_sdk._queue import QueueKeys
from bridge.drain import drain
from bridge.maintenance import MARKER, maintain, maintain_on
from bridge.partitions import bounds, create_ahead, ensure_partitions, partition_name
from tests.helpers import wait_for
from tests.partitioned import insert_at, partitioned_database, partitions_of


@pytest.fixture
def part_settings(settings: Settings) -> Iterator[Settings]:
    with partitioned_database() as url:
        yield settings.replace(database_url=url, analytics_partition_interval="month")


def _months_back(now: datetime, count: int) -> list[tuple[datetime, datetime]]:
    """The ``[lower, upper)`` of the month of ``now`` and of the ``count`` months before it, oldest first."""
    ranges = [bounds(now, "month")]
    for _ in range(count):
        ranges.insert(0, bounds(ranges[0][0] - timedelta(days=1), "month"))
    return ranges


async def _rows_per_partition(conn: asyncpg.Connection[Any]) -> dict[str, int]:
    rows = await conn.fetch(
        "SELECT tableoid::regclass::text AS p, count(*) AS n FROM analytics_events GROUP BY 1"
    )
    return {r["p"]: r["n"] for r in rows}


async def test_retention_drops_exactly_the_partitions_wholly_past_it_while_a_worker_drains(
    part_settings: Settings, redis_client: aioredis.Redis
) -> None:
    real_now = datetime.now(UTC)
    months = _months_back(real_now, 14)
    # The maintenance's clock sits so that the cutoff falls exactly on a month's start: the month
    # ending there goes, the one starting there stays (its first row is at the cutoff itself).
    cutoff = months[-4][0]
    now = cutoff + timedelta(days=90)
    settings = part_settings.replace(analytics_retention_days=90)
    conn = await asyncpg.connect(settings.database_url)
    try:
        await ensure_partitions(conn, "month", [lower for lower, _ in months])
        await create_ahead(conn, "month", now=real_now)
        before = await partitions_of(conn)
        # each past month: its first instant, its middle, its last microsecond
        await insert_at(
            conn,
            "old",
            (t for lo, hi in months[:-1] for t in (lo, lo + (hi - lo) / 2, hi - timedelta(microseconds=1))),
        )
        expected_dropped = {partition_name(lo) for lo, hi in months if hi <= cutoff}
        assert len(expected_dropped) == 11  # 14 months back, the cutoff 3 months before this one

        tracked: list[str] = []
        async with AnalyticsClient(settings) as client:
            done = asyncio.Event()

            async def produce() -> None:
                for i in range(40):
                    tracked.extend(await client.track_many([{"event_type": "live", "user_id": i}] * 25))
                    await asyncio.sleep(0.01)  # a trickle: the drains keep finding work during the detaches

            async def work() -> None:
                while not done.is_set() or await client.get_queue_size():
                    await drain(settings.replace(analytics_batch_size=50, analytics_insert_batch_size=50))

            async def live_rows() -> int:
                return int(
                    await conn.fetchval("SELECT count(*) FROM analytics_events WHERE event_type = 'live'")
                )

            producer, worker = asyncio.create_task(produce()), asyncio.create_task(work())
            try:
                await wait_for(
                    live_rows, timeout=30, message="the worker drains before the maintenance starts"
                )
                report = await maintain(settings, now=now)
                assert not producer.done() and not worker.done()  # it ran while they worked
                await producer
                done.set()
                await asyncio.wait_for(worker, timeout=60)
            finally:
                for task in (producer, worker):
                    task.cancel()

        assert report.skipped is None and report.failed == {}
        assert set(report.dropped) == expected_dropped
        assert await partitions_of(conn) == before - expected_dropped
        # nothing newer than the cutoff went; every live event is one row, none dead-lettered
        per_partition = await _rows_per_partition(conn)
        for lo, hi in months[:-1]:
            assert per_partition.get(partition_name(lo), 0) == (0 if hi <= cutoff else 3), lo
        assert (
            int(await conn.fetchval("SELECT count(*) FROM analytics_events WHERE created_at < $1", cutoff))
            == 0
        )
        assert await live_rows() == len(tracked) == 1000
        stored = await conn.fetch(
            "SELECT event_id::text AS id FROM analytics_events WHERE event_type = 'live'"
        )
        assert {r["id"] for r in stored} == set(tracked)
        assert await redis_client.llen(QueueKeys(settings.analytics_key_prefix).dead) == 0
    finally:
        await conn.close()


async def test_the_legacy_partition_goes_only_once_its_cut_over_is_past_and_dry_run_changes_nothing(
    part_settings: Settings,
) -> None:
    cut_over = datetime(2026, 1, 15, 9, 30, tzinfo=UTC)
    conn = await asyncpg.connect(part_settings.database_url)
    try:
        # the old heap as the migration attaches it: everything before the cut-over
        await conn.execute(
            "CREATE TABLE analytics_events_legacy PARTITION OF analytics_events "
            f"FOR VALUES FROM (MINVALUE) TO ('{cut_over.isoformat()}')"
        )
        made = await ensure_partitions(conn, "month", [cut_over, datetime(2026, 2, 3, tzinfo=UTC)])
        assert made == ["analytics_events_p20260115", "analytics_events_p20260201"]  # January clipped
        await insert_at(
            conn, "e", [datetime(2024, 5, 1, tzinfo=UTC), cut_over - timedelta(microseconds=1), cut_over]
        )

        async def state() -> tuple[set[str], dict[str, int]]:
            return await partitions_of(conn), await _rows_per_partition(conn)

        async def run(cutoff: datetime, dry_run: bool) -> list[str]:
            report = await maintain_on(conn, "month", 30, now=cutoff + timedelta(days=30), dry_run=dry_run)
            assert report.cutoff == cutoff and report.failed == {}
            return report.dropped

        # the cut-over is after the cutoff: the legacy partition holds rows still kept, so it stays
        start = await state()
        assert await run(datetime(2026, 1, 10, tzinfo=UTC), dry_run=True) == []
        assert await state() == start  # nothing created ahead either: a dry run changes nothing
        assert await run(datetime(2026, 1, 10, tzinfo=UTC), dry_run=False) == []
        assert {"analytics_events_legacy", "analytics_events_p20260115"} <= await partitions_of(conn)

        cutoff = datetime(2026, 1, 20, tzinfo=UTC)
        start = await state()
        assert await run(cutoff, dry_run=True) == ["analytics_events_legacy"]
        assert await state() == start
        assert await run(cutoff, dry_run=False) == ["analytics_events_legacy"]
        parts, rows = await state()
        assert "analytics_events_legacy" not in parts and rows["analytics_events_p20260115"] == 1

        # the clipped January partition goes when its end, February 1st, is reached
        assert await run(datetime(2026, 1, 31, 23, 59, tzinfo=UTC), dry_run=False) == []
        assert await run(datetime(2026, 2, 1, tzinfo=UTC), dry_run=False) == ["analytics_events_p20260115"]
        assert await to_regclass(conn, "analytics_events_p20260115") is None
    finally:
        await conn.close()


async def to_regclass(conn: asyncpg.Connection[Any], name: str) -> str | None:
    found: str | None = await conn.fetchval("SELECT to_regclass($1)::text", name)
    return found


async def _leave_detach_pending(conn: asyncpg.Connection[Any], url: str, name: str) -> None:
    """What a run killed during ``DETACH ... CONCURRENTLY`` leaves: the detach pending. A reader's open
    snapshot keeps the detach waiting in its second transaction until a statement timeout cancels it."""
    reader = await asyncpg.connect(url)
    try:
        async with reader.transaction():
            await reader.fetchval("SELECT count(*) FROM analytics_events")
            await conn.execute("SET statement_timeout = '500ms'")
            with pytest.raises(asyncpg.QueryCanceledError):
                await conn.execute(f"ALTER TABLE analytics_events DETACH PARTITION {name} CONCURRENTLY")
            await conn.execute("SET statement_timeout = 0")
    finally:
        await reader.close()
    pending = await conn.fetchval(
        "SELECT inhdetachpending FROM pg_inherits WHERE inhrelid = to_regclass($1)", name
    )
    assert pending is True


async def test_a_crashed_run_is_finished_by_the_next(part_settings: Settings) -> None:
    url = part_settings.database_url
    conn = await asyncpg.connect(url)
    try:
        months = [datetime(2025, m, 1, tzinfo=UTC) for m in (1, 2, 3, 4)]
        await ensure_partitions(conn, "month", months)
        jan, feb, mar, apr = (partition_name(m) for m in months)
        # January: marked and left pending; February: marked and detached, not yet dropped
        await conn.execute(f"COMMENT ON TABLE {jan} IS '{MARKER}'")
        await _leave_detach_pending(conn, url, jan)
        await conn.execute(f"COMMENT ON TABLE {feb} IS '{MARKER}'")
        await conn.execute(f"ALTER TABLE analytics_events DETACH PARTITION {feb}")

        cutoff = datetime(2025, 4, 1, tzinfo=UTC)
        before = await partitions_of(conn)
        dry = await maintain_on(conn, "month", 10, now=cutoff + timedelta(days=10), dry_run=True)
        assert (dry.finalized, sorted(dry.dropped)) == ([jan], sorted([feb, jan, mar]))
        assert await partitions_of(conn) == before and await to_regclass(conn, feb) == feb

        report = await maintain_on(conn, "month", 10, now=cutoff + timedelta(days=10))
        assert report.finalized == [jan] and sorted(report.dropped) == sorted([feb, jan, mar])
        for name in (jan, feb, mar):
            assert await to_regclass(conn, name) is None
        assert apr in await partitions_of(conn)

        # a mark left on a partition the retention now keeps (it grew since) is taken off
        await conn.execute(f"COMMENT ON TABLE {apr} IS '{MARKER}'")
        report = await maintain_on(conn, "month", 10, now=datetime(2025, 4, 15, tzinfo=UTC))
        assert report.dropped == [] and apr in report.kept
        assert await conn.fetchval("SELECT obj_description(to_regclass($1), 'pg_class')", apr) is None

        # someone else's detach left pending blocks every other detach: finalized, their table kept
        await _leave_detach_pending(conn, url, apr)
        report = await maintain_on(conn, "month", 10, now=datetime(2025, 6, 1, tzinfo=UTC))
        assert report.finalized == [apr] and apr not in report.dropped and report.failed == {}
        assert await to_regclass(conn, apr) == apr and apr not in await partitions_of(conn)
    finally:
        await conn.close()


async def test_retention_zero_keeps_everything_and_only_creates_ahead(part_settings: Settings) -> None:
    conn = await asyncpg.connect(part_settings.database_url)
    try:
        await ensure_partitions(conn, "day", [datetime(2020, 1, 1, tzinfo=UTC)])
        report = await maintain_on(conn, "day", 0, now=datetime(2026, 3, 10, 12, tzinfo=UTC))
        assert report.cutoff is None and report.dropped == []
        assert report.created == [
            "analytics_events_p20260310",
            "analytics_events_p20260311",
            "analytics_events_p20260312",
        ]
        assert await partitions_of(conn) == {"analytics_events_p20200101", *report.created}
        again = await maintain_on(conn, "day", 0, now=datetime(2026, 3, 10, 12, tzinfo=UTC))
        assert again.created == [] and again.kept == sorted(await partitions_of(conn))
    finally:
        await conn.close()
