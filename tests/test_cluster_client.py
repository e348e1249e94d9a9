"""The cluster client factories, script loading and replica acknowledgements (_redis) against real
servers: a throwaway Redis Cluster (tests/cluster.py) and, for WAIT on a plain primary, two
throwaway servers joined by REPLICAOF."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import MovedError, RedisClusterException

from analytics_sdk import Settings, _lua, _queue
from analytics_sdk._exceptions import ConfigurationError
from analytics_sdk._redis import cluster_client, load_scripts, replicated, sync_cluster_client
from analytics_sdk._shards import shard_keys
from tests.cluster import ThrowawayCluster, fresh_cluster, poll, redis_cluster  # noqa: F401 - fixtures
from tests.servers import RedisServer, primary_with_replica

SCRIPTS = [value for value in vars(_lua).values() if isinstance(value, _lua.Script)]


def prefix() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def cluster_redis(redis_cluster: ThrowawayCluster) -> AsyncIterator[RedisCluster]:  # noqa: F811
    client = cluster_client(Settings(redis_url=redis_cluster.url))
    yield client
    await client.aclose()


# -- configuration -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("redis://:s3cret@127.0.0.1:7000/2", "database 0 only"),
        ("redis://127.0.0.1:7000/0?foo=bar", "not supported"),
        ("unix:///tmp/redis.sock", "unix socket"),
    ],
)
def test_a_bad_cluster_url_is_refused_naming_the_variable(url: str, reason: str) -> None:
    with pytest.raises(ConfigurationError, match=reason) as caught:
        cluster_client(Settings(redis_url=url))
    assert "ANALYTICS_REDIS_URL" in str(caught.value)
    assert "s3cret" not in str(caught.value)


def test_the_no_retry_policy_wins_over_the_url() -> None:
    settings = Settings(
        redis_url="redis://127.0.0.1:7000/0?retry_on_timeout=true", analytics_redis_timeout=1.5
    )
    client = cluster_client(settings, startup_nodes=[("127.0.0.1", 7001), ("127.0.0.1", 7000)])
    assert client.retry.get_retries() == 0
    # the order tried: the URL's node first (nodes_manager: the same on every redis-py we support)
    assert list(client.nodes_manager.startup_nodes) == ["127.0.0.1:7000", "127.0.0.1:7001"]
    kwargs = client.get_connection_kwargs()
    assert kwargs["socket_timeout"] == 1.5
    assert kwargs["socket_connect_timeout"] == 1.5
    assert "retry_on_timeout" not in kwargs


# -- on the shared cluster ---------------------------------------------------------------------------


async def test_load_scripts_loads_every_script_on_every_node(
    redis_cluster: ThrowawayCluster,  # noqa: F811
    cluster_redis: RedisCluster,
) -> None:
    loaded = await load_scripts(cluster_redis)
    assert len(loaded) == 6
    for server in redis_cluster.servers:
        with server.client() as direct:
            assert direct.script_exists(*[script.sha for script in SCRIPTS]) == [True] * len(SCRIPTS)


async def test_replicated_counts_the_replica_of_the_shards_node(cluster_redis: RedisCluster) -> None:
    keys = shard_keys(prefix(), 6)[2]
    await _queue.push(cluster_redis, keys, [b"event"], 100)  # type: ignore[arg-type]
    assert await replicated(cluster_redis, keys, 1, 5.0) == 1
    assert await replicated(cluster_redis, keys, 0, 5.0) == 0  # nothing asked, no round trip


async def test_a_stale_client_follows_moved_but_a_multi_fails_once(
    redis_cluster: ThrowawayCluster,  # noqa: F811
    cluster_redis: RedisCluster,
) -> None:
    keys = shard_keys(prefix(), 6)[1]
    slot = key_slot(keys.queue.encode())
    home = redis_cluster.primary_for_slot(slot)
    away = next(p for p in redis_cluster.primaries() if p.port != home.port)
    await cluster_redis.initialize()  # caches home as the slot's owner

    async def empty_the_slot() -> None:
        async for key in cluster_redis.scan_iter(
            match=f"{keys.prefix}*", target_nodes=RedisCluster.PRIMARIES
        ):
            await cluster_redis.delete(key)

    try:
        redis_cluster.move_empty_slot(slot, away)
        # a script: EVALSHA gets MOVED (the server ran nothing) and is sent to the new owner
        assert (await _queue.push(cluster_redis, keys, [b"e"], 100)).length == 1  # type: ignore[arg-type]
        with away.client() as direct:
            assert direct.llen(keys.queue) == 1
        await empty_the_slot()

        redis_cluster.move_empty_slot(slot, home)
        # a MULTI: every queued command gets MOVED, EXEC aborts (nothing ran), and with no retry
        # the MovedError reaches the caller once; the caller's next attempt goes to the new owner
        with pytest.raises(MovedError):
            async with cluster_redis.pipeline(transaction=True) as multi:
                await multi.rpush(keys.queue, b"x").llen(keys.queue).execute()
        async with cluster_redis.pipeline(transaction=True) as multi:
            assert await multi.rpush(keys.queue, b"x").llen(keys.queue).execute() == [1, 1]
        with home.client() as direct:
            assert direct.llen(keys.queue) == 1
    finally:
        await empty_the_slot()
        redis_cluster.move_empty_slot(slot, home)


def test_the_sync_cluster_client_reaches_every_shard(redis_cluster: ThrowawayCluster) -> None:  # noqa: F811
    client = sync_cluster_client(Settings(redis_url=redis_cluster.url))
    try:
        assert client.retry.get_retries() == 0
        for keys in shard_keys(prefix(), 6):
            client.rpush(keys.queue, b"x")
            assert client.llen(keys.queue) == 1
    finally:
        client.close()


# -- on a cluster of the test's own (nodes are killed) -------------------------------------------------


async def test_a_new_client_connects_while_the_first_node_is_down_and_scripts_run_on_a_promoted_node(
    fresh_cluster: ThrowawayCluster,  # noqa: F811
) -> None:
    first = fresh_cluster.servers[0]
    keys = next(k for k in shard_keys(prefix(), 6) if fresh_cluster.primary_for_key(k.queue) is first)
    settings = Settings(redis_url=fresh_cluster.url)
    before = cluster_client(settings)
    try:
        await _queue.push(before, keys, [b"before"], 100)  # type: ignore[arg-type]  # PUSH cached there
    finally:
        await before.aclose()
    replica = fresh_cluster.replica_of(first)
    with replica.client() as direct:  # Redis does not replicate its script cache
        assert direct.script_exists(_lua.PUSH.sha) == [False]

    fresh_cluster.kill(first)
    promoted = fresh_cluster.wait_for_promotion(first)
    assert promoted.port == replica.port

    others = [node for node in fresh_cluster.startup_nodes if node[1] != first.port]
    alone = cluster_client(settings)  # only the dead node to start from
    # not a RedisError: redis-py's cluster errors of its own derive from Exception
    with pytest.raises(RedisClusterException, match="cannot be connected"):
        await alone.initialize()
    await alone.aclose()

    client = cluster_client(settings, startup_nodes=others)
    try:
        await client.initialize()
        # EVALSHA meets NOSCRIPT on the promoted node; Script falls back to EVAL, which caches it
        result = await _queue.push(client, keys, [b"after"], 100)  # type: ignore[arg-type]
        assert result.length == 2  # the replica had the first push
        with promoted.client() as direct:
            assert direct.script_exists(_lua.PUSH.sha) == [True]
        assert await replicated(client, keys, 1, 0.3) == 0  # its replica is the dead node
        loaded = await load_scripts(client)
        assert f"127.0.0.1:{first.port}" not in loaded
        assert f"127.0.0.1:{promoted.port}" in loaded
    finally:
        await client.aclose()


async def test_a_timed_out_command_is_not_sent_again(fresh_cluster: ThrowawayCluster) -> None:  # noqa: F811
    keys = shard_keys(prefix(), 6)[0]
    node = fresh_cluster.primary_for_key(keys.dropped)
    client = cluster_client(Settings(redis_url=fresh_cluster.url, analytics_redis_timeout=0.5))
    try:
        await client.initialize()
        assert node.process is not None
        os.kill(node.process.pid, signal.SIGSTOP)  # no answer, but the socket takes the command
        try:
            started = time.monotonic()
            with pytest.raises(redis.TimeoutError):
                await client.incr(keys.dropped)
            waited = time.monotonic() - started
        finally:
            os.kill(node.process.pid, signal.SIGCONT)  # well within the node timeout: no failover
        assert waited < 2.0  # one timeout, not one per retry
        # the stopped node runs what it had received: exactly once
        with node.client() as direct:
            assert poll("the INCR to run", lambda: direct.get(keys.dropped), 10.0) == b"1"
    finally:
        await client.aclose()


# -- WAIT on a plain primary with a replica ---------------------------------------------------------


@pytest.fixture
def primary_and_replica(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer]]:
    with primary_with_replica(tmp_path) as servers:
        yield servers


async def test_replicated_on_a_plain_primary_counts_only_replicas_holding_the_writes(
    primary_and_replica: tuple[RedisServer, RedisServer],
) -> None:
    primary, replica = primary_and_replica
    keys = shard_keys(prefix(), 1)[0]
    client = aioredis.Redis.from_url(primary.url)
    other = aioredis.Redis.from_url(primary.url, single_connection_client=True)
    try:
        await _queue.push(client, keys, [b"event"], 100)
        assert await replicated(client, keys, 1, 5.0) == 1
        await other.set(f"{keys.prefix}:other", b"1")  # another connection's earlier write...
        assert await other.wait(1, 5000) == 1

        assert replica.process is not None
        os.kill(replica.process.pid, signal.SIGSTOP)  # connected, but acknowledging nothing
        await _queue.push(client, keys, [b"unreplicated"], 100)
        # ...is why the fence: WAIT counts what its own connection wrote last, not the push
        assert await other.wait(1, 200) == 1
        assert await replicated(client, keys, 1, 0.3) == 0

        os.kill(replica.process.pid, signal.SIGCONT)
        assert await replicated(client, keys, 1, 5.0) == 1
        with replica.client() as direct:
            assert direct.llen(keys.queue) == 2
    finally:
        await other.aclose()
        await client.aclose()


async def test_replicated_waits_no_longer_than_asked(redis_client: aioredis.Redis, key_prefix: str) -> None:
    # the machine's Redis has no replica: WAIT 1 can only time out
    started = asyncio.get_running_loop().time()
    assert await replicated(redis_client, shard_keys(key_prefix, 1)[0], 1, 0.2) == 0
    assert asyncio.get_running_loop().time() - started < 2.0
