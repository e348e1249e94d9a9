"""Producers on a real Redis Cluster (tests/cluster.py: 3 primaries + 3 replicas on free ports):
pushes spread over the shards and the three primaries, get_queue_size() totals them, replica acks
pass when the replica answers and raise (event still queued) when it is frozen, and track() keeps
succeeding while a SIGKILLed primary fails over, for the async and the sync client."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import threading
import time
import uuid
from pathlib import Path

import pytest

from analytics_sdk import AnalyticsClient, PublishError, Settings, SyncAnalyticsClient
from analytics_sdk._keys import QueueKeys
from analytics_sdk._topology import producer_shards
from tests.cluster import (  # noqa: F401 - fixtures
    ThrowawayCluster,
    fresh_cluster,
    poll,
    redis_cluster,
    start_cluster,
)
from tests.servers import RedisServer


def cluster_settings(cluster: ThrowawayCluster, **changes: object) -> Settings:
    fields: dict[str, object] = {
        "redis_url": cluster.url,
        "analytics_redis_cluster": True,
        "analytics_key_prefix": f"p{uuid.uuid4().hex[:8]}",
        "analytics_backlog_trigger": False,
        "analytics_queue_shards": 6,
    }
    return Settings(**{**fields, **changes})  # type: ignore[arg-type]


def depths(cluster: ThrowawayCluster, settings: Settings) -> list[int]:
    """LLEN of each shard, asked of the primary that owns it (no cluster client in between)."""
    found = []
    for keys in producer_shards(settings):
        with cluster.primary_for_key(keys.queue).client() as direct:
            found.append(int(direct.llen(keys.queue)))
    return found


def queues_by_primary(cluster: ThrowawayCluster, settings: Settings) -> dict[int, list[bytes]]:
    base = settings.analytics_key_prefix
    return {
        port: [key for key in keys if key.endswith(b":events:batch")]
        for port, keys in cluster.keys_by_primary(f"{{{base}:*").items()
    }


async def test_six_shards_take_pushes_on_all_three_primaries(redis_cluster: ThrowawayCluster) -> None:  # noqa: F811
    settings = cluster_settings(redis_cluster)
    async with AnalyticsClient(settings) as client:
        for _ in range(60):
            await client.track("x")
        assert await client.get_queue_size() == 60
    assert depths(redis_cluster, settings) == [10] * 6
    per_primary = queues_by_primary(redis_cluster, settings)
    assert len(per_primary) == 3 and all(len(queues) == 2 for queues in per_primary.values()), per_primary
    with redis_cluster.primary_for_key(QueueKeys(settings.analytics_key_prefix).shard_counts).client() as d:
        assert d.smembers(QueueKeys(settings.analytics_key_prefix).shard_counts) == {b"6"}


def test_the_sync_client_spreads_over_the_cluster(redis_cluster: ThrowawayCluster) -> None:  # noqa: F811
    settings = cluster_settings(redis_cluster)
    with SyncAnalyticsClient(settings) as client:
        for _ in range(30):
            client.track("x")  # a lone thread: its own pushes, through the sync cluster client
        client.track_many([{"event_type": "y"}] * 6)
        assert client.get_queue_size() == 36
    assert sum(depths(redis_cluster, settings)) == 36
    assert min(depths(redis_cluster, settings)) >= 5


async def test_one_shard_on_a_cluster_with_a_tagged_prefix_keeps_todays_key(
    redis_cluster: ThrowawayCluster,  # noqa: F811
) -> None:
    settings = cluster_settings(redis_cluster, analytics_queue_shards=1)
    settings = settings.replace(analytics_key_prefix="{" + settings.analytics_key_prefix + "}")
    async with AnalyticsClient(settings) as client:
        await client.track("x")
    queue = f"{settings.analytics_key_prefix}:events:batch"
    with redis_cluster.primary_for_key(queue).client() as direct:
        assert direct.llen(queue) == 1


async def test_replica_acks_pass_when_the_replica_answers(redis_cluster: ThrowawayCluster) -> None:  # noqa: F811
    settings = cluster_settings(redis_cluster, analytics_replica_acks=1, analytics_replica_ack_timeout=1.0)
    async with AnalyticsClient(settings) as client:
        for _ in range(12):
            await client.track("x")  # every shard twice: WAIT satisfied on every primary
    with SyncAnalyticsClient(settings) as sync_client:
        for _ in range(6):
            sync_client.track("y")
    assert sum(depths(redis_cluster, settings)) == 18


def stop(server: RedisServer, sig: signal.Signals) -> None:
    assert server.process is not None
    os.kill(server.process.pid, sig)


async def test_a_frozen_replica_makes_track_raise_and_the_event_stays_queued(
    fresh_cluster: ThrowawayCluster,  # noqa: F811
) -> None:
    settings = cluster_settings(
        fresh_cluster, analytics_queue_shards=1, analytics_replica_acks=1, analytics_replica_ack_timeout=0.3
    )
    [keys] = producer_shards(settings)
    primary = fresh_cluster.primary_for_key(keys.queue)
    replica = fresh_cluster.replica_of(primary)
    async with AnalyticsClient(settings) as client:
        await client.track("replicated")
        stop(
            replica, signal.SIGSTOP
        )  # shorter than the node timeout matters not: a replica is not failed over
        try:
            with pytest.raises(PublishError, match="queued on the primary, not yet replicated") as caught:
                await client.track("unreplicated")
            assert keys.prefix in str(caught.value) and "0 of ANALYTICS_REPLICA_ACKS=1" in str(caught.value)
            with (
                SyncAnalyticsClient(settings) as sync_client,
                pytest.raises(PublishError, match="replicated"),
            ):
                sync_client.track("unreplicated, sync")
            assert await client.get_queue_size() == 3  # both queued, once each
        finally:
            stop(replica, signal.SIGCONT)
        await client.track("replicated again")
    with primary.client() as direct:
        assert direct.llen(keys.queue) == 4


async def test_track_keeps_succeeding_while_a_primary_fails_over(
    fresh_cluster: ThrowawayCluster,  # noqa: F811
) -> None:
    # Without this the other primaries answer CLUSTERDOWN from the moment the victim is marked failed
    # until its replica is promoted: the setting docs/cluster.md asks producers' clusters to use.
    for server in fresh_cluster.live():
        with server.client() as admin:
            admin.config_set("cluster-require-full-coverage", "no")
    settings = cluster_settings(fresh_cluster, analytics_publish_timeout=2.0)
    victim = fresh_cluster.primary_for_key(producer_shards(settings)[0].queue)
    stop_producing = threading.Event()
    sync_outcomes: list[bool] = []

    def sync_producer() -> None:
        with SyncAnalyticsClient(settings) as sync_client:
            while not stop_producing.is_set():
                try:
                    sync_client.track("sync")
                    sync_outcomes.append(True)
                except PublishError:
                    sync_outcomes.append(False)
                time.sleep(0.005)

    thread = threading.Thread(target=sync_producer)
    outcomes: list[bool] = []
    async with AnalyticsClient(settings) as client:
        thread.start()
        try:
            for _ in range(30):  # warm: every shard has taken pushes
                await client.track("before")
            fresh_cluster.kill(victim)
            killed_at = time.monotonic()
            promotion = asyncio.get_running_loop().run_in_executor(
                None, fresh_cluster.wait_for_promotion, victim
            )
            while not promotion.done():
                try:
                    await client.track("during")
                    outcomes.append(True)
                except PublishError:
                    outcomes.append(False)
                await asyncio.sleep(0.005)
            await promotion
            outage = time.monotonic() - killed_at
            during = len(sync_outcomes)
            # after the promotion every shard takes pushes again, from both clients
            before = depths(fresh_cluster, settings)

            async def every_shard_grew() -> bool:
                await client.track("after")
                now = depths(fresh_cluster, settings)
                return all(n > b for n, b in zip(now, before, strict=True))

            deadline = time.monotonic() + 30
            while not await every_shard_grew():
                assert time.monotonic() < deadline, "not every shard takes pushes after the promotion"
        finally:
            stop_producing.set()
            await asyncio.get_running_loop().run_in_executor(None, thread.join, 30)
    assert not thread.is_alive()
    assert outage > 1.0, "the failover was too quick to show anything"
    # Most calls during the outage (several seconds) succeeded on the other primaries' shards; the
    # failed ones were not acknowledged. Each client fails at most what one dead node held up.
    assert outcomes.count(True) > 10 * max(1, outcomes.count(False)) or outcomes.count(False) <= 3, (
        outage,
        outcomes.count(True),
        outcomes.count(False),
    )
    sync_during = sync_outcomes[:during]
    assert sync_during.count(True) > sync_during.count(False), (
        sync_during.count(True),
        sync_during.count(False),
    )
    assert sync_outcomes[-1] is True


async def test_the_docs_acl_line_for_producers_is_enough_on_a_cluster(
    redis_cluster: ThrowawayCluster,  # noqa: F811
) -> None:
    """The producers' line of docs/operations.md on every node (with the two commands docs/cluster.md
    adds for redis-py's cluster client): shards, totals, ping, replica acks
    and the sync client's own pushes run without a single denial in any node's ACL LOG."""
    page = (Path(__file__).parent.parent / "docs" / "operations.md").read_text()
    [line] = re.findall(r"^ACL SETUSER analytics-app .+$", page, re.MULTILINE)
    for server in redis_cluster.live():
        with server.client() as admin:
            # + what docs/cluster.md adds for redis-py's cluster client: topology, command table
            admin.execute_command(
                *shlex.split(line.replace(">CHANGE-ME", ">pw")), "+cluster|slots", "+command"
            )
            admin.acl_log_reset()
    host, port = redis_cluster.url.removeprefix("redis://").removesuffix("/0").split(":")
    settings = cluster_settings(redis_cluster, analytics_replica_acks=1, analytics_replica_ack_timeout=1.0)
    url = f"redis://analytics-app:pw@{host}:{port}/0"
    settings = settings.replace(redis_url=url, analytics_key_prefix="analytics")
    async with AnalyticsClient(settings) as client:
        for _ in range(6):
            await client.track("acl")
        await client.track_many([{"event_type": "acl"}] * 2)
        assert await client.get_queue_size() == 8
        assert await client.ping()
        with redis_cluster.primaries()[0].client() as admin:  # (not the default user's connections)
            assert any(c["user"] == "analytics-app" for c in admin.client_list())
    with SyncAnalyticsClient(settings) as sync_client:
        sync_client.track("acl, sync")
    for server in redis_cluster.live():
        with server.client() as admin:
            assert admin.acl_log() == [], server


async def test_a_hung_primary_costs_a_retry_on_another_node_not_a_failure(tmp_path: Path) -> None:
    """A primary that takes connections and answers nothing (SIGSTOP; a node timeout long enough
    that no failover starts): a push to one of its shards gives up on it after half of what is left
    of the deadline and goes to another node, instead of spending the whole deadline there and
    opening the breaker; for the async client and a sync client's own pushes (both running before
    the hang: a process that starts while a node hangs is another matter, see docs/cluster.md)."""
    with start_cluster(tmp_path / "cluster", node_timeout_ms=20_000) as cluster:
        for server in cluster.live():
            with server.client() as admin:
                admin.config_set("cluster-require-full-coverage", "no")
        settings = cluster_settings(cluster, analytics_publish_timeout=2.0)
        hung = cluster.primary_for_key(producer_shards(settings)[0].queue)
        outcomes: list[bool] = []

        async def track(client: AnalyticsClient | SyncAnalyticsClient) -> None:
            try:
                if isinstance(client, AnalyticsClient):
                    await client.track("during")
                else:
                    client.track("during, sync")  # a lone thread: its own pushes
                outcomes.append(True)
            except PublishError:
                outcomes.append(False)

        with SyncAnalyticsClient(settings) as sync_client:
            async with AnalyticsClient(settings) as client:
                for _ in range(12):
                    await client.track("before")
                    sync_client.track("before")
                stop(hung, signal.SIGSTOP)
                try:
                    for _ in range(12):  # each shard twice: four pushes meet the hung node first
                        await track(client)
                    assert not client._breaker.is_open
                    for _ in range(6):
                        await track(sync_client)
                finally:
                    stop(hung, signal.SIGCONT)
    assert all(outcomes), list(enumerate(outcomes))
