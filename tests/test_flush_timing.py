"""Bounded delivery latency on the defaults (issue 13 §6): the backlog trigger's trailing edge and
ANALYTICS_MAX_DELAY, first as the flush tasks the clients send (a throwaway broker, no worker), then
with a real worker and no beat: what the clients send is the only thing that can start a drain.

The flushes the clients asked for are counted by kind in ``{prefix}:flush:requests`` (now,
trailing, delayed); each request is one task sent, which the broker or the worker's log confirms.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from analytics_sdk import AnalyticsClient, Settings
from analytics_sdk._queue import QueueKeys
from tests.helpers import row_count, wait_for
from tests.servers import RedisServer
from tests.worker_proc import LOOP_ERRORS, broker_messages, celery_worker, private_broker


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RedisServer]:
    with private_broker(tmp_path) as server:
        yield server


def _seconds_ahead(message: dict[str, Any]) -> float | None:
    eta = message["headers"].get("eta")
    return None if eta is None else (datetime.fromisoformat(eta) - datetime.now(UTC)).total_seconds()


async def _requests(redis_client: aioredis.Redis, settings: Settings) -> dict[str, int]:
    raw = await redis_client.hgetall(QueueKeys(settings.analytics_key_prefix).flush_requests)
    return {k.decode(): int(v) for k, v in raw.items()}


async def _settled(*clients: AnalyticsClient) -> None:
    await wait_for(lambda: not any(c._background for c in clients), timeout=10, message="sends still out")


def _shipped_timing(settings: Settings, broker: RedisServer) -> Settings:
    """The shipped timing (trigger on, cooldown 1 s, max delay 2 s, batch 100), a private broker."""
    defaults = Settings()
    return settings.replace(
        broker_url=broker.url,
        analytics_backlog_trigger=True,
        analytics_batch_size=defaults.analytics_batch_size,
        analytics_backlog_trigger_cooldown=defaults.analytics_backlog_trigger_cooldown,
        analytics_max_delay=defaults.analytics_max_delay,
    )


@pytest.fixture
def on_defaults(settings: Settings, broker: RedisServer) -> Settings:
    return _shipped_timing(settings, broker)


async def test_below_the_batch_size_many_clients_schedule_one_flush_max_delay_ahead(
    on_defaults: Settings, broker: RedisServer, redis_client: aioredis.Redis
) -> None:
    settings = on_defaults.replace(analytics_max_delay=20.0)  # long: nothing else may be asked meanwhile
    clients = [AnalyticsClient(settings) for _ in range(4)]
    try:
        for round_ in range(3):
            await asyncio.gather(*(c.track("few", user_id=f"{n}-{round_}") for n, c in enumerate(clients)))
        await _settled(*clients)
    finally:
        for client in clients:
            await client.aclose()
    [message] = broker_messages(broker)
    ahead = _seconds_ahead(message)
    assert ahead is not None and 10 < ahead <= 20, ahead
    assert await _requests(redis_client, settings) == {"delayed": 1}
    assert 0 < await redis_client.pttl(QueueKeys(settings.analytics_key_prefix).flush_delay) <= 20_000


async def test_max_delay_0_leaves_a_short_queue_to_beat(
    on_defaults: Settings, broker: RedisServer, redis_client: aioredis.Redis
) -> None:
    settings = on_defaults.replace(analytics_max_delay=0.0)
    async with AnalyticsClient(settings) as client:
        await client.track_many([{"event_type": "few"}] * 5)
        await _settled(client)
    assert broker_messages(broker) == []
    assert await _requests(redis_client, settings) == {}


async def test_a_steady_stream_from_many_clients_sends_one_flush_per_cooldown(
    on_defaults: Settings, broker: RedisServer, redis_client: aioredis.Redis
) -> None:
    """Eight clients keep the queue past the batch size for ~3 s (nothing drains it): the first push
    sends one flush now, then exactly one trailing flush is scheduled per cooldown window, each at the
    previous window's end, never two for a window whichever client asks."""
    settings = on_defaults.replace(analytics_max_delay=0.0, analytics_backlog_trigger_cooldown=0.5)
    clients = [AnalyticsClient(settings) for _ in range(8)]
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:

        async def producer(client: AnalyticsClient) -> None:
            while loop.time() - started < 3.0:
                await client.track_many([{"event_type": "steady"}] * 20)
                await asyncio.sleep(0.01)

        await asyncio.gather(*(producer(c) for c in clients))
        await _settled(*clients)
    finally:
        for client in clients:
            await client.aclose()
    elapsed = loop.time() - started
    messages = broker_messages(broker)
    requests = await _requests(redis_client, settings)
    assert requests["now"] == 1, requests
    assert len(messages) == requests["now"] + requests["trailing"], (len(messages), requests)
    # One window per 0.5 s of the run (plus the one still open): never more.
    assert 3 <= requests["trailing"] <= elapsed / 0.5 + 1, (requests, elapsed)
    etas = sorted(a for a in map(_seconds_ahead, messages) if a is not None)
    assert len(etas) == requests["trailing"]
    gaps = [b - a for a, b in itertools.pairwise(etas)]
    assert all(gap > 0.45 for gap in gaps), gaps  # one cooldown apart (the eta is the client's clock)


