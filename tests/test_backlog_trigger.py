"""Backlog trigger (issue 3 §6, issue 13 §6): a push that makes the queue reach analytics_batch_size
sends flush_analytics_events, at most once per cooldown across all clients; a trigger the cooldown
suppresses schedules one flush for the cooldown's end (a debounce with a trailing edge); a real
worker then drains without any beat.

The broker is a throwaway redis-server per test, so the Celery queue "analytics" holds only the
messages this test caused; the events themselves go to the shared Redis under the test's prefix.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from analytics_sdk import AnalyticsClient, Settings
from analytics_sdk._queue import QueueKeys
from tests.helpers import wait_for
from tests.servers import RedisServer, free_port
from tests.worker_proc import LOOP_ERRORS, broker_messages, celery_worker, private_broker


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RedisServer]:
    with private_broker(tmp_path) as server:
        yield server


async def _settled(client: AnalyticsClient) -> None:
    # The trigger runs as a background task of the client: wait until it has finished.
    await wait_for(lambda: not client._background, timeout=10, message="backlog trigger still running")


@pytest.fixture
def trigger_settings(settings: Settings, broker: RedisServer) -> Settings:
    return settings.replace(
        broker_url=broker.url,
        analytics_backlog_trigger=True,
        analytics_batch_size=10,
        analytics_backlog_trigger_cooldown=30.0,  # long: nothing may slip past it during the test
        analytics_max_delay=0.0,  # the trigger alone (tests/test_flush_timing.py has the max delay)
    )


def _eta(message: dict[str, Any]) -> str | None:
    eta: str | None = message["headers"].get("eta")
    return eta


async def test_below_the_batch_size_sends_nothing(trigger_settings: Settings, broker: RedisServer) -> None:
    async with AnalyticsClient(trigger_settings) as client:
        for i in range(9):
            await client.track("x", user_id=str(i))
        await _settled(client)
    assert broker_messages(broker) == []


async def test_reaching_the_batch_size_sends_one_flush_task(
    trigger_settings: Settings, broker: RedisServer, redis_client: aioredis.Redis
) -> None:
    async with AnalyticsClient(trigger_settings) as client:
        for i in range(10):
            await client.track("x", user_id=str(i))
        await wait_for(lambda: len(broker_messages(broker)) == 1, timeout=10, message="no flush task sent")
        await _settled(client)
    [message] = broker_messages(broker)
    assert message["headers"]["task"] == "flush_analytics_events"
    assert message["content-type"] == "application/json"
    assert message["properties"]["delivery_info"]["routing_key"] == "analytics"
    assert json.loads(base64.b64decode(message["body"]))[0] == []
    cooldown = QueueKeys(trigger_settings.analytics_key_prefix).flush_cooldown
    assert 0 < await redis_client.pttl(cooldown) <= 30_000


async def test_a_burst_from_many_clients_sends_one_task_now_and_one_at_the_cooldowns_end(
    trigger_settings: Settings, broker: RedisServer, redis_client: aioredis.Redis
) -> None:
    clients = [AnalyticsClient(trigger_settings) for _ in range(4)]
    try:

        async def producer(client: AnalyticsClient, n: int) -> None:
            for i in range(50):
                await client.track("burst", user_id=f"{n}-{i}")

        await asyncio.gather(*(producer(c, n) for n, c in enumerate(clients)))
        for client in clients:
            await _settled(client)
    finally:
        for client in clients:
            await client.aclose()
    # The debounce: the first push past the threshold sends one now; the suppressed ones schedule
    # exactly one more, for the end of the cooldown (none dropped, none doubled across clients).
    now, trailing = sorted(broker_messages(broker), key=lambda m: _eta(m) or "")
    assert _eta(now) is None
    eta = _eta(trailing)
    assert eta is not None
    ahead = (datetime.fromisoformat(eta) - datetime.now(UTC)).total_seconds()
    assert 20 < ahead <= 30, ahead
    # once the cooldown key is gone, the next push past the threshold sends again
    await redis_client.delete(QueueKeys(trigger_settings.analytics_key_prefix).flush_cooldown)
    async with AnalyticsClient(trigger_settings) as client:
        await client.track("after-cooldown")
        await wait_for(lambda: len(broker_messages(broker)) == 3, timeout=10, message="no third flush task")
        await _settled(client)
    assert sum(_eta(m) is None for m in broker_messages(broker)) == 2, "a new window: sent now"


async def test_trigger_off_sends_nothing(
    trigger_settings: Settings, broker: RedisServer, redis_client: aioredis.Redis
) -> None:
    off = trigger_settings.replace(analytics_backlog_trigger=False)
    async with AnalyticsClient(off) as client:
        await client.track_many([{"event_type": "x"} for _ in range(100)])
        await _settled(client)
    assert broker_messages(broker) == []
    assert not await redis_client.exists(QueueKeys(off.analytics_key_prefix).flush_cooldown)


async def test_unreachable_broker_costs_track_nothing_and_warns_once(
    settings: Settings, caplog: pytest.LogCaptureFixture, redis_client: aioredis.Redis
) -> None:
    """The backlog trigger fires but the broker is down: every track() still succeeds (the events are
    in Redis; beat will drain them), and the failed send is exactly one WARNING, however many pushes
    cross the threshold within the cooldown."""
    down = settings.replace(
        broker_url=f"redis://127.0.0.1:{free_port()}/0",
        analytics_backlog_trigger=True,
        analytics_batch_size=5,
        analytics_backlog_trigger_cooldown=30.0,
    )
    caplog.set_level(logging.WARNING)
    async with AnalyticsClient(down) as client:
        ids = [await client.track("x", user_id=str(i)) for i in range(20)]
        await wait_for(lambda: any("backlog flush" in r.getMessage() for r in caplog.records), timeout=30)
        await _settled(client)
        ids += [await client.track("after", user_id=str(i)) for i in range(5)]  # within the cooldown
        await _settled(client)
    assert len(set(ids)) == 25
    assert await redis_client.llen(QueueKeys(down.analytics_key_prefix).queue) == 25
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [(r.name, r.getMessage()) for r in warnings]
    assert warnings[0].name == "analytics_sdk._client"
    assert "could not send a backlog flush (beat will drain instead)" in warnings[0].getMessage()


async def test_trigger_on_by_default() -> None:
    assert Settings().analytics_backlog_trigger is True


@pytest.mark.e2e
@pytest.mark.timeout(180)
async def test_a_real_worker_without_beat_drains_what_the_trigger_announces(
    db_settings: Settings, broker: RedisServer, tmp_path: Path
) -> None:
    settings = db_settings.replace(
        broker_url=broker.url, analytics_backlog_trigger=True, analytics_backlog_trigger_cooldown=0.5
    )
    env = {
        "ANALYTICS_BROKER_URL": broker.url,
        "ANALYTICS_REDIS_URL": settings.redis_dsn,
        "ANALYTICS_KEY_PREFIX": settings.analytics_key_prefix,
        "ANALYTICS_DATABASE_URL": settings.database_url,
        "ANALYTICS_FLUSH_INTERVAL": "3600",  # no beat runs anyway: only the trigger can start a drain
    }
    with celery_worker(tmp_path, env, beat=False) as worker:
        async with AnalyticsClient(settings) as client:
            started = asyncio.get_running_loop().time()
            ids = await client.track_many([{"event_type": "burst", "user_id": str(i)} for i in range(500)])
            await _settled(client)

            async def landed() -> bool:
                conn = await asyncpg.connect(settings.database_url)
                try:
                    return int(await conn.fetchval("SELECT count(*) FROM analytics_events")) == len(ids)
                finally:
                    await conn.close()

            await wait_for(landed, timeout=30, interval=0.1, message="500 rows")
            elapsed = asyncio.get_running_loop().time() - started
        log = worker.log()
    assert "Task flush_analytics_events" in log and "Traceback" not in log
    assert elapsed < 15, elapsed
    for message in LOOP_ERRORS:
        assert message not in log
