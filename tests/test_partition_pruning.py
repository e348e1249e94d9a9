"""The queries of docs/partitions.md prune to the partitions in their time range (EXPLAIN, walked).

The SQL here is the SQL of the page, word for word: a change to one is a change to the other.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec
import pytest

from bridge.partitions import Interval, ensure_partitions
from tests.partitioned import insert_at, partitioned_database

PER_DAY = """
SELECT date_trunc('day', created_at, 'UTC') AS day, event_type, count(*) AS events
FROM analytics_events
WHERE created_at >= '2026-11-03 00:00+00' AND created_at < '2026-11-04 00:00+00'
GROUP BY 1, 2
ORDER BY 1, 2
"""
TIMELINE = """
SELECT created_at, event_type, entity_type, entity_id, event_metadata
FROM analytics_events
WHERE user_id = '42' AND created_at >= '2026-11-02 00:00+00' AND created_at < '2026-11-04 00:00+00'
ORDER BY created_at DESC
LIMIT 100
"""
ENTITY = """
SELECT created_at, event_type, user_id, event_metadata
FROM analytics_events
WHERE entity_type = 'article' AND entity_id = '7'
  AND created_at >= '2026-11-04 00:00+00' AND created_at < '2026-11-05 00:00+00'
ORDER BY created_at
"""

FIRST = datetime(2026, 10, 30, tzinfo=UTC)  # ten days, across a month boundary


@pytest.fixture
def part_url() -> Iterator[str]:
    with partitioned_database() as url:
        yield url


def scanned(plan: Any) -> set[str]:
    """Every relation a plan node scans, the whole tree walked."""
    found: set[str] = set()
    if isinstance(plan, dict):
        if "Relation Name" in plan:
            found.add(plan["Relation Name"])
        for value in plan.values():
            found |= scanned(value)
    elif isinstance(plan, list):
        for item in plan:
            found |= scanned(item)
    return found


async def _explain(conn: asyncpg.Connection[Any], sql: str) -> set[str]:
    raw = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql}")
    return scanned(msgspec.json.decode(raw))


async def _layout(url: str, interval: Interval) -> asyncpg.Connection[Any]:
    conn = await asyncpg.connect(url)
    days = [FIRST + timedelta(days=i) for i in range(10)]
    await ensure_partitions(conn, interval, days)
    await insert_at(conn, "page_view", [d + timedelta(hours=h) for d in days for h in range(0, 24, 6)])
    await conn.execute("ANALYZE analytics_events")
    return conn


async def test_the_per_day_count_scans_only_that_days_partition(part_url: str) -> None:
    conn = await _layout(part_url, "day")
    try:
        assert len(await _explain(conn, "SELECT count(*) FROM analytics_events")) == 10  # the walk sees all
        assert await _explain(conn, PER_DAY) == {"analytics_events_p20261103"}
        rows = await conn.fetch(PER_DAY)
        assert [(r["event_type"], r["events"]) for r in rows] == [("page_view", 4)]
        assert await _explain(conn, TIMELINE) == {"analytics_events_p20261102", "analytics_events_p20261103"}
        assert await _explain(conn, ENTITY) == {"analytics_events_p20261104"}
    finally:
        await conn.close()


async def test_with_monthly_partitions_a_day_scans_its_month_only(part_url: str) -> None:
    conn = await _layout(part_url, "month")
    try:
        assert len(await _explain(conn, "SELECT count(*) FROM analytics_events")) == 2
        for sql in (PER_DAY, TIMELINE, ENTITY):
            assert await _explain(conn, sql) == {"analytics_events_p20261101"}
    finally:
        await conn.close()
