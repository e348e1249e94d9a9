"""`status`'s Redis reads, shard by shard, and their totals (:func:`bridge.cli._status.collect_status`).

Each shard is read with one pipeline (its keys share one slot, so on a cluster one node answers it)
against the clock of the node that holds it: a lease's age is measured on the clock that scored it.
The shards are every shard of every K ever recorded (:func:`analytics_sdk._topology.known_shards`),
the ones the drains visit. Totals keep the fields `status` always had: depths, in-flight batches,
dead letters, drops and counters are summed, ages are the oldest of any shard, the freshest lease the
freshest of any; ``last_flush_at`` lives on the base prefix (the drain writes it once per drain).
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import redis.asyncio as aioredis

from analytics_sdk._queue import QueueKeys, redis_time
from analytics_sdk._settings import Settings
from analytics_sdk._topology import base_keys, known_shards, queue_client

__all__ = ["SHOWN_BATCHES", "ShardRead", "counters", "lease_age", "merged_batches", "read_shards", "text"]

SHOWN_BATCHES = 20  # in-flight batches listed one by one (the oldest first); all are counted
COUNTERS = ("claimed", "inserted", "duplicates", "dead")

ShardRead = dict[str, Any]


def text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def lease_age(score: float, now: float) -> float | None:
    """Seconds since a lease was last claimed, taken over or renewed; None for a lease its drain
    released (score 0: due for the next drain at once). A score ahead of Redis's clock (a lease scored
    by a host clock running fast) counts as fresh, not as a negative age."""
    if score <= 0:
        return None
    return round(max(0.0, now - score / 1000), 3)


async def _read_shard(client: aioredis.Redis, keys: QueueKeys) -> ShardRead:
    seconds, micros = await redis_time(client, keys.leases)
    now = seconds + micros / 1e6
    async with client.pipeline(transaction=False) as pipe:
        pipe.llen(keys.queue)
        pipe.lindex(keys.queue, 0)
        pipe.zcard(keys.leases)
        pipe.zrange(keys.leases, 0, SHOWN_BATCHES - 1, withscores=True)
        pipe.zrange(keys.leases, -1, -1, withscores=True)  # the highest score: ZRANGE, not ZREVRANGE (ACL)
        pipe.llen(keys.dead)
        pipe.get(keys.dropped)
        pipe.hgetall(keys.stats)
        depth, head, lease_count, leases, newest, dead, dropped, stats = await pipe.execute()
    batches = []
    if leases:
        async with client.pipeline(transaction=False) as pipe:
            for member, _ in leases:
                pipe.llen(keys.inflight(text(member) or ""))
                pipe.hget(keys.reclaims, member)
            counts = await pipe.execute()
        for i, (member, score) in enumerate(leases):
            batches.append(
                {
                    "batch_id": text(member),
                    "age_seconds": lease_age(float(score), now),
                    "released": float(score) <= 0,
                    "events": int(counts[2 * i]),
                    "reclaims": int(counts[2 * i + 1] or 0),
                }
            )
    return {
        "keys": keys,
        "now": now,
        "depth": int(depth),
        "head": head,
        "lease_count": int(lease_count),
        "batches": batches,
        "newest_age": lease_age(float(newest[0][1]), now) if newest else None,
        "dead": int(dead),
        "dropped": int(dropped or 0),
        "stats": {text(k): text(v) for k, v in stats.items()},
    }


async def read_shards(settings: Settings) -> tuple[list[ShardRead], dict[str | None, str | None]]:
    """Every known shard's figures (in shard order) and the base prefix's stats hash."""
    # The cluster client answers these commands like the plain one (see analytics_sdk._topology).
    client = cast("aioredis.Redis", queue_client(settings))
    try:
        shards = await known_shards(client, settings)
        reads = list(await asyncio.gather(*(_read_shard(client, keys) for keys in shards)))
        base = base_keys(settings)
        if base in shards:
            base_stats = reads[shards.index(base)]["stats"]
        else:
            raw: Any = await client.hgetall(base.stats)
            base_stats = {text(k): text(v) for k, v in raw.items()}
    finally:
        await client.aclose()
    return reads, base_stats


def merged_batches(reads: list[ShardRead]) -> list[dict[str, Any]]:
    """The oldest in-flight batches of all shards (released ones first, as ZRANGE orders them);
    with several shards each says which shard it is on."""
    several = len(reads) > 1
    batches = [
        {**batch, **({"shard": read["keys"].prefix} if several else {})}
        for read in reads
        for batch in read["batches"]
    ]
    batches.sort(key=lambda b: (0, 0.0) if b["age_seconds"] is None else (1, -b["age_seconds"]))
    return batches[:SHOWN_BATCHES]


def counters(reads: list[ShardRead]) -> dict[str, int]:
    return {name: sum(int(read["stats"].get(name) or 0) for read in reads) for name in COUNTERS}
