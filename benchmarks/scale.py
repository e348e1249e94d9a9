"""Section 6 (scale): the queue sharded on Redis Cluster, drains in several processes, replica acks.

Measured side by side in one run, each contender once per repeat after an untimed warm-up pass:

- producers: 256 callers on one AnalyticsClient per process, in one process and in two at once
  (spawned helpers, :mod:`benchmarks.scale_procs`), into today's single list on the machine's plain
  Redis (K = 1) and into 1 and 6 shards on a throwaway 3 + 3 Redis Cluster (``tests/cluster_nodes.py``,
  on free loopback ports). One more row runs the track section's ``ours`` at 256 callers exactly
  (default settings, one process): the K = 1 row must stay within 10 % of it. A shard's ceiling
  (raw ``MULTI RPUSH`` of 1,000 pre-encoded events on the primary that owns it) bounds what one shard
  takes whatever the producers do;
- drains: ``bridge.drain.drain()`` in one process and in two at once over the same queue (plain Redis,
  K = 1, the shipped batch sizes), into a fresh table each run;
- replica acks: track() latency on the cluster (K = 6) with ``ANALYTICS_REPLICA_ACKS=1`` against 0,
  one caller and 256.

The tiny mode (the smoke test) starts no cluster, since forming one takes about 7 s, and says so in
its notes; the quick and full modes always start one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from analytics_sdk import Settings
from analytics_sdk._event import validate
from analytics_sdk._shards import shard_keys
from tests.cluster_nodes import ClusterNodes, start_nodes

from ._common import EVENT_TYPE, FIELDS, Check, Context, Run, Section, Summary, fmt_ms, fmt_rate, fmt_ratio
from .baselines import ceiling
from .database import bench_database
from .scale_procs import Helpers, clear, produce, refill, rows

logger = logging.getLogger(__name__)

CALLERS = 256
PROCESSES = 2
SHARDS = 6
_DRAIN_CAP = 10_000_000
#: Events per drain run: the quick mode's 10,000 (section 3's) leave two processes' start-up (the
#: PostgreSQL pool, the first claims) a large share of a 0.2 s run, which says little about two drains.
DRAIN_EVENTS = {"tiny": 1_000, "quick": 40_000}


class _Scale:
    """One run of the section: the services, the helpers and the timed runs by contender name."""

    def __init__(self, ctx: Context, runner: asyncio.Runner, helpers: Helpers, cluster: ClusterNodes | None):
        self.ctx, self.runner, self.helpers, self.cluster = ctx, runner, helpers, cluster
        self.runs: dict[str, list[Run]] = {}

    def keep(self, name: str, run: Run, timed: bool) -> None:
        if timed:
            self.runs.setdefault(name, []).append(run)

    def on_cluster(self, suffix: str, **overrides: Any) -> Settings:
        assert self.cluster is not None
        others = ",".join(f"{host}:{port}" for host, port in self.cluster.startup_nodes[1:])
        return Settings(
            redis_url=self.cluster.url,
            analytics_key_prefix=f"{self.ctx.prefix}-{suffix}",
            analytics_backlog_trigger=False,
            analytics_redis_cluster=True,
            analytics_redis_cluster_nodes=others,
            **overrides,
        )

    def producers(self, timed: bool, scale: int) -> None:
        events = max(CALLERS, self.ctx.mode.track_events // scale)
        contenders = [
            ("track", self.ctx.settings("scale-track"), 1),
            ("plain/1/1p", self.ctx.settings("scale-plain", analytics_queue_shards=1), 1),
            ("plain/1/2p", self.ctx.settings("scale-plain", analytics_queue_shards=1), PROCESSES),
        ]
        if self.cluster is not None:
            for shards in (1, SHARDS):
                settings = self.on_cluster(f"scale-k{shards}", analytics_queue_shards=shards)
                contenders += [
                    (f"cluster/{shards}/1p", settings, 1),
                    (f"cluster/{shards}/2p", settings, PROCESSES),
                ]
        if scale == 1 and len(self.runs.get("track", ())) % 2:
            contenders.reverse()  # every other repeat in reverse: drift on a busy machine hits all alike
        for name, settings, processes in contenders:
            self.keep(name, self._produce(settings, events, CALLERS, processes), timed)
            clear(settings)

    def _produce(self, settings: Settings, events: int, callers: int, processes: int = 1) -> Run:
        if processes > 1:
            return self.helpers.run("produce", settings, processes, events=events, callers=callers).as_run()
        result = self.runner.run(produce(settings, events, callers))
        return Run(result["ops"], result["end"] - result["start"], result["latencies"])

    def shard_ceiling(self, timed: bool, scale: int) -> None:
        assert self.cluster is not None
        keys = shard_keys(f"{self.ctx.prefix}-scale-ceiling", SHARDS, cluster=True)[0]
        primary = self.cluster.primary_for_key(keys.queue)

        async def measure() -> Run:
            client = aioredis.Redis(host="127.0.0.1", port=primary.port)
            try:
                return await ceiling(client, keys, max(1, self.ctx.mode.ceiling_batches // scale), _DRAIN_CAP)
            finally:
                await client.delete(keys.queue)
                await client.aclose()

        self.keep("ceiling", self.runner.run(measure()), timed)

    def acks(self, timed: bool, scale: int) -> None:
        mode = self.ctx.mode
        for callers, events in ((1, mode.rtt_samples), (CALLERS, mode.track_events)):
            for acks in (0, 1):
                settings = self.on_cluster(
                    f"scale-acks{acks}", analytics_queue_shards=SHARDS, analytics_replica_acks=acks
                )
                self.keep(
                    f"acks{acks}/{callers}",
                    self._produce(settings, max(callers, events // scale), callers),
                    timed,
                )
                clear(settings)

    def drains(self, timed: bool, url: str, payloads: list[bytes]) -> None:
        settings = self.ctx.settings("scale-drain", database_url=url, analytics_max_queue_size=_DRAIN_CAP)
        for processes in (1, PROCESSES):
            self.runner.run(refill(settings, url, payloads))
            done = self.helpers.run("drain", settings, processes)
            stored = self.runner.run(rows(url))
            if done.ops != len(payloads) or stored != len(payloads):
                raise RuntimeError(
                    f"{processes} drain(s): {done.ops} inserted, {stored} rows, of {len(payloads)}"
                )
            self.keep(f"drain/{processes}p", done.as_run(), timed)


def _measure(ctx: Context) -> tuple[dict[str, Summary], bool]:
    mode = ctx.mode
    payloads = [
        validate({"event_type": EVENT_TYPE, **FIELDS, "entity_id": str(i)}).encode()
        for i in range(DRAIN_EVENTS.get(mode.name, mode.drain_events))
    ]
    directory = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    cluster = None if mode.name == "tiny" else start_nodes(ClusterNodes, directory)
    try:
        with asyncio.Runner() as runner, Helpers(PROCESSES) as helpers:
            scale = _Scale(ctx, runner, helpers, cluster)
            database = bench_database(ctx, "scale")
            url = runner.run(database.__aenter__())
            try:
                for repeat in range(mode.repeats + 1):
                    timed, factor = repeat > 0, 1 if repeat else 4  # a short warm-up pass first
                    scale.producers(timed, factor)
                    scale.drains(timed, url, payloads if timed else payloads[: max(100, len(payloads) // 4)])
                    if cluster is not None:
                        scale.shard_ceiling(timed, factor)
                        scale.acks(timed, factor)
                    logger.info("scale: repeat %s/%s done", repeat, mode.repeats)
            finally:
                runner.run(database.__aexit__(None, None, None))
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)
    return {name: Summary.of(runs) for name, runs in scale.runs.items()}, cluster is not None


def run(ctx: Context) -> Section:
    s, clustered = _measure(ctx)
    section = Section(
        f"6. scale: shards on Redis Cluster, drain processes, replica acks ({PROCESSES} processes max)",
        ["what", "contender", "events/s", "p50", "p99", "ratio"],
    )

    def row(what: str, label: str, name: str, ratio: str = "") -> None:
        it = s[name]
        section.rows.append([what, label, fmt_rate(it.rate), fmt_ms(it.p50), fmt_ms(it.p99), ratio])

    def vs(name: str, other: str, label: str) -> str:
        return f"{fmt_ratio(s[name].rate / s[other].rate)} {label}"

    row("producers", "track section's ours: 256 callers, 1 process, defaults", "track")
    row(
        "producers",
        "plain Redis, K=1 (today's one list), 1 process",
        "plain/1/1p",
        vs("plain/1/1p", "track", "of track"),
    )
    row(
        "producers",
        f"plain Redis, K=1, {PROCESSES} processes",
        "plain/1/2p",
        vs("plain/1/2p", "plain/1/1p", "of 1 process"),
    )
    if clustered:
        for processes in ("1p", "2p"):
            one, many = f"cluster/1/{processes}", f"cluster/{SHARDS}/{processes}"
            count = "1 process" if processes == "1p" else f"{PROCESSES} processes"
            row(
                "producers",
                f"cluster, 1 shard, {count}",
                one,
                vs(one, f"plain/1/{processes}", "of plain"),
            )
            row(
                "producers",
                f"cluster, {SHARDS} shards, {count}",
                many,
                vs(many, one, "of 1 shard"),
            )
        row("shard", "ceiling: raw MULTI RPUSH x1,000 on one shard's primary", "ceiling")
    drain_ratio = s[f"drain/{PROCESSES}p"].rate / s["drain/1p"].rate
    row("drain", "1 process (claims of 100, 5,000 rows per transaction)", "drain/1p")
    row(
        "drain",
        f"{PROCESSES} processes over the same queue",
        f"drain/{PROCESSES}p",
        f"{fmt_ratio(drain_ratio)} of 1",
    )
    if clustered:
        for callers in (1, CALLERS):
            off, on = s[f"acks0/{callers}"], s[f"acks1/{callers}"]
            row(
                "track()",
                f"cluster, {SHARDS} shards, {callers} caller(s), REPLICA_ACKS=0",
                f"acks0/{callers}",
            )
            ratio = f"p50 {fmt_ratio(on.p50 / off.p50)}, p99 {fmt_ratio(on.p99 / off.p99)} of 0"
            row(
                "track()",
                f"cluster, {SHARDS} shards, {callers} caller(s), REPLICA_ACKS=1",
                f"acks1/{callers}",
                ratio,
            )
    else:
        section.notes.append(
            "tiny mode: no throwaway Redis Cluster started (forming one takes ~7 s), so no cluster or "
            "replica-ack rows; --quick and the full run start one and measure them"
        )
    if clustered:
        section.notes.append(
            f"one shard's ceiling is {fmt_ratio(s['ceiling'].rate / s['cluster/1/1p'].rate)} what one "
            "producer process offers: here the producers' CPU bounds these rows, not a shard; with two "
            "processes, six Redis nodes and the producers share the cores, so the 2-process rows move "
            "with the machine's load (shards pay where Redis is the limit: its core, memory, a failover)"
        )
    section.notes.append(
        f"{PROCESSES} processes on a machine of {os.cpu_count()} cores shared with Redis (six cluster nodes "
        "too) and PostgreSQL: a ratio is what this machine gives, not what more cores would"
    )
    section.data = {name: summary.as_dict() for name, summary in s.items()}
    section.checks = [
        Check(
            "scale: K=1 plain Redis / track section's ours at 256 callers",
            s["plain/1/1p"].rate / s["track"].rate,
            0.9,
        ),
        Check(f"scale: {PROCESSES} drain processes / 1 over the same queue", drain_ratio, 1.25),
    ]
    if clustered:
        section.checks += [
            Check(
                f"scale: one producer into {SHARDS} shards / into 1 shard",
                s[f"cluster/{SHARDS}/1p"].rate / s["cluster/1/1p"].rate,
                0.9,
                note="what spreading costs a client: one push at a time, now to three nodes",
            ),
            Check(
                "scale: track() 1 caller p50, REPLICA_ACKS=1 / 0",
                s["acks1/1"].p50 / s["acks0/1"].p50,
                3.0,
                at_most=True,
                note="WAIT adds a round trip to the replica",
            ),
        ]
    return section