# -- with a real worker and no beat ---------------------------------------------------------------


def _worker_env(settings: Settings, broker: RedisServer) -> dict[str, str]:
    return {
        "ANALYTICS_BROKER_URL": broker.url,
        "ANALYTICS_REDIS_URL": settings.redis_dsn,
        "ANALYTICS_KEY_PREFIX": settings.analytics_key_prefix,
        "ANALYTICS_DATABASE_URL": settings.database_url,
    }


async def _rows(settings: Settings) -> int:
    return await row_count(settings.database_url)


def _tasks_received(log: str) -> int:
    return len(re.findall(r"Task flush_analytics_events\[[^\]]+\] received", log))


@pytest.mark.e2e
@pytest.mark.timeout(180)
async def test_on_the_defaults_a_few_events_arrive_within_the_max_delay(
    db_settings: Settings, broker: RedisServer, tmp_path: Path, redis_client: aioredis.Redis
) -> None:
    """Defaults everywhere (flush interval 60 s, cooldown 1 s, max delay 2 s, one worker); no beat at
    all, so nothing but the client's delayed flush can move five events far below the batch size."""
    settings = _shipped_timing(db_settings, broker)
    with celery_worker(tmp_path, _worker_env(settings, broker), beat=False) as worker:
        async with AnalyticsClient(settings) as client:
            loop = asyncio.get_running_loop()
            started = loop.time()
            for i in range(5):
                await client.track("few", user_id=str(i))
            await wait_for(lambda: _rows_are(settings, 5), timeout=20, interval=0.05, message="five rows")
            elapsed = loop.time() - started
        log = worker.log()
    # The max delay, plus a margin for the worker to start the task and drain on a busy machine.
    assert settings.analytics_max_delay - 0.1 <= elapsed < settings.analytics_max_delay + 3.0, elapsed
    assert await _requests(redis_client, settings) == {"delayed": 1}
    assert _tasks_received(log) == 1, log[-3000:]
    assert "Traceback" not in log
    for message in LOOP_ERRORS:
        assert message not in log


async def _rows_are(settings: Settings, count: int) -> bool:
    return await _rows(settings) == count


