"""End to end: AnalyticsClient -> Redis -> a real `celery -A bridge worker -B -Q analytics` -> PostgreSQL."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from analytics_sdk import AnalyticsClient, Settings
from analytics_sdk._queue import QueueKeys
from tests.helpers import wait_for
from tests.worker_proc import LOOP_ERRORS, CeleryWorker, private_broker

EVENTS = 5_000
PRODUCERS = 100


@pytest.mark.e2e
@pytest.mark.timeout(240)
async def test_worker_with_beat_drains_5000_events_from_100_concurrent_producers(
    db_settings: Settings, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    keys = QueueKeys(db_settings.analytics_key_prefix)
    with private_broker(tmp_path) as broker:
        env = {
            "ANALYTICS_BROKER_URL": broker.url,
            "ANALYTICS_REDIS_URL": db_settings.redis_dsn,
            "ANALYTICS_KEY_PREFIX": keys.prefix,
            "ANALYTICS_DATABASE_URL": db_settings.database_url,
            "ANALYTICS_FLUSH_INTERVAL": "1",
        }
        # The producers' trigger stays off (the settings fixture): here beat alone drives the drain.
        settings = db_settings.replace(broker_url=broker.url)
        worker = CeleryWorker(tmp_path, env, beat=True)
        try:
            worker.start()
            worker.wait_ready()
            async with AnalyticsClient(settings) as client:

                async def producer(n: int) -> list[str]:
                    per = EVENTS // PRODUCERS
                    return [
                        await client.track(
                            "e2e",
                            user_id=f"user-{n}",
                            session_id=f"s-{n}",
                            event_metadata={"n": n, "i": i},
                            ip_address=f"10.0.{n}.{i + 1}",
                        )
                        for i in range(per)
                    ]

                batches = await asyncio.gather(*(producer(n) for n in range(PRODUCERS)))
            tracked = {event_id for batch in batches for event_id in batch}
            assert len(tracked) == EVENTS

            conn = await asyncpg.connect(db_settings.database_url)
            try:

                async def distinct_rows() -> bool:
                    return (
                        int(await conn.fetchval("SELECT count(DISTINCT event_id) FROM analytics_events"))
                        == EVENTS
                    )

                await wait_for(
                    distinct_rows, timeout=120, interval=0.25, message=f"{EVENTS} rows in PostgreSQL"
                )
                stored = {
                    str(r["event_id"]) for r in await conn.fetch("SELECT event_id FROM analytics_events")
                }
                assert stored == tracked
                assert await conn.fetchval("SELECT count(*) FROM analytics_events") == EVENTS
            finally:
                await conn.close()
            # I4: the drain released every lease; nothing was dead-lettered
            await wait_for(lambda: _quiet(redis_client, keys), timeout=30, message="leases released")
            assert await redis_client.llen(keys.dead) == 0
        finally:
            code = worker.stop()
    log = worker.log()
    assert code == 0, log[-3000:]
    assert "beat: Starting" in log and "Task flush_analytics_events" in log
    assert "Traceback" not in log, log[-5000:]
    for message in LOOP_ERRORS:
        assert message not in log


async def _quiet(redis_client: aioredis.Redis, keys: QueueKeys) -> bool:
    return not await redis_client.zcard(keys.leases) and not await redis_client.llen(keys.queue)
