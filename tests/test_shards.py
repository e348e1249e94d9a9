"""The shard key scheme (_shards): today's keys for K = 1, K tags in K distinct slot ranges, and on a
real Redis Cluster (tests/cluster.py) the shards spread over every primary, every queue script run
on one shard's keys without CROSSSLOT, and the queue depths summed over the shards."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from analytics_sdk import Settings, _queue
from analytics_sdk._exceptions import ValidationError
from analytics_sdk._keys import QueueKeys
from analytics_sdk._redis import cluster_client
from analytics_sdk._shards import (
    MAX_SHARDS,
    all_shard_keys,
    has_hash_tag,
    queue_depths,
    shard_keys,
    shard_tag,
)
from tests.cluster import ThrowawayCluster, redis_cluster  # noqa: F401 - the fixture

SLOTS = 16384


def every_key(keys: QueueKeys) -> list[str]:
    """Every key name one shard uses (the per-batch ones with sample ids)."""
    return [
        keys.queue,
        keys.inflight("batch-1"),
        keys.leases,
        keys.owners,
        keys.push_guard("token-1"),
        keys.reclaims,
        keys.dead,
        keys.dropped,
        keys.stats,
        keys.flush_cooldown,
        keys.replication_fence,
    ]


def test_one_shard_on_a_plain_redis_keeps_todays_keys() -> None:
    (keys,) = shard_keys("analytics", 1)
    assert keys == QueueKeys("analytics")
    assert keys.queue == "analytics:events:batch"
    assert keys.leases == "analytics:events:inflight"
    assert keys.dead == "analytics:events:dead"
    assert keys.stats == "analytics:stats"
    # today's advice for a cluster, a tagged prefix, keeps its keys too
    assert shard_keys("{myapp}", 1, cluster=True) == (QueueKeys("{myapp}"),)


def test_one_shard_on_a_cluster_with_an_untagged_prefix_gets_a_tag() -> None:
    (keys,) = shard_keys("analytics", 1, cluster=True)
    assert keys.queue == "{analytics:0}:events:batch"
    assert len({key_slot(k.encode()) for k in every_key(keys)}) == 1


def test_six_shard_tags_fall_in_six_distinct_sixths() -> None:
    tags = [shard_tag("analytics", i, 6) for i in range(6)]
    assert len(set(tags)) == 6
    for index, tag in enumerate(tags):
        assert tag.startswith("{analytics:") and tag.endswith("}")
        assert key_slot(tag.encode()) * 6 // SLOTS == index, tag
    assert tags[0] == "{analytics:0}"  # the first candidate wins when it fits
    assert shard_keys("analytics", 6)[3].queue == f"{tags[3]}:events:batch"


@pytest.mark.parametrize("count", [2, 3, 7, 64, MAX_SHARDS])
def test_every_shard_count_spreads_one_tag_per_range(count: int) -> None:
    slots = [key_slot(shard_tag("p", i, count).encode()) for i in range(count)]
    assert [slot * count // SLOTS for slot in slots] == list(range(count))


def test_all_of_a_shards_keys_share_one_slot() -> None:
    for keys in shard_keys("analytics", 6):
        assert len({key_slot(k.encode()) for k in every_key(keys)}) == 1, keys


def test_braces_in_the_prefix_do_not_break_the_tag() -> None:
    shards = shard_keys("{myapp}", 3)
    assert [k.prefix for k in shards] == [shard_tag("myapp", i, 3) for i in range(3)]
    assert all(k.prefix.startswith("{myapp:") for k in shards)
    # each shard keeps its own slot (a brace left inside would hash every shard by "{myapp")
    assert [key_slot(k.queue.encode()) * 3 // SLOTS for k in shards] == [0, 1, 2]
    assert shard_tag("a{b}c", 0, 2) == shard_tag("abc", 0, 2)


def test_hash_tag_follows_redis_rule() -> None:
    assert has_hash_tag("{a}")
    assert has_hash_tag("x{a}y")
    assert not has_hash_tag("{}a")  # empty: Redis hashes the whole key
    assert not has_hash_tag("a{b")
    assert not has_hash_tag("analytics")


@pytest.mark.parametrize("count", [0, -1, MAX_SHARDS + 1, 1.5, True])
def test_a_bad_shard_count_is_refused_naming_it(count: object) -> None:
    with pytest.raises(ValidationError, match="count") as caught:
        shard_keys("analytics", count)  # type: ignore[arg-type]
    assert isinstance(caught.value, ValueError)
    with pytest.raises(ValidationError, match="index"):
        shard_tag("analytics", 3, 3)


def test_all_shard_keys_visits_each_queue_of_every_count_once() -> None:
    union = all_shard_keys("analytics", [1, 4, 2, 4])
    assert union[0] == QueueKeys("analytics")
    expected = {QueueKeys("analytics"), *shard_keys("analytics", 4), *shard_keys("analytics", 2)}
    assert set(union) == expected
    assert len(union) == len(expected)


# -- on a real Redis Cluster --------------------------------------------------------------------------


@pytest.fixture
async def cluster_redis(redis_cluster: ThrowawayCluster) -> AsyncIterator[RedisCluster]:  # noqa: F811
    client = cluster_client(Settings(redis_url=redis_cluster.url))
    yield client
    await client.aclose()


def fresh_prefix() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


async def test_six_shards_spread_over_all_three_primaries(
    redis_cluster: ThrowawayCluster,  # noqa: F811
    cluster_redis: RedisCluster,
) -> None:
    prefix = fresh_prefix()
    shards = shard_keys(prefix, 6)
    for keys in shards:
        await _queue.push(cluster_redis, keys, [b"event"], 100)  # type: ignore[arg-type]
    queues = {
        port: [key for key in found if key.endswith(b":events:batch")]
        for port, found in redis_cluster.keys_by_primary(f"*{prefix}*").items()
    }
    assert len(queues) == 3
    # equal slot ranges per primary: two shards each
    assert sorted(len(found) for found in queues.values()) == [2, 2, 2], queues
    found_queues = sorted(key for found in queues.values() for key in found)
    assert found_queues == sorted(k.queue.encode() for k in shards)


async def test_every_queue_script_runs_on_one_shard_of_the_cluster(cluster_redis: RedisCluster) -> None:
    client: aioredis.Redis = cluster_redis  # type: ignore[assignment]  # the queue functions take either
    keys = shard_keys(fresh_prefix(), 6)[4]
    pushed = await _queue.push(client, keys, [b"e1", b"e2", b"e3", b"e4"], 100, token="t1")
    assert pushed == _queue.PushResult(4, 0, False)
    assert (await _queue.push(client, keys, [b"e1"], 100, token="t1")).repeated

    first = await _queue.claim(client, keys, 2, "batch-a")
    assert first.items == [b"e1", b"e2"]
    assert await _queue.renew(client, keys, [first]) == [True]
    assert await _queue.release(client, keys, [first]) == 1
    due = await _queue.expired_leases(client, keys, visibility_timeout=0)
    assert [batch for batch, _ in due] == ["batch-a"]
    taken = await _queue.take_over(client, keys, "batch-a", due[0][1])
    assert taken is not None and taken.items == [b"e1", b"e2"]
    assert await _queue.split_lease(client, keys, taken, [("batch-a1", [b"e1"]), ("batch-a2", [b"e2"])])
    part_one = _queue.Claim("batch-a1", [b"e1"], 0, taken.token)
    part_two = _queue.Claim("batch-a2", [b"e2"], 0, taken.token)
    assert await _queue.mark_reclaims(client, keys, part_one, 2)

    second = await _queue.claim(client, keys, 10, "batch-b")
    assert second.items == [b"e3", b"e4"]
    dead = {"batch-a2": [_queue.dead_letter_entry(b"e2", "bad")]}
    flags = await _queue.ack(
        client, keys, [part_one, part_two, second], dead_letters=dead, stats={"inserted": 3}, summary=b"{}"
    )
    assert flags == [True, True, True]
    assert await cluster_redis.llen(keys.dead) == 1
    assert await cluster_redis.hget(keys.stats, "inserted") == b"3"
    assert await cluster_redis.zcard(keys.leases) == 0


async def test_queue_depths_total_the_shards_of_the_cluster(cluster_redis: RedisCluster) -> None:
    shards = shard_keys(fresh_prefix(), 6)
    for index, keys in enumerate(shards):
        if index:
            await _queue.push(cluster_redis, keys, [b"x"] * index, 100)  # type: ignore[arg-type]
    depths = await queue_depths(cluster_redis, shards)
    assert depths == [0, 1, 2, 3, 4, 5]
    assert await queue_depths(cluster_redis, []) == []


async def test_queue_depths_on_a_plain_redis(redis_client: aioredis.Redis, key_prefix: str) -> None:
    (plain,) = shard_keys(key_prefix, 1)
    three = shard_keys(key_prefix, 3)
    await _queue.push(redis_client, plain, [b"a", b"b"], 100)
    await _queue.push(redis_client, three[2], [b"c"], 100)
    assert await queue_depths(redis_client, [plain, *three]) == [2, 0, 0, 1]
    await redis_client.delete(*[k for keys in three for k in every_key(keys)])
