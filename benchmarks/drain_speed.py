"""Issue 3 "Speed": one process draining N queued events end to end vs a raw asyncpg COPY.

    PYTHONPATH=. /work/venv/bin/python benchmarks/drain_speed.py [--events 200000] [--repeats 1]

For each batch size B (100 and 1,000) it times, in the same run and against the same table:

- ``copy B``: ``copy_records_to_table`` of the same rows, pre-built in memory, B rows per transaction
  (the floor: no Redis, no decoding, no conflict handling);
- ``drain B/B``: ``bridge.drain.drain()`` on a queue of N events, claims of B, B rows per transaction;
- ``drain B/5000``: claims of B, 5,000 rows per transaction (``analytics_insert_batch_size``, default).

The drain is timed from the call to its return: claim (Lua), decode and validate each event, COPY to
the staging table, INSERT ... ON CONFLICT, ack. Filling the queue happens off the clock. Uses its own
database (created and dropped) and its own key prefix on the Redis at ANALYTICS_REDIS_URL.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import orjson
import redis.asyncio as aioredis

from analytics_sdk import Settings
from analytics_sdk._event import Event, validate
from analytics_sdk._queue import QueueKeys
from bridge.drain import drain
from bridge.schema import migrate

ADMIN_URL = os.environ.get("ANALYTICS_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("ANALYTICS_REDIS_URL", "redis://127.0.0.1:6379/0")
COLUMNS = (
    "event_id",
    "event_type",
    "user_id",
    "session_id",
    "entity_type",
    "entity_id",
    "event_metadata",
    "ip_address",
    "user_agent",
    "referrer",
    "created_at",
)
UA = "Mozilla/5.0 (X11; Linux x86_64; rv:127.0) Gecko/20100101 Firefox/127.0"


def make_events(count: int) -> list[Event]:
    """Events in sessions of 20 (a visitor's clicks arrive together), one IP address per session:
    10,000 distinct addresses per 200,000 events, as bursty as real traffic, not all unique."""
    start = datetime.now(UTC) - timedelta(hours=1)
    return [
        validate(
            {
                "event_type": ("page_view", "click", "purchase")[i % 3],
                "user_id": str(i // 80),
                "session_id": f"s-{i // 20}",
                "entity_type": "article",
                "entity_id": str(i % 700),
                "event_metadata": {"path": f"/a/{i % 700}", "scroll": 0.5, "load_ms": i % 2000},
                "ip_address": f"10.{(i // 20) % 256}.{(i // 5120) % 256}.{(i // 20) % 200 + 1}",
                "user_agent": UA,
                "referrer": "https://example.com/",
                "created_at": start + timedelta(milliseconds=i),
            }
        )
        for i in range(count)
    ]


def record(e: Event) -> tuple[object, ...]:
    # asyncpg's own codecs: str for uuid and inet, a JSON str for jsonb
    return (
        e.event_id,
        e.event_type,
        e.user_id,
        e.session_id,
        e.entity_type,
        e.entity_id,
        orjson.dumps(e.event_metadata).decode(),
        e.ip_address,
        e.user_agent,
        e.referrer,
        e.created_at,
    )


async def fill(client: aioredis.Redis, keys: QueueKeys, payloads: list[bytes]) -> None:
    await client.delete(keys.queue)
    for start in range(0, len(payloads), 5_000):
        await client.rpush(keys.queue, *payloads[start : start + 5_000])


async def run(events_count: int, repeats: int, batches: tuple[int, ...]) -> None:
    name = f"analytics_drain_speed_{uuid.uuid4().hex[:8]}"
    url = f"{ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    await migrate(url)  # creates the database
    keys = QueueKeys(f"drain-speed-{uuid.uuid4().hex[:8]}")
    base = Settings(redis_url=REDIS_URL, database_url=url, analytics_key_prefix=keys.prefix)
    redis_client = aioredis.Redis.from_url(REDIS_URL)
    conn = await asyncpg.connect(url)
    events = make_events(events_count)
    payloads = [e.encode() for e in events]
    records = [record(e) for e in events]
    results: dict[str, list[float]] = {}

    async def timed(label: str, work: Callable[[], Awaitable[int]]) -> None:
        await conn.execute("TRUNCATE analytics_events")
        await conn.execute("CHECKPOINT")  # each contender starts from the same state
        started = time.perf_counter()
        done = await work()
        seconds = time.perf_counter() - started
        stored = await conn.fetchval("SELECT count(*) FROM analytics_events")
        if done != events_count or stored != events_count:
            raise RuntimeError(f"{label}: reported {done}, stored {stored}, expected {events_count}")
        results.setdefault(label, []).append(events_count / seconds)
        print(f"  {label:<16} {events_count / seconds:>10,.0f} rows/s  ({seconds:.2f}s)", flush=True)

    def copier(batch: int) -> Callable[[], Awaitable[int]]:
        async def work() -> int:
            for start in range(0, len(records), batch):
                async with conn.transaction():
                    await conn.copy_records_to_table(
                        "analytics_events", records=records[start : start + batch], columns=COLUMNS
                    )
            return len(records)

        return work

    def drainer(batch: int, transaction: int) -> Callable[[], Awaitable[int]]:
        settings = base.replace(analytics_batch_size=batch, analytics_insert_batch_size=transaction)

        async def work() -> int:
            return (await drain(settings, time_budget=3600)).inserted

        return work

    try:
        for repeat in range(1, repeats + 1):
            print(f"repeat {repeat}/{repeats}, {events_count:,} events", flush=True)
            for batch in batches:
                await timed(f"copy {batch}", copier(batch))
                for transaction in (batch, 5_000):
                    await fill(redis_client, keys, payloads)
                    await timed(f"drain {batch}/{transaction}", drainer(batch, transaction))
    finally:
        for key in (keys.queue, keys.stats, keys.dead, keys.leases, keys.reclaims):
            await redis_client.delete(key)
        await redis_client.aclose()
        await conn.close()
        admin = await asyncpg.connect(ADMIN_URL)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()

    print("\nmedian rows/s; ratio = drain / raw COPY at the same claim size")
    for batch in batches:
        copy = statistics.median(results[f"copy {batch}"])
        print(f"  batch {batch:>5}: raw COPY {copy:>9,.0f}")
        for transaction in (batch, 5_000):
            rate = statistics.median(results[f"drain {batch}/{transaction}"])
            label = f"drain claim {batch}, {transaction} rows/txn:"
            print(f"      {label:<36} {rate:>9,.0f}  ({rate / copy:.0%} of COPY)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--batches", default="100,1000")
    args = parser.parse_args()
    batches = tuple(int(b) for b in args.batches.split(","))
    asyncio.run(run(args.events, args.repeats, batches))


if __name__ == "__main__":
    main()
