"""Section 3b: what time partitions cost the drain, against the plain heap, same rows, same run.

Two databases of this run: one whose ``analytics_events`` is a plain heap, one where it is partitioned
by month on ``created_at`` (the current month and two ahead, plus a year of past months, as a
deployment has them). Each holds the same indexes and unique key. Contenders, interleaved within each
repeat, each from an empty table:

- drain: ``bridge.drain.drain()`` (claim 1,000, the shipped 5,000 rows per transaction) of the same
  queued events, into either table: PostgreSQL routes every row to its partition;
- raw COPY: ``copy_records_to_table`` of the same pre-built rows, 1,000 per transaction, into either.

The target: the drain into the partitioned table keeps at least 0.9x of its heap figure.

``migrate`` makes both databases partitioned; the heap one is then made a plain table with the same
columns, keys and indexes (``CREATE TABLE ... (LIKE ... INCLUDING ALL)``), which the drain writes to
as it would to a heap (no partition to make).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from analytics_sdk._queue import QueueKeys

from ._common import Check, Context, Run, Section, Summary, fmt_rate, fmt_ratio
from .database import bench_database, copy_in_batches, record, row_count
from .drain import _events, _fill

logger = logging.getLogger(__name__)

CLAIM, TRANSACTION, COPY_BATCH = 1_000, 5_000, 1_000
PAST_MONTHS = 12
TARGET = 0.9


async def _relkind(conn: asyncpg.Connection[Any]) -> str | None:
    kind: str | None = await conn.fetchval(
        "SELECT relkind::text FROM pg_class WHERE oid = to_regclass('analytics_events')"
    )
    return kind


async def _as_heap(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        if await _relkind(conn) == "p":  # migrate made it partitioned: the same table, unpartitioned
            async with conn.transaction():
                await conn.execute("CREATE TABLE analytics_events_heap (LIKE analytics_events INCLUDING ALL)")
                await conn.execute("DROP TABLE analytics_events")
                await conn.execute("ALTER TABLE analytics_events_heap RENAME TO analytics_events")
    finally:
        await conn.close()


async def _as_partitioned(url: str) -> None:
    from bridge.partitions import bounds, create_ahead, ensure_partitions

    conn = await asyncpg.connect(url)
    try:
        now = datetime.now(UTC)
        months, lower = [], bounds(now, "month")[0]
        for _ in range(PAST_MONTHS):
            lower = bounds(lower - timedelta(days=1), "month")[0]
            months.append(lower)
        await ensure_partitions(conn, "month", months)
        await create_ahead(conn, "month", now=now)
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def _databases(ctx: Context) -> AsyncIterator[dict[str, str]]:
    async with bench_database(ctx, "heap") as heap, bench_database(ctx, "parts") as parts:
        await _as_heap(heap)
        await _as_partitioned(parts)
        yield {"heap": heap, "partitioned": parts}


async def _measure(ctx: Context, urls: dict[str, str]) -> dict[str, Summary]:
    from bridge.drain import drain

    count = ctx.mode.drain_events
    events = _events(count)
    payloads = [e.encode() for e in events]
    records = [record(e) for e in events]
    redis_client = aioredis.Redis.from_url(ctx.redis_url)
    conns = {name: await asyncpg.connect(url) for name, url in urls.items()}
    base = ctx.settings("parts", analytics_max_queue_size=10_000_000)
    keys = QueueKeys(base.analytics_key_prefix)
    settings = {
        name: base.replace(
            database_url=url, analytics_batch_size=CLAIM, analytics_insert_batch_size=TRANSACTION
        )
        for name, url in urls.items()
    }

    async def timed(name: str, work: Callable[[], Awaitable[int]], rows: int) -> Run:
        conn = conns[name]
        await conn.execute("TRUNCATE analytics_events")
        start = time.perf_counter()
        done = await work()
        seconds = time.perf_counter() - start
        stored = await row_count(conn)
        if done != rows or stored != rows:
            raise RuntimeError(
                f"{name}: expected {rows} rows, the contender reported {done}, the table holds {stored}"
            )
        return Run(rows, seconds)

    def drainer(name: str) -> Callable[[], Awaitable[int]]:
        async def work() -> int:
            return (await drain(settings[name], time_budget=3600)).inserted

        return work

    def copier(name: str, rows: int) -> Callable[[], Awaitable[int]]:
        async def work() -> int:
            return await copy_in_batches(conns[name], records, rows, COPY_BATCH)

        return work

    runs: dict[str, list[Run]] = {}
    try:
        for repeat in range(ctx.mode.repeats + 1):
            rows = count if repeat else min(count, max(1_000, count // 10))  # a short warm-up pass
            for name in ("heap", "partitioned"):
                await _fill(redis_client, keys, payloads[:rows])
                drained = await timed(name, drainer(name), rows)
                copied = await timed(name, copier(name, rows), rows)
                if repeat:
                    runs.setdefault(f"drain {name}", []).append(drained)
                    runs.setdefault(f"copy {name}", []).append(copied)
            logger.info("partitions: repeat %s/%s done", repeat, ctx.mode.repeats)
    finally:
        await redis_client.delete(keys.queue)
        await redis_client.aclose()
        for conn in conns.values():
            await conn.close()
    return {name: Summary.of(r) for name, r in runs.items()}


async def _run(ctx: Context) -> dict[str, Summary]:
    async with _databases(ctx) as urls:
        return await _measure(ctx, urls)


def run(ctx: Context) -> Section:
    s = asyncio.run(_run(ctx))
    section = Section(
        f"3b. drain into the partitioned table vs the plain heap, {ctx.mode.drain_events:,} events per run",
        ["contender", "heap rows/s", "partitioned rows/s", "partitioned / heap"],
    )
    for kind, label in (
        ("drain", f"drain: claim {CLAIM:,}, {TRANSACTION:,} rows per transaction (default)"),
        ("copy", f"raw asyncpg COPY, {COPY_BATCH:,} rows per transaction"),
    ):
        heap, parts = s[f"{kind} heap"], s[f"{kind} partitioned"]
        section.rows.append(
            [label, fmt_rate(heap.rate), fmt_rate(parts.rate), fmt_ratio(parts.rate / heap.rate)]
        )
    section.data = {name: summary.as_dict() for name, summary in s.items()}
    section.notes = [
        f"partitioned by month, {PAST_MONTHS} past months and 2 ahead; every row lands in the current "
        "month's partition, as live events do",
    ]
    section.checks = [
        Check(
            "drain into the partitioned table / into the heap",
            s["drain partitioned"].rate / s["drain heap"].rate,
            TARGET,
        )
    ]
    return section
