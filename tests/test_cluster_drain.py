"""The drain, `status` and `dead-letters` on a real Redis Cluster (tests/cluster.py) with 6 shards:
every event lands once, an expired lease on one shard is taken over, status has a line per shard,
dead letters are listed, replayed (into their own shard) and purged across shards."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from click.testing import CliRunner, Result

from analytics_sdk import Settings
from analytics_sdk._event import validate
from analytics_sdk._queue import QueueKeys, claim, claim_many, dead_letter_entry, expired_leases, push
from analytics_sdk._topology import producer_shards, queue_client, record_shard_count
from bridge.cli import main
from bridge.drain import drain
from tests.cluster import ThrowawayCluster, redis_cluster  # noqa: F401 - the fixture
from tests.conftest import run_blocking
from tests.helpers import row_count, wait_for

RABBITMQ = "amqp://guest:guest@127.0.0.1:5672//"


@pytest.fixture
def on_cluster(db_settings: Settings, redis_cluster: ThrowawayCluster) -> Iterator[Settings]:  # noqa: F811
    """This test's prefix and database, the queue on the cluster in 6 shards, RabbitMQ as broker."""
    yield db_settings.replace(
        redis_url=redis_cluster.url,
        analytics_redis_cluster=True,
        analytics_redis_cluster_nodes=",".join(f"{h}:{p}" for h, p in redis_cluster.startup_nodes),
        analytics_queue_shards=6,
        broker_url=RABBITMQ,
    )


def client_of(settings: Settings) -> aioredis.Redis:
    client: Any = queue_client(settings)  # the cluster client answers these commands alike
    return client  # type: ignore[no-any-return]


def events(count: int, tag: str) -> list[bytes]:
    return [validate({"event_type": "cluster", "user_id": f"{tag}-{i}"}).encode() for i in range(count)]


async def fill(settings: Settings, per_shard: list[int], tag: str = "e") -> None:
    """Push ``per_shard[i]`` events into shard i (recording K, as a producer does)."""
    client = client_of(settings)
    try:
        await record_shard_count(client, settings)
        for i, (keys, count) in enumerate(zip(producer_shards(settings), per_shard, strict=True)):
            if count:
                await push(client, keys, events(count, f"{tag}{i}"), settings.analytics_max_queue_size)
    finally:
        await client.aclose()


async def test_a_drain_over_six_shards_lands_every_event_once(on_cluster: Settings) -> None:
    per_shard = [120, 7, 0, 64, 1, 250]
    await fill(on_cluster, per_shard)
    summary = await drain(on_cluster, time_budget=60)
    total = sum(per_shard)
    assert (summary.claimed, summary.inserted, summary.duplicates, summary.backlog) == (total, total, 0, 0)
    assert await row_count(on_cluster.database_url) == total
    client = client_of(on_cluster)
    try:
        for keys, count in zip(producer_shards(on_cluster), per_shard, strict=True):
            assert await client.llen(keys.queue) == 0 and await client.zcard(keys.leases) == 0
            assert int(await client.hget(keys.stats, "inserted") or 0) == count  # counted on its shard
    finally:
        await client.aclose()


async def test_an_expired_lease_on_shard_3_is_taken_over(on_cluster: Settings) -> None:
    settings = on_cluster.replace(analytics_visibility_timeout=1.0, analytics_redis_timeout=0.5)
    await fill(settings, [0, 0, 0, 30, 0, 5])
    shard3 = producer_shards(settings)[3]
    client = client_of(settings)
    try:
        dead_worker = await claim(client, shard3, 10, "crashed-batch")  # a drain that died holding it
        assert len(dead_worker.items) == 10

        async def expired() -> bool:
            return bool(await expired_leases(client, shard3, settings.analytics_visibility_timeout))

        await wait_for(expired, timeout=10, message="the lease never expired by the shard node's clock")
    finally:
        await client.aclose()
    summary = await drain(settings, time_budget=60)
    assert summary.reclaimed == 10 and summary.claimed == 35
    assert await row_count(settings.database_url) == 35


def cli(settings: Settings, *args: str, input: str | None = None) -> Result:
    env = {
        "ANALYTICS_REDIS_URL": settings.redis_dsn,
        "ANALYTICS_REDIS_CLUSTER": "true",
        "ANALYTICS_REDIS_CLUSTER_NODES": settings.analytics_redis_cluster_nodes or "",
        "ANALYTICS_QUEUE_SHARDS": str(settings.analytics_queue_shards),
        "ANALYTICS_BROKER_URL": RABBITMQ,
        "ANALYTICS_KEY_PREFIX": settings.analytics_key_prefix,
        "ANALYTICS_DATABASE_URL": settings.database_url,
        "ANALYTICS_BACKLOG_TRIGGER": "0",
    }
    return CliRunner().invoke(main, list(args), env=env, input=input, catch_exceptions=False)


