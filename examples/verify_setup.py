"""Verify a deployment end to end: track events, ask the worker to flush, see the rows in PostgreSQL.

    python examples/verify_setup.py    # needs the bridge extra: pip install 'durable-analytics[bridge]'

Needs Redis, PostgreSQL (migrated: ``analytics-bridge migrate``) and a running worker
(``celery -A bridge worker -B -Q analytics``) configured with the same ``ANALYTICS_*`` variables as
this script. Exits 0 when every event arrived as a row, 1 otherwise (with what to check).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid

import asyncpg

from analytics_sdk import AnalyticsClient, Settings

EVENTS = 5
TIMEOUT = float(os.environ.get("VERIFY_TIMEOUT", "60"))


async def rows_for(database_url: str, event_ids: list[str]) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        return await conn.fetch(
            "SELECT event_id, event_type, user_id, created_at, received_at FROM analytics_events"
            " WHERE event_id = ANY($1::uuid[]) ORDER BY created_at",
            event_ids,
        )
    finally:
        await conn.close()


async def main() -> int:
    settings = Settings.from_env()
    marker = uuid.uuid4().hex[:8]
    async with AnalyticsClient(settings) as client:
        ids = [
            await client.track("verify_setup", user_id=f"verify-{marker}", event_metadata={"n": n})
            for n in range(EVENTS)
        ]
        print(
            f"tracked {len(ids)} events (user_id verify-{marker}); queue size {await client.get_queue_size()}"
        )
        task_id = await client.flush_events_now()
        print(f"sent flush task {task_id} to the 'analytics' queue")

    deadline = time.monotonic() + TIMEOUT
    rows: list[asyncpg.Record] = []
    while time.monotonic() < deadline:
        rows = await rows_for(settings.database_url, ids)
        if len(rows) == len(ids):
            break
        await asyncio.sleep(0.5)
    for row in rows:
        lag = (row["received_at"] - row["created_at"]).total_seconds()
        print(f"  row {row['event_id']} {row['event_type']} {row['user_id']} arrived after {lag:.2f}s")
    if len(rows) == len(ids):
        print(f"OK: all {len(ids)} events are rows in analytics_events")
        return 0
    print(
        f"FAILED: {len(rows)} of {len(ids)} events arrived within {TIMEOUT:.0f}s. Check that a worker runs"
        " (`celery -A bridge worker -B -Q analytics`) with the same ANALYTICS_* settings, and what"
        " `analytics-bridge status` says (queue depth, dead letters).",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
