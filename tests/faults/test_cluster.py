"""End-to-end scenarios on a real Redis Cluster (issue 9, item 8), each ending with I1-I4.

A throwaway 3 + 3 cluster (tests/cluster.py), producers in several processes writing what track()
acknowledged to the ledger, two real ``celery -A bridge worker -Q analytics`` processes with their
broker on the machine's RabbitMQ (a virtual host per test), a fresh migrated database per test
(:mod:`.cluster_scene`). Flush tasks come from a driver thread (what beat or the backlog trigger does
in production). The failover scenarios are in :mod:`.test_cluster_failover`.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest
import redis

from analytics_sdk import Settings
from analytics_sdk._keys import QueueKeys
from analytics_sdk._shards import shard_keys
from tests.cluster import ThrowawayCluster, redis_cluster  # noqa: F401 - the fixture
from tests.servers import RedisServer
from tests.test_rabbitmq_broker import rabbit_vhost  # noqa: F401 - the fixture scene asks for

from .cluster_scene import Scene, drained_by_workers, finish, new_prefix, no_crossslot, scene_fixture  # noqa: F401
from .cluster_tools import FlushDriver, Producers, backlog, sync_client, wait_until
from .conftest import base_settings
from .ledger import Ledger, collect, quiesce
from .producer import produce
from .tools import rows

pytestmark = pytest.mark.faults


@pytest.mark.timeout(300)
def test_six_shards_two_workers_producer_processes(
    redis_cluster: ThrowawayCluster,  # noqa: F811
    scene: Scene,
) -> None:
    prefix = new_prefix()
    settings = scene.on(redis_cluster, 6, prefix)
    # The six tags fall in six slot ranges: two shards on each of the three primaries.
    owners = [redis_cluster.primary_for_key(keys.queue).port for keys in shard_keys(prefix, 6, cluster=True)]
    assert sorted(owners.count(port) for port in set(owners)) == [2, 2, 2], owners

    for n in (1, 2):
        scene.fleet.worker(settings, name=f"w{n}")
    producers = Producers(settings, scene.directory, processes=3, coroutines=20, duration=8.0)
    seen: set[int] = set()

    def queues_on_every_primary() -> bool:
        for port, keys in redis_cluster.keys_by_primary(f"{{{prefix}:*}}:events:batch").items():
            if keys:
                seen.add(port)
        return len(seen) == 3

    try:
        with FlushDriver(settings):
            wait_until(
                "our shards' queues on all three primaries, during production", queues_on_every_primary, 30
            )
            ledger, productions = producers.wait(60)
            drained_by_workers(settings)
    finally:
        producers.close()
    totals, outcome = finish(scene.fleet, settings)

    assert not [e for p in productions for e in p.errors], productions
    assert len(ledger.accepted) > 1_000 and not ledger.refused, ledger
    outcome.check(ledger)
    assert outcome.row_ids == ledger.accepted
    assert totals.get("inserted", 0) == 0  # the two workers stored everything, not the quiesce
    for worker in scene.fleet.processes:  # and both took part
        assert worker.count(r"flush_analytics_events\[[^\]]+\] succeeded") > 0, worker.log()[-3000:]
    no_crossslot(scene.fleet, producers, productions)


def _prefix_with_distinct_shards(counts: tuple[int, ...]) -> str:
    """A prefix whose shards for each K in ``counts`` share no tag with the next K's (the same tag
    for two K is the same queue, which a switch would not need to hand over)."""
    while True:
        prefix = new_prefix()
        shards = [set(shard_keys(prefix, k, cluster=True)) for k in counts]
        if all(not (a & b) for a, b in itertools.pairwise(shards)):
            return prefix


@pytest.mark.timeout(300)
def test_shards_raised_and_lowered_live(
    redis_cluster: ThrowawayCluster,  # noqa: F811
    scene: Scene,
) -> None:
    """K = 1 -> 4 -> 2 while producing and draining, as an operator rolls it out: producers on the
    new K start, the old ones finish, the workers restart one by one on the new K. Flushes are held
    back during each switch, so the old K's shards hold a backlog when the new-K workers take over:
    they must drain it (they visit every K recorded), and nothing may be lost or stay queued."""
    counts = (1, 4, 2)
    prefix = _prefix_with_distinct_shards(counts)
    settings = scene.on(redis_cluster, 1, prefix)
    ledger, productions = Ledger(), []
    workers = [scene.fleet.worker(settings, name=f"k1w{n}") for n in (1, 2)]
    current = Producers(settings, scene.directory, processes=2, coroutines=10, duration=5.0, name="k1p")
    every = [current]
    left_over: dict[int, int] = {}
    try:
        with FlushDriver(settings) as driver:
            for shards in counts[1:]:
                stored = rows(settings)
                wait_until("producing and draining", lambda: rows(settings) >= stored + 300, 40)
                new = settings.replace(analytics_queue_shards=shards)
                with driver.paused():
                    upcoming = Producers(
                        new, scene.directory, processes=2, coroutines=10, duration=5.0, name=f"k{shards}p"
                    )
                    every.append(upcoming)
                    more, produced = current.wait(60)
                    ledger.merge(more)
                    productions += produced
                    for n, worker in enumerate(list(workers)):  # a rolling restart onto the new K
                        worker.stop()
                        workers[n] = scene.fleet.worker(new, name=f"k{shards}w{n + 1}")
                    left_over[settings.analytics_queue_shards] = _queued_on(settings)
                settings, current = new, upcoming
            more, produced = current.wait(60)
            ledger.merge(more)
            productions += produced
            drained_by_workers(settings, counts)
    finally:
        for producers in every:
            producers.close()
    totals, outcome = finish(scene.fleet, settings, counts)

    with sync_client(settings) as client:
        recorded: Any = client.smembers(QueueKeys(prefix).shard_counts)
    assert {int(k) for k in recorded} == set(counts)
    print(f"K 1 -> 4 -> 2: {ledger!r}; events on the old K's shards when its workers left: {left_over}")
    assert all(left_over.values()), f"no backlog on an old K at a switch: {left_over}"
    assert not [e for p in productions for e in p.errors]
    outcome.check(ledger)
    assert ledger.accepted <= outcome.row_ids
    assert totals.get("inserted", 0) == 0  # the K = 2 workers drained the K = 1 and K = 4 shards


def _queued_on(settings: Settings) -> int:
    """Events queued on the shards of the settings' K."""
    shards = shard_keys(settings.analytics_key_prefix, settings.analytics_queue_shards, cluster=True)
    with sync_client(settings) as client:
        c: Any = client
        return sum(int(c.llen(keys.queue)) for keys in shards)


