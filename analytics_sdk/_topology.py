"""Which Redis a process talks to and which shards it uses, decided from its settings in one place.

Producers push to the shards of the configured K (``ANALYTICS_QUEUE_SHARDS``) and record K in the set
``QueueKeys(prefix).shard_counts``. Drains, ``status`` and ``dead-letters`` visit the shards of every K
in that set *and* of their own K, so raising or lowering K while producers and workers run strands no
queue: a shard that held events under an old K is drained until it is empty. The set is never pruned
(a producer still on the old K may be running during a rolling deploy); an empty shard costs a drain
one round trip.
"""

from __future__ import annotations

from typing import Any

from ._keys import QueueKeys
from ._redis import AnyRedis, cluster_client, redis_client
from ._settings import Settings
from ._shards import all_shard_keys, has_hash_tag, shard_keys

__all__ = [
    "base_keys",
    "known_shards",
    "producer_shards",
    "queue_client",
    "record_shard_count",
    "trigger_keys",
]


def queue_client(
    settings: Settings, *, max_connections: int | None = None, wait: float | None = None
) -> AnyRedis:
    """The async client for the queue: redis-py's cluster client with ``ANALYTICS_REDIS_CLUSTER``,
    else a plain one; no hidden retry either way (see :mod:`._redis`). ``wait`` applies to the plain
    client's blocking pool only (the cluster client has none: past the cap a command fails at once)."""
    if settings.analytics_redis_cluster:
        return cluster_client(
            settings, startup_nodes=settings.cluster_startup_nodes, max_connections=max_connections or 100
        )
    return redis_client(settings, max_connections=max_connections, wait=wait)


def base_keys(settings: Settings) -> QueueKeys:
    """The keys that are not per shard (the shard-count set, the flush trigger's keys)."""
    return QueueKeys(settings.analytics_key_prefix)


def trigger_keys(settings: Settings) -> QueueKeys:
    """The keys of the flush trigger (:mod:`._debounce`: cooldown, delay, requests), not per shard.
    The base prefix's; on a cluster with an untagged prefix, that prefix as a hash tag (``{analytics}``):
    each of their scripts touches two of them, which must share a slot."""
    prefix = settings.analytics_key_prefix
    if settings.analytics_redis_cluster and not has_hash_tag(prefix):
        return QueueKeys("{" + prefix.replace("{", "").replace("}", "") + "}")
    return QueueKeys(prefix)


def producer_shards(settings: Settings) -> tuple[QueueKeys, ...]:
    """The shards a producer pushes to: those of the configured K, in shard order."""
    return shard_keys(
        settings.analytics_key_prefix,
        settings.analytics_queue_shards,
        cluster=settings.analytics_redis_cluster,
    )


async def record_shard_count(client: AnyRedis, settings: Settings) -> None:
    """Add this process's K to the set the drains read (idempotent; once per client connection)."""
    await client.sadd(base_keys(settings).shard_counts, settings.analytics_queue_shards)


async def known_shards(client: AnyRedis, settings: Settings) -> tuple[QueueKeys, ...]:
    """Every shard of every K ever recorded, of this process's own K, and of K = 1: what a drain visits.

    K = 1 always: a deployment from before the counts were recorded holds its queue under K = 1's
    keys (today's), and a first producer with a larger K records only its own; an empty shard costs
    one round trip."""
    recorded: Any = await client.smembers(base_keys(settings).shard_counts)
    counts = {1, settings.analytics_queue_shards} | {int(count) for count in recorded}
    return all_shard_keys(
        settings.analytics_key_prefix, sorted(counts), cluster=settings.analytics_redis_cluster
    )
