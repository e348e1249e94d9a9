"""Failover scenarios on a real Redis Cluster (issue 9, item 8), each ending with I1-I4: a primary
SIGKILLed mid-production with ``ANALYTICS_REPLICA_ACKS=1`` (no acknowledged event lost) and with 0
(the loss printed and recorded as a property of the test).

The kill freezes the victim's replica (SIGSTOP, under the node timeout) and cuts its link until the
primary holds writes the replica never got, then SIGKILLs the primary and lets the replica go: the
replication lag a loaded primary has in production, made to happen on every run (without it,
loopback replication is so quick that what a kill loses is luck). Harness: :mod:`.cluster_scene`.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import pytest

from analytics_sdk import AnalyticsClient, PublishError, Settings, SyncAnalyticsClient
from analytics_sdk._shards import shard_keys
from tests.cluster import ThrowawayCluster, fresh_cluster  # noqa: F401 - the fixture
from tests.servers import RedisServer
from tests.test_rabbitmq_broker import rabbit_vhost  # noqa: F401 - the fixture scene asks for

from .cluster_scene import Scene, drained_by_workers, finish, new_prefix, no_crossslot, scene_fixture  # noqa: F401
from .cluster_tools import FlushDriver, Producers, wait_until
from .conftest import base_settings
from .ledger import Ledger, Outcome
from .producer import Production
from .tools import db_fetchval, rows

pytestmark = pytest.mark.faults

#: Lag the kill scenarios open before the kill: replication bytes the primary holds and its replica
#: does not (a few hundred events), or as much as PAUSE_LIMIT seconds bring.
LAG_BYTES = 64_000
PAUSE_LIMIT = 0.9  # under the 1.5 s node timeout: the paused replica is never flagged as failing


@contextlib.contextmanager
def _paused(server: RedisServer) -> Iterator[None]:
    """SIGSTOP ``server`` (it neither reads nor reconnects nor gossips) until the block ends."""
    assert server.process is not None
    server.process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        server.process.send_signal(signal.SIGCONT)


def _offset(primary: RedisServer) -> int:
    with primary.client() as client:
        return int(client.info("replication")["master_repl_offset"])


def _kill_behind_its_replica(cluster: ThrowawayCluster, victim: RedisServer, replica: RedisServer) -> int:
    """Freeze the replica, cut its link on the primary (what the replica had in its socket, it keeps),
    let the producers write until the primary holds LAG_BYTES the replica never got (or PAUSE_LIMIT
    passed), SIGKILL the primary, release the replica. Returns the bytes the replica missed."""
    witness = next(s for s in cluster.live() if s not in (victim, replica))
    with _paused(replica):
        with victim.client() as client:
            # "slave": the type name every redis-py we support accepts (6.1 refuses "replica")
            client.client_kill_filter(_type="slave")
        start = _offset(victim)
        with contextlib.suppress(AssertionError):  # PAUSE_LIMIT is a cap, not a failure
            behind = lambda: _offset(victim) - start >= LAG_BYTES  # noqa: E731
            wait_until("the primary to take writes its replica misses", behind, PAUSE_LIMIT, 0.02)
        missed = _offset(victim) - start
        cluster.kill(victim, via=witness)
    return missed


def _kill_a_primary_mid_production(
    cluster: ThrowawayCluster, settings: Settings, scene: Scene
) -> tuple[Ledger, list[Production], Outcome, Producers]:
    """Producers and two workers on K = 6; mid-production the primary of shard 0 is SIGKILLed after
    its replica fell behind; the replica is promoted; production goes on; the workers drain all."""
    victim = cluster.primary_for_key(shard_keys(settings.analytics_key_prefix, 6, cluster=True)[0].queue)
    replica = cluster.replica_of(victim)
    for n in (1, 2):
        scene.fleet.worker(settings, name=f"w{n}")
    producers = Producers(settings, scene.directory, processes=2, coroutines=20, duration=16.0)
    try:
        with FlushDriver(settings):
            # mid-production: events have reached PostgreSQL through the workers
            wait_until("rows from the producers", lambda: rows(settings) >= 500, 40)
            missed = _kill_behind_its_replica(cluster, victim, replica)
            print(f"killed {victim}: {missed} replication bytes its replica {replica} never got")
            promoted = cluster.wait_for_promotion(victim)
            promoted_at = datetime.now(UTC)
            assert promoted.port == replica.port, (promoted, replica)
            assert producers.running(), "production ended before the failover: lengthen it"
            ledger, productions = producers.wait(60)
            drained_by_workers(settings)
    finally:
        producers.close()
    _, outcome = finish(scene.fleet, settings)
    assert not [e for p in productions for e in p.errors], [p.errors[:3] for p in productions]
    assert not [h for p in productions for h in p.hung]
    no_crossslot(scene.fleet, producers, productions)
    # the producers carried on: events tracked after the promotion were acknowledged and stored
    later = db_fetchval(
        settings,
        "SELECT coalesce(array_agg(event_id::text), '{}') FROM analytics_events WHERE created_at > $1",
        promoted_at,
    )
    carried_on = len(ledger.accepted & {str(i) for i in later})
    print(f"acknowledged after the promotion: {carried_on} of {len(ledger.accepted)}")
    assert carried_on > 0, "no event acknowledged after the promotion"
    return ledger, productions, outcome, producers


@pytest.mark.timeout(300)
def test_primary_killed_with_replica_acks_loses_no_acknowledged_event(
    fresh_cluster: ThrowawayCluster,  # noqa: F811
    scene: Scene,
) -> None:
    settings = scene.on(fresh_cluster, 6, analytics_replica_acks=1, analytics_replica_ack_timeout=0.5)
    ledger, productions, outcome, _ = _kill_a_primary_mid_production(fresh_cluster, settings, scene)
    print(f"REPLICA_ACKS=1: {ledger!r}; refused {len(ledger.refused)} during the failover")
    # every event track() acknowledged is a row, exactly once (I1-I4)
    outcome.check(ledger)
    assert ledger.accepted <= outcome.row_ids
    assert sum(len(p.accepted) for p in productions) == len(ledger.accepted)  # no id acknowledged twice


@pytest.mark.timeout(300)
def test_primary_killed_without_replica_acks_reports_the_loss(
    fresh_cluster: ThrowawayCluster,  # noqa: F811
    scene: Scene,
    record_property: Callable[[str, object], None],
) -> None:
    settings = scene.on(fresh_cluster, 6)
    ledger, _, outcome, _ = _kill_a_primary_mid_production(fresh_cluster, settings, scene)
    lost = ledger.accepted - outcome.row_ids - set(outcome.dead_ids)
    report = f"REPLICA_ACKS=0: {len(lost)} of {len(ledger.accepted)} acknowledged events lost in the failover"
    print(report)
    record_property("lost_acknowledged_events", len(lost))
    record_property("acknowledged_events", len(ledger.accepted))
    # What was lost is the documented cost of ANALYTICS_REPLICA_ACKS=0; everything else holds I1-I4:
    # no duplicate, nothing stuck, every other acknowledged event a row.
    documented = Ledger(accepted=ledger.accepted - lost, refused=ledger.refused | lost)
    outcome.check(documented)


@pytest.mark.timeout(120)
def test_replica_acks_route_around_a_primary_without_a_replica(
    fresh_cluster: ThrowawayCluster,  # noqa: F811
) -> None:
    prefix = new_prefix()
    settings = base_settings(
        fresh_cluster.url, analytics_key_prefix=prefix, analytics_redis_cluster=True,
        analytics_redis_cluster_nodes=",".join(f"{h}:{p}" for h, p in fresh_cluster.startup_nodes[1:]),
        analytics_queue_shards=6, analytics_replica_acks=1, analytics_replica_ack_timeout=0.2,
    )  # fmt: skip
    victim = fresh_cluster.primary_for_key(shard_keys(prefix, 6, cluster=True)[0].queue)
    fresh_cluster.kill(victim)
    orphan = fresh_cluster.wait_for_promotion(victim)  # its replica, now a primary without one

    async def track_sequentially(calls: int) -> int:
        refused = 0
        async with AnalyticsClient(settings) as client:
            for _ in range(calls):
                try:
                    await client.track("after_failover")
                except PublishError:
                    refused += 1
        return refused

    refused = asyncio.run(track_sequentially(60))
    print(f"{refused} of 60 track() calls refused with {orphan} (2 of 6 shards) without a replica")
    # two other primaries with a replica each can take every push: after the first shortfall on the
    # orphan's node, the client passes that node over (_spread.UNDER_REPLICATED_PAUSE, 10 s: longer
    # than these 60 calls) instead of sending it pushes that cannot be acknowledged
    assert refused <= 6, refused

    # the sync client's own lane (one thread alone pushes from its thread) passes the node over too
    sync_refused = 0
    with SyncAnalyticsClient(settings) as sync_client:
        for _ in range(60):
            try:
                sync_client.track("after_failover_sync")
            except PublishError:
                sync_refused += 1
    assert sync_refused <= 6, sync_refused