def test_status_shows_totals_and_a_line_per_shard(on_cluster: Settings) -> None:
    per_shard = [3, 0, 5, 0, 0, 11]
    run_blocking(fill(on_cluster, per_shard))
    result = cli(on_cluster, "status", "--json")
    assert result.exit_code == 0, result.output
    data = msgspec.json.decode(result.stdout)
    assert data["queue"]["depth"] == 19 and data["in_flight"]["batches"] == 0 and data["dead_letters"] == 0
    shards = producer_shards(on_cluster)
    assert [s["shard"] for s in data["shards"]][-6:] == [k.prefix for k in shards]
    assert {s["shard"]: s["depth"] for s in data["shards"]} == {
        **{s["shard"]: 0 for s in data["shards"]},  # K = 1's shard is visited too (empty)
        **{k.prefix: n for k, n in zip(shards, per_shard, strict=True)},
    }
    text = cli(on_cluster, "status").stdout
    assert re.search(r"^queue depth +19 of cap", text, re.M), text
    for keys, count in zip(shards, per_shard, strict=True):
        assert re.search(rf"^ +{re.escape(keys.prefix)} +depth {count},", text, re.M), text
    flushed = cli(on_cluster, "flush", "--json")
    assert flushed.exit_code == 0, flushed.output
    assert msgspec.json.decode(flushed.stdout)["inserted"] == 19
    assert cli(on_cluster, "status", "--check").exit_code == 0


def test_dead_letters_are_listed_replayed_and_purged_across_shards(on_cluster: Settings) -> None:
    shards = producer_shards(on_cluster)
    good = validate({"event_type": "signup", "user_id": "7"})

    async def set_up() -> None:
        client = client_of(on_cluster)
        try:
            await record_shard_count(client, on_cluster)
            await client.rpush(shards[1].dead, dead_letter_entry(b"not json", "payload: is not JSON"))
            await client.rpush(shards[4].dead, dead_letter_entry(good.encode(), "over the limit"))
            await client.rpush(shards[4].dead, dead_letter_entry(b"{}", "event_type: missing"))
        finally:
            await client.aclose()

    run_blocking(set_up())
    listed = cli(on_cluster, "dead-letters", "list", "--json")
    data = msgspec.json.decode(listed.stdout)
    assert data["total"] == 3
    assert [e["shard"] for e in data["entries"]] == [shards[1].prefix, shards[4].prefix, shards[4].prefix]
    assert "3 dead letter(s) in" in cli(on_cluster, "dead-letters", "list").stdout

    replayed = msgspec.json.decode(cli(on_cluster, "dead-letters", "replay", "--json").stdout)
    assert (replayed["examined"], replayed["requeued"], replayed["kept"]) == (3, 1, 2)

    async def queued() -> list[tuple[int, int]]:
        client = client_of(on_cluster)
        try:
            return [(int(await client.llen(k.queue)), int(await client.llen(k.dead))) for k in shards]
        finally:
            await client.aclose()

    # the good one went back into shard 4's queue, where it was dead-lettered
    assert run_blocking(queued()) == [(0, 0), (0, 1), (0, 0), (0, 0), (1, 1), (0, 0)]
    refused = cli(on_cluster, "dead-letters", "purge", input="n\n")
    assert refused.exit_code == 1 and "Delete 2 dead letter(s)" in refused.output
    purged = cli(on_cluster, "dead-letters", "purge", "--yes")
    assert purged.exit_code == 0 and "purged 2" in purged.stdout
    assert run_blocking(queued()) == [(0, 0), (0, 0), (0, 0), (0, 0), (1, 0), (0, 0)]


def test_keys_of_the_drain_stay_in_their_shards_slot(on_cluster: Settings) -> None:
    """No key of any shard lands outside its tag (what would make CROSSSLOT possible)."""
    for keys in producer_shards(on_cluster):
        assert isinstance(keys, QueueKeys) and keys.prefix.startswith("{") and keys.prefix.endswith("}")


async def test_claim_many_on_a_node_without_the_scripts_falls_back(on_cluster: Settings) -> None:
    """A primary that has no scripts (restarted, or a replica promoted before it was warmed up):
    the claims' EVALSHA pipeline meets NOSCRIPT and each claim is sent with its body instead."""
    await fill(on_cluster, [0, 0, 25, 0, 0, 0])
    shard = producer_shards(on_cluster)[2]
    client: Any = queue_client(on_cluster)
    try:
        await client.initialize()
        await client.execute_command("SCRIPT FLUSH", target_nodes=client.get_node_from_key(shard.queue))
        claims = await claim_many(client, shard, 10, [(f"b{i}", f"t{i}") for i in range(3)])
    finally:
        await client.aclose()
    assert [len(c.items) for c in claims] == [10, 10, 5]
    assert all(c.keys == shard for c in claims)
