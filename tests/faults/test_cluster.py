"""End-to-end scenarios on a real Redis Cluster (issue 9, item 8), each ending with I1-I4.

A throwaway 3 + 3 cluster (tests/cluster.py), producers in several processes writing what track()
acknowledged to the ledger, two real ``celery -A bridge worker -Q analytics`` processes with their
broker on the machine's RabbitMQ (a virtual host per test), a fresh migrated database per test.
Flush tasks come from a driver thread (what beat or the backlog trigger does in production).

The kill scenarios freeze the victim's replica (SIGSTOP, under the node timeout) and cut its link
until the primary holds writes the replica never got, then SIGKILL the primary and let the replica
go: the replication lag a loaded primary has in production, made to happen on every run (without
it, loopback replication is so quick that what a kill loses is luck). With
``ANALYTICS_REPLICA_ACKS=1`` no acknowledged event may be lost; with 0 the test prints how many were.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from analytics_sdk import AnalyticsClient, PublishError, Settings
from analytics_sdk._keys import QueueKeys
from analytics_sdk._shards import shard_keys
from tests.cluster import ThrowawayCluster, fresh_cluster, redis_cluster  # noqa: F401 - fixtures
from tests.servers import RedisServer
from tests.test_rabbitmq_broker import rabbit_vhost  # noqa: F401 - the fixture

from .cluster_tools import (
    FlushDriver,
    Producers,
    backlog,
    cluster_settings,
    collect_shards,
    quiesce_shards,
    sync_client,
    wait_until,
)
from .conftest import Fleet, base_settings, new_database
from .ledger import Ledger, Outcome, collect, quiesce
from .producer import Production, produce
from .servers import PostgresServer
from .tools import db_fetchval, rows

pytestmark = pytest.mark.faults

#: Lag the kill scenarios open before the kill: replication bytes the primary holds and its replica
#: does not (a few hundred events), or as much as PAUSE_LIMIT seconds bring.
LAG_BYTES = 64_000
PAUSE_LIMIT = 0.9  # under the 1.5 s node timeout: the paused replica is never flagged as failing


def _prefix() -> str:
    return f"cl{uuid.uuid4().hex[:8]}"


def _no_crossslot(fleet: Fleet, producers: Producers, productions: list[Production]) -> None:
    """Neither a worker's whole log, nor a producer's, nor a producer's recorded errors say CROSSSLOT."""
    for where, text in (
        ("the workers' logs", "\n".join(process.log() for process in fleet.processes)),
        ("the producers' logs", "\n".join(path.read_text(errors="replace") for path in producers.log_paths)),
        ("the producers' errors", "\n".join(e for p in productions for e in p.errors)),
    ):
        at = text.find("CROSSSLOT")
        assert at < 0, f"CROSSSLOT in {where}:\n{text[max(0, at - 2000) : at + 1000]}"


def _drained_by_workers(settings: Settings, counts: tuple[int, ...] = (), timeout: float = 90.0) -> None:
    wait_until(
        "the workers to drain every shard (nothing queued, nothing leased)",
        lambda: backlog(settings, counts) == (0, 0),
        timeout,
    )


def _finish(fleet: Fleet, settings: Settings, counts: tuple[int, ...] = ()) -> tuple[dict[str, int], Outcome]:
    """Stop the workers (warm), then quiesce in this process and read the outcome over every shard."""
    for process in fleet.processes:
        process.stop()
    totals = quiesce_shards(settings, counts)
    return totals, collect_shards(settings, counts)


@dataclass
class Scene:
    """What every scenario gets: a fresh migrated database, a RabbitMQ virtual host as the broker,
    its celery processes and a folder for the producers' records and logs."""

    database: str
    broker: str
    fleet: Fleet
    directory: Path

    def on(
        self, cluster: ThrowawayCluster, shards: int, prefix: str | None = None, **changes: Any
    ) -> Settings:
        return cluster_settings(
            cluster, prefix=prefix or _prefix(), shards=shards, database_url=self.database,
            broker_url=self.broker, **changes,
        )  # fmt: skip


@pytest.fixture
def scene(pg_cluster: PostgresServer, rabbit_vhost: str, fleet: Fleet, tmp_path: Path) -> Scene:  # noqa: F811
    return Scene(new_database(pg_cluster), rabbit_vhost, fleet, tmp_path)


@pytest.mark.timeout(300)
def test_six_shards_two_workers_producer_processes(
    redis_cluster: ThrowawayCluster,  # noqa: F811
    scene: Scene,
) -> None:
    prefix = _prefix()
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
            _drained_by_workers(settings)
    finally:
        producers.close()
    totals, outcome = _finish(scene.fleet, settings)

    assert not [e for p in productions for e in p.errors], productions
    assert len(ledger.accepted) > 1_000 and not ledger.refused, ledger
    outcome.check(ledger)
    assert outcome.row_ids == ledger.accepted
    assert totals.get("inserted", 0) == 0  # the two workers stored everything, not the quiesce
    for worker in scene.fleet.processes:  # and both took part
        assert worker.count(r"flush_analytics_events\[[^\]]+\] succeeded") > 0, worker.log()[-3000:]
    _no_crossslot(scene.fleet, producers, productions)


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
            client.client_kill_filter(_type="replica")
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
            _drained_by_workers(settings)
    finally:
        producers.close()
    _, outcome = _finish(scene.fleet, settings)
    assert not [e for p in productions for e in p.errors], [p.errors[:3] for p in productions]
    assert not [h for p in productions for h in p.hung]
    _no_crossslot(scene.fleet, producers, productions)
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


def _prefix_with_distinct_shards(counts: tuple[int, ...]) -> str:
    """A prefix whose shards for each K in ``counts`` share no tag with the next K's (the same tag
    for two K is the same queue, which a switch would not need to hand over)."""
    while True:
        prefix = _prefix()
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
            _drained_by_workers(settings, counts)
    finally:
        for producers in every:
            producers.close()
    totals, outcome = _finish(scene.fleet, settings, counts)

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
    prefix = _prefix()
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


@pytest.mark.xfail(
    strict=True,
    reason="finding (producer side, left to its owner): with ANALYTICS_REPLICA_ACKS=1 the round-robin "
    "keeps handing pushes to the shards of a primary that has no replica (the one promoted after a "
    "failover); each waits ANALYTICS_REPLICA_ACK_TIMEOUT and raises PublishError, and meanwhile holds "
    "the client's one push lane. Proposed fix: treat a replica-ack shortfall like a node failure for "
    "shard choice (Shards.after_failure: skip that node's shards for a while) while still raising it "
    "for the batch that fell short.",
)
@pytest.mark.timeout(120)
def test_replica_acks_route_around_a_primary_without_a_replica(
    fresh_cluster: ThrowawayCluster,  # noqa: F811
) -> None:
    prefix = _prefix()
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
    # orphan's node, a client should stop sending it pushes that cannot be acknowledged
    assert refused <= 6, refused
