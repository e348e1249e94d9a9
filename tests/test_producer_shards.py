"""Producers and shards on a plain Redis (issue 9 items 3-5): K = 1 keeps today's key, K shards take
pushes round-robin, get_queue_size() totals them, the backlog trigger estimates the whole queue, and
ANALYTICS_REPLICA_ACKS waits for a real replica (two throwaway servers joined by REPLICAOF) and
raises PublishError when it is frozen, with the event still queued. The cluster's side is in
tests/test_producer_cluster.py."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from analytics_sdk import AnalyticsClient, PublishError, Settings, SyncAnalyticsClient
from analytics_sdk._keys import QueueKeys
from analytics_sdk._topology import producer_shards
from tests.helpers import wait_for
from tests.servers import RedisServer, primary_with_replica, start_redis


@pytest.fixture
def shard_cleanup(sync_redis: redis.Redis, key_prefix: str) -> Iterator[None]:
    """Shard keys start with a brace ({prefix:i}): the conftest's prefix cleanup does not see them."""
    yield
    for key in sync_redis.scan_iter(match=f"{{{key_prefix}*", count=1000):
        sync_redis.delete(key)


def depths(admin: redis.Redis, settings: Settings) -> list[int]:
    return [int(admin.llen(keys.queue)) for keys in producer_shards(settings)]


async def test_one_shard_on_a_plain_redis_pushes_to_todays_key(
    settings: Settings, sync_redis: redis.Redis
) -> None:
    async with AnalyticsClient(settings) as client:
        await client.track("x")
        await client.track_many([{"event_type": "y"}] * 2)
        assert await client.get_queue_size() == 3
    prefix = settings.analytics_key_prefix
    assert sync_redis.llen(f"{prefix}:events:batch") == 3
    assert sync_redis.smembers(QueueKeys(prefix).shard_counts) == {b"1"}  # recorded for the drains


async def test_k_shards_take_pushes_round_robin_and_the_size_is_their_total(
    settings: Settings, sync_redis: redis.Redis, shard_cleanup: None
) -> None:
    sharded = settings.replace(analytics_queue_shards=6)
    async with AnalyticsClient(sharded) as client:
        for _ in range(60):
            await client.track("x")  # one at a time: one push each
        assert await client.get_queue_size() == 60
    assert depths(sync_redis, sharded) == [10] * 6
    assert sync_redis.llen(QueueKeys(settings.analytics_key_prefix).queue) == 0
    assert sync_redis.smembers(QueueKeys(settings.analytics_key_prefix).shard_counts) == {b"6"}


def test_the_sync_client_spreads_its_own_pushes_too(
    settings: Settings, sync_redis: redis.Redis, shard_cleanup: None
) -> None:
    sharded = settings.replace(analytics_queue_shards=4)
    with SyncAnalyticsClient(sharded) as client:
        for _ in range(40):
            client.track("x")  # a lone thread: the direct lane
        assert client.get_queue_size() == 40
    assert depths(sync_redis, sharded) == [10] * 4
    # recorded for the drains although the loop itself never pushed
    assert sync_redis.smembers(QueueKeys(settings.analytics_key_prefix).shard_counts) == {b"4"}


async def test_clients_start_at_random_shards(settings: Settings, shard_cleanup: None) -> None:
    sharded = settings.replace(analytics_queue_shards=8)
    starts = set()
    for _ in range(20):
        client = AnalyticsClient(sharded)
        starts.add(client._shards.take())
        await client.aclose()
    assert len(starts) > 1, "20 clients all started on one shard: many processes would pile on it"


async def test_the_backlog_trigger_estimates_the_whole_queue_from_one_shard(
    settings: Settings, sync_redis: redis.Redis, shard_cleanup: None, tmp_path: Path
) -> None:
    with start_redis(tmp_path / "broker") as broker:
        sharded = settings.replace(
            broker_url=broker.url,
            analytics_queue_shards=4,
            analytics_backlog_trigger=True,
            analytics_batch_size=8,
            analytics_backlog_trigger_cooldown=30.0,
            analytics_max_delay=0.0,
        )
        requests = QueueKeys(settings.analytics_key_prefix).flush_requests  # the base prefix's
        async with AnalyticsClient(sharded) as client:
            for _ in range(4):  # every shard at 1: 4 x 1 < 8
                await client.track("x")
            await wait_for(lambda: not client._background, timeout=10, message="trigger still running")
            assert not sync_redis.exists(requests)
            for _ in range(4):  # every shard at 2: 2 x 4 reaches 8, with 8 events queued
                await client.track("x")
            await wait_for(lambda: not client._background, timeout=10, message="trigger still running")
        assert sync_redis.hget(requests, "now") == b"1"


# -- replica acknowledgements on a plain primary ----------------------------------------------------


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer]]:
    with primary_with_replica(tmp_path) as servers:
        yield servers


def acked(server: RedisServer, shards: int = 1) -> Settings:
    return Settings(
        redis_url=server.url,
        analytics_key_prefix="acks",
        analytics_backlog_trigger=False,
        analytics_queue_shards=shards,
        analytics_replica_acks=1,
        analytics_replica_ack_timeout=0.3,
    )


def freeze(server: RedisServer) -> None:
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)  # connected, acknowledging nothing


def thaw(server: RedisServer) -> None:
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGCONT)


async def test_replica_acks_wait_for_the_replica_and_say_when_it_did_not_answer(
    pair: tuple[RedisServer, RedisServer],
) -> None:
    primary, replica = pair
    settings = acked(primary, shards=2)
    async with AnalyticsClient(settings) as client:
        await client.track("replicated")
        with replica.client() as direct:
            assert sum(int(direct.llen(keys.queue)) for keys in producer_shards(settings)) == 1
        freeze(replica)
        try:
            started = time.monotonic()
            with pytest.raises(PublishError, match="queued on the primary, not yet replicated") as caught:
                await client.track("unreplicated")
            assert time.monotonic() - started < settings.analytics_publish_timeout + 1.0
            assert "0 of ANALYTICS_REPLICA_ACKS=1" in str(caught.value)
            assert "shard '{acks:" in str(caught.value)
            assert await client.get_queue_size() == 2  # it IS queued, once (not retried)
        finally:
            thaw(replica)
        await client.track("replicated again")  # the breaker did not open
    with primary.client() as admin:
        assert sum(depths(admin, settings)) == 3


def test_the_sync_clients_own_push_waits_for_the_replica_too(pair: tuple[RedisServer, RedisServer]) -> None:
    primary, replica = pair
    settings = acked(primary)
    with SyncAnalyticsClient(settings) as client:
        client.track("replicated")
        freeze(replica)
        try:
            with pytest.raises(PublishError, match="not yet replicated") as caught:
                client.track("unreplicated")
            assert "shard 'acks'" in str(caught.value)
            assert client.get_queue_size() == 2
        finally:
            thaw(replica)
        client.track("replicated again")
    with primary.client() as admin:
        assert admin.llen("acks:events:batch") == 3  # K = 1 on a plain Redis: today's key
