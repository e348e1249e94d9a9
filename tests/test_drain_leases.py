"""The drain's side of the lease protocol: the Redis client it makes, the stop flag of a shutting-down
worker, and acks/releases that outlast a Redis stall. Real Redis and PostgreSQL throughout."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from servers import RedisServer, start_redis

from analytics_sdk import AnalyticsClient, Settings
from analytics_sdk._queue import QueueKeys, ack, claim, dead_letter_entry, push
from analytics_sdk._redis import redis_client
from bridge import _leases, _shutdown
from bridge.drain import drain


@pytest.fixture
def stop_flag() -> Iterator[None]:
    _shutdown.arm()
    _shutdown.reset()
    yield
    _shutdown.reset()


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[RedisServer]:
    with start_redis(tmp_path) as srv:
        yield srv


@pytest.fixture
async def own_client(own_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = redis_client(Settings(redis_url=own_server.url, analytics_redis_timeout=0.5))
    yield client
    await client.aclose()


def _pause(url: str, millis: int) -> None:
    with redis.Redis.from_url(url) as admin:
        admin.execute_command("CLIENT", "PAUSE", millis, "ALL")


async def test_the_drains_client_never_retries_whatever_the_url_says(redis_available: str) -> None:
    """A script retried by redis-py is a second run: the URL's ``retry_on_timeout`` must not win."""
    client = redis_client(Settings(redis_url=f"{redis_available}?retry_on_timeout=true"))
    try:
        conn = await client.connection_pool.get_connection()
        try:
            assert conn.retry.get_retries() == 0
            assert not conn.retry_on_timeout
        finally:
            await client.connection_pool.release(conn)
    finally:
        await client.aclose()


async def test_a_stop_request_claims_nothing(
    db_settings: Settings, client: AnalyticsClient, redis_client: aioredis.Redis, stop_flag: None
) -> None:
    keys = QueueKeys(db_settings.analytics_key_prefix)
    await client.track_many([{"event_type": "x"} for _ in range(30)])
    _shutdown.request_stop()
    summary = await drain(db_settings)
    assert summary.stopped and summary.claimed == 0
    assert await redis_client.llen(keys.queue) == 30
    assert await redis_client.zcard(keys.leases) == 0


async def test_a_stop_request_mid_drain_acks_what_committed_and_releases_the_rest(
    db_settings: Settings, client: AnalyticsClient, redis_client: aioredis.Redis, stop_flag: None
) -> None:
    """The worker starts shutting down after the first transaction: the drain claims no more, the
    group it claimed ahead is released (not left to the visibility timeout), and a later drain lands
    everything exactly once."""
    keys = QueueKeys(db_settings.analytics_key_prefix)
    await client.track_many([{"event_type": "x", "user_id": str(i)} for i in range(1_000)])
    small = db_settings.replace(analytics_batch_size=50, analytics_insert_batch_size=100)
    summary = await drain(small, progress=lambda _: _shutdown.request_stop())
    assert summary.stopped
    assert summary.inserted == 100, "the transaction in hand committed and was acked"
    queued = await redis_client.llen(keys.queue)
    assert queued >= 1_000 - 300, "at most the group claimed ahead left the queue"
    scores = [score for _, score in await redis_client.zrange(keys.leases, 0, -1, withscores=True)]
    assert all(score == 0 for score in scores), "what was claimed ahead is released, due at once"
    assert await redis_client.hlen(keys.reclaims) == 0
    _shutdown.reset()
    rest = await drain(small)
    assert summary.inserted + rest.inserted == 1_000
    assert (rest.duplicates, rest.dead_lettered) == (0, 0)
    assert await redis_client.zcard(keys.leases) == 0


async def test_an_ack_outlasts_a_redis_stall(own_server: RedisServer, own_client: aioredis.Redis) -> None:
    """Redis paused for 1.5 s with a 0.5 s socket timeout: the first tries time out, a later one
    lands, and the ack is applied once."""
    keys = QueueKeys("stall")
    await push(own_client, keys, [b"a", b"b"], cap=100)
    taken = await claim(own_client, keys, 2, "b1")
    dead = {"b1": [dead_letter_entry(b"a", "bad")]}
    pauser = threading.Timer(0, _pause, args=(own_server.url, 1500))
    pauser.start()
    await asyncio.to_thread(pauser.join)
    flags = await _leases.settle("ack", lambda: ack(own_client, keys, [taken], dead_letters=dead), window=10)
    assert flags == [True]
    assert await own_client.llen(keys.dead) == 1
    assert await own_client.zcard(keys.leases) == 0
    assert await own_client.hget(keys.stats, "claimed") == b"2"


async def test_what_a_stalled_drain_could_not_ack_is_acked_by_the_next_drain(
    db_settings: Settings, redis_client: aioredis.Redis
) -> None:
    """Redis stalled past the settle window: the committed batch's ack is kept in the process and the
    next drain of the same queue finishes it first, instead of the batch waiting out its lease."""
    keys = QueueKeys(db_settings.analytics_key_prefix)
    await push(redis_client, keys, [b"x", b"y", b"z"], cap=100)
    taken = await claim(redis_client, keys, 3, "committed-before-the-stall")
    _leases.keep_unfinished_ack(keys, [taken], {}, {"inserted": 3})
    summary = await drain(db_settings)
    assert summary.claimed == 0, "nothing new was claimed; the kept ack was finished"
    assert await redis_client.zcard(keys.leases) == 0
    assert not await redis_client.exists(keys.inflight(taken.batch_id))
    assert await redis_client.hget(keys.stats, "inserted") == b"3"


async def test_what_a_stalled_drain_could_not_release_is_released_and_landed_by_the_next_drain(
    db_settings: Settings, client: AnalyticsClient, redis_client: aioredis.Redis
) -> None:
    """Without the kept release the lease would stay live for the visibility timeout (60 s here)."""
    keys = QueueKeys(db_settings.analytics_key_prefix)
    await client.track_many([{"event_type": "x"} for _ in range(3)])
    taken = await claim(redis_client, keys, 3, "claimed-when-redis-stalled")
    _leases.keep_unfinished_release(keys, [taken])
    summary = await drain(db_settings)
    assert (summary.reclaimed, summary.inserted) == (3, 3)
    assert await redis_client.zcard(keys.leases) == 0
    assert await redis_client.hlen(keys.reclaims) == 0, "a release is no death"