@pytest.mark.timeout(180)
def test_one_shard_on_a_plain_redis_keeps_the_key_names(fault_redis: RedisServer, scene: Scene) -> None:
    prefix = new_prefix()
    settings = base_settings(
        fault_redis.url, analytics_key_prefix=prefix, analytics_queue_shards=1,
        database_url=scene.database, broker_url=scene.broker,
    )  # fmt: skip
    production = asyncio.run(produce(settings, coroutines=10, events=50))
    ledger = Ledger(accepted=set(production.accepted), refused=set(production.refused))
    assert len(ledger.accepted) == 500 and not ledger.refused
    with redis.Redis.from_url(settings.redis_dsn) as client:
        names = {k.decode() for k in client.scan_iter(match="*", count=1000)}
        queued = int(client.llen(f"{prefix}:events:batch"))
    # today's one list, by its old name, holds every event; no key was tagged for a shard
    assert queued == 500, names
    assert all(name.startswith(f"{prefix}:") and "{" not in name for name in names), names

    scene.fleet.worker(settings)
    with FlushDriver(settings):
        wait_until("the worker to drain the list", lambda: backlog(settings) == (0, 0), 60)
    scene.fleet.processes[0].stop()
    totals = asyncio.run(quiesce(settings))
    outcome = asyncio.run(collect(settings))
    outcome.check(ledger)
    assert outcome.row_ids == ledger.accepted and totals.get("inserted", 0) == 0
    with redis.Redis.from_url(settings.redis_dsn) as client:
        names = {k.decode() for k in client.scan_iter(match="*", count=1000)}
    assert f"{prefix}:stats" in names and all("{" not in name for name in names), names
