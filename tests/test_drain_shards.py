"""The drain over several shards on the plain Redis (issue 9, items 5 and 6): K changed live from 1 to 4
to 2 strands nothing, because every drain visits every shard of every K recorded; with K = 1 the keys,
the status output and the drain are today's."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
import redis
from click.testing import CliRunner

from analytics_sdk import Settings
from analytics_sdk._event import validate
from analytics_sdk._queue import QueueKeys, push
from analytics_sdk._topology import known_shards, producer_shards, queue_client, record_shard_count
from bridge.cli import main
from bridge.drain import drain
from tests.conftest import run_blocking
from tests.helpers import row_count


@pytest.fixture
def sharded(db_settings: Settings, redis_available: str) -> Iterator[Settings]:
    """``db_settings``; the shards' tagged keys ({prefix:i}:...) are removed afterwards too (the
    shared fixture removes ``prefix:*`` only)."""
    yield db_settings
    with redis.Redis.from_url(redis_available) as sync:
        keys = list(sync.scan_iter(match=f"{{{db_settings.analytics_key_prefix}:*", count=1000))
        if keys:
            sync.delete(*keys)


def events(count: int, tag: str) -> list[bytes]:
    return [validate({"event_type": "resharding", "user_id": f"{tag}-{i}"}).encode() for i in range(count)]


async def produce(settings: Settings, count: int, tag: str) -> list[str]:
    """A producer on ``settings``' K: records K, spreads ``count`` events over its shards round-robin
    (what the SDK's producers do); returns the event ids."""
    client = queue_client(settings)
    try:
        await record_shard_count(client, settings)
        shards = producer_shards(settings)
        payloads = events(count, tag)
        for i, keys in enumerate(shards):
            mine = payloads[i :: len(shards)]
            if mine:
                await push(client, keys, mine, settings.analytics_max_queue_size)  # type: ignore[arg-type]
    finally:
        await client.aclose()
    return [msgspec.json.decode(p)["event_id"] for p in payloads]


async def depths(settings: Settings) -> dict[str, int]:
    client = queue_client(settings)
    try:
        return {
            keys.prefix: int(await client.llen(keys.queue)) + int(await client.zcard(keys.leases))
            for keys in await known_shards(client, settings)
        }
    finally:
        await client.aclose()


async def test_changing_k_live_from_1_to_4_to_2_lands_every_event_once(sharded: Settings) -> None:
    one, four, two = (sharded.replace(analytics_queue_shards=k) for k in (1, 4, 2))
    ids = await produce(one, 30, "k1")
    ids += await produce(four, 41, "k4")  # producers deployed with K = 4 ...
    # ... while a worker still on K = 1 drains: it visits the recorded K = 4 shards as well.
    summary = await drain(one, time_budget=30)
    assert summary.claimed == 71 and summary.backlog == 0
    ids += await produce(four, 9, "k4-late")  # a producer not yet redeployed
    ids += await produce(two, 22, "k2")  # K lowered to 2
    assert sum((await depths(two)).values()) == 31
    summary = await drain(two, time_budget=30)
    assert summary.claimed == 31 and summary.inserted == 31 and summary.backlog == 0
    assert await row_count(sharded.database_url) == len(ids) == len(set(ids))
    # every queue of every K is empty, nothing left in flight
    left = await depths(two)
    assert set(left) == {
        k.prefix for k in (*producer_shards(one), *producer_shards(four), *producer_shards(two))
    }
    assert not any(left.values()), left


async def test_each_shard_keeps_its_counters_and_the_drain_its_summary_on_the_base_prefix(
    sharded: Settings,
) -> None:
    four = sharded.replace(analytics_queue_shards=4)
    await produce(four, 40, "stats")
    summary = await drain(four, time_budget=30)
    assert summary.inserted == 40
    client = queue_client(four)
    try:
        per_shard = [int(await client.hget(k.stats, "inserted") or 0) for k in producer_shards(four)]
        base: Any = await client.hgetall(QueueKeys(four.analytics_key_prefix).stats)
    finally:
        await client.aclose()
    assert sum(per_shard) == 40 and all(per_shard), per_shard  # one group per shard, counted there
    assert b"last_flush_at" in base and msgspec.json.decode(base[b"last_summary"])["inserted"] == 40


def status(settings: Settings, *args: str) -> Any:
    env = {
        "ANALYTICS_REDIS_URL": settings.redis_dsn,
        "ANALYTICS_KEY_PREFIX": settings.analytics_key_prefix,
        "ANALYTICS_DATABASE_URL": settings.database_url,
        "ANALYTICS_BACKLOG_TRIGGER": "0",
        "ANALYTICS_QUEUE_SHARDS": str(settings.analytics_queue_shards),
    }
    return CliRunner().invoke(main, ["status", *args], env=env, catch_exceptions=False)


def test_one_shard_on_a_plain_redis_shows_todays_status(sharded: Settings) -> None:
    run_blocking(produce(sharded, 3, "k1"))
    text = status(sharded).stdout
    assert re.search(r"^queue depth +3 of cap", text, re.M)
    assert not re.search(r"^shards", text, re.M), "no per-shard lines for one shard"
    data = msgspec.json.decode(status(sharded, "--json").stdout)
    assert data["queue"]["depth"] == 3
    (shard,) = data["shards"]
    assert shard["queue"] == f"{sharded.analytics_key_prefix}:events:batch"  # today's key
    assert (shard["depth"], shard["in_flight"], shard["dead_letters"]) == (3, 0, 0)


def test_status_after_k_was_raised_shows_a_line_per_shard(sharded: Settings) -> None:
    run_blocking(produce(sharded, 2, "k1"))
    four = sharded.replace(analytics_queue_shards=4)
    run_blocking(produce(four, 8, "k4"))
    data = msgspec.json.decode(status(four, "--json").stdout)
    assert data["queue"]["depth"] == 10
    by_shard = {s["shard"]: s["depth"] for s in data["shards"]}
    assert by_shard[sharded.analytics_key_prefix] == 2  # the old K = 1 queue, still visited
    assert sorted(by_shard.values()) == [2, 2, 2, 2, 2]
    text = status(four).stdout
    assert re.search(r"^shards +5 ", text, re.M), text
    for prefix in by_shard:
        assert f"  {prefix}" in text


def test_the_exporter_reports_totals_and_each_shards_queue(sharded: Settings) -> None:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from bridge.cli._metrics import make_registry

    # one shard: no per-shard family, as before
    assert "analytics_shard_queue_length" not in generate_latest(make_registry(sharded)).decode()
    four = sharded.replace(analytics_queue_shards=4)
    run_blocking(produce(four, 10, "metrics"))
    text = generate_latest(make_registry(four)).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("analytics_queue_length", ())] == 10
    per_shard = {labels: v for (name, labels), v in samples.items() if name == "analytics_shard_queue_length"}
    assert sorted(per_shard.values()) == [0, 2, 2, 3, 3]  # K = 1's queue (empty) and K = 4's