@pytest.mark.e2e
@pytest.mark.timeout(180)
async def test_a_burst_then_a_pause_the_trailing_flush_delivers_what_the_cooldown_held(
    db_settings: Settings, broker: RedisServer, tmp_path: Path, redis_client: aioredis.Redis
) -> None:
    """A burst reaches the batch size (flush now) and is stored; a second burst reaches it again
    inside the cooldown, then the producer pauses. Before the trailing edge that trigger was dropped
    and the second burst waited for beat (none here); now it lands at the cooldown's end. The max
    delay is off, so only the trailing flush can deliver it."""
    cooldown = 4.0  # long enough that the second burst surely falls inside it on a busy machine
    settings = db_settings.replace(
        broker_url=broker.url,
        analytics_backlog_trigger=True,
        analytics_backlog_trigger_cooldown=cooldown,
        analytics_max_delay=0.0,
    )
    env = {**_worker_env(settings, broker), "ANALYTICS_BACKLOG_TRIGGER_COOLDOWN": str(cooldown)}
    with celery_worker(tmp_path, env, beat=False) as worker:
        async with AnalyticsClient(settings) as client:
            loop = asyncio.get_running_loop()
            started = loop.time()
            await client.track_many([{"event_type": "first", "user_id": str(i)} for i in range(100)])
            await wait_for(lambda: _rows_are(settings, 100), timeout=30, interval=0.05, message="burst 1")
            second = loop.time()
            assert second - started < cooldown, "the machine is too slow for this test's cooldown"
            await client.track_many([{"event_type": "second", "user_id": str(i)} for i in range(100)])
            await _settled(client)
            assert await _rows(settings) == 100, "the second burst must wait for the trailing flush"
            await wait_for(lambda: _rows_are(settings, 200), timeout=30, interval=0.05, message="burst 2")
            landed = loop.time()
        log = worker.log()
    assert landed - started >= cooldown - 0.1, (landed - started, cooldown)  # at the window's end
    assert landed - started < cooldown + 3.0, (landed - started, cooldown)
    assert await _requests(redis_client, settings) == {"now": 1, "trailing": 1}
    assert _tasks_received(log) == 2, log[-3000:]
    assert "Traceback" not in log


@pytest.mark.e2e
@pytest.mark.timeout(180)
async def test_many_clients_at_once_send_at_most_one_flush_per_cooldown_and_every_event_lands(
    db_settings: Settings, broker: RedisServer, tmp_path: Path, redis_client: aioredis.Redis
) -> None:
    """Six clients push ~1,200 events/s between them for 4 s on the defaults (cooldown 1 s, max
    delay 2 s), one worker, no beat: the worker gets at most one backlog flush per cooldown (plus the
    first one) and one delayed flush per max delay, and every event is stored soon after the last."""
    settings = _shipped_timing(db_settings, broker)
    clients = [AnalyticsClient(settings) for _ in range(6)]
    with celery_worker(tmp_path, _worker_env(settings, broker), beat=False) as worker:
        loop = asyncio.get_running_loop()
        started = loop.time()
        sent = 0
        try:

            async def producer(client: AnalyticsClient) -> int:
                count = 0
                while loop.time() - started < 4.0:
                    await client.track_many([{"event_type": "many"}] * 10)
                    count += 10
                    await asyncio.sleep(0.05)
                return count

            sent = sum(await asyncio.gather(*(producer(c) for c in clients)))
            ended = loop.time()
            await _settled(*clients)
        finally:
            for client in clients:
                await client.aclose()
        await wait_for(lambda: _rows_are(settings, sent), timeout=30, interval=0.05, message="all rows")
        last = loop.time() - ended
        requests = await _requests(redis_client, settings)
        await wait_for(
            lambda: _tasks_received(worker.log()) == sum(requests.values()),
            timeout=10,
            message="the worker got every flush the clients asked for",
        )
        log = worker.log()
    elapsed = ended - started
    assert requests.get("now", 0) + requests.get("trailing", 0) <= elapsed / 1.0 + 2, requests
    assert requests.get("delayed", 0) <= elapsed / 2.0 + 2, requests
    # The last events: the trailing flush or the delayed one, whichever is due first (margin: load).
    assert last < settings.analytics_max_delay + 3.0, last
    assert "Traceback" not in log
