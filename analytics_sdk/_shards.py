"""The queue split into K shards, each under one Redis Cluster hash tag, spread evenly over the slots.

Redis Cluster hashes a key by its hash tag (the text between the first ``{`` and the next ``}``) to
one of 16,384 slots. Every key of one shard (queue, in-flight lists, leases, owners, reclaims, dead
letters, dropped counter, stats, push guards) carries the shard's tag, so each script and MULTI
touches one slot and CROSSSLOT cannot happen.

Which slot a tag hashes to is chance, so K arbitrary tags could land on one primary. Shard ``i`` of
``K`` therefore takes the first of the tags::

    {<base>:<i>}   {<base>:<i>.1}   {<base>:<i>.2}   ...

whose slot (CRC16, :func:`redis.crc.key_slot`) lies in the ``i``-th K-th of 0..16383: the K shards
fall in K equal slot ranges, spread over primaries that own equal ranges (what ``redis-cli --cluster
create`` and ``rebalance`` give). ``<base>`` is the key prefix with its braces removed: people set a
prefix such as ``{myapp}`` for Redis Cluster today, and a brace inside a tag would end it early
(``{{myapp}:3}`` hashes ``{myapp``, the same slot for every shard). So ``{myapp}`` gives the tags
``{myapp:0}``, ``{myapp:1}``, ...

A tag depends on K as well as ``i`` (the ranges change with K): shard 0 of 4 and shard 0 of 2 may
be different queues. Changing K live strands nothing because the drains visit the shards of every K
ever used (:func:`all_shard_keys`, recorded under ``QueueKeys(prefix).shard_counts``), and the same
tag found for two values of K is the same queue (visited once).

K = 1 keeps today's keys exactly (``analytics:events:batch``) on a plain Redis, and on a cluster
when the prefix already has a hash tag (today's advice, ``{analytics}``): no migration for anyone.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from ._exceptions import ValidationError
from ._keys import QueueKeys

__all__ = ["MAX_SHARDS", "all_shard_keys", "has_hash_tag", "queue_depths", "shard_keys", "shard_tag"]

#: At 1,024 shards each owns a 16-slot range (the tag search takes ~1,000 CRCs per shard, once); more
#: shards than that buys no spread (a cluster has far fewer primaries) and costs every drain a visit
#: per shard.
MAX_SHARDS = 1024

# CRC16 is uniform enough that the search ends after about K candidates; this bound only turns an
# impossible endless loop into an error.
_MAX_CANDIDATES = 1_000_000


def _check_count(count: int) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_SHARDS:
        raise ValidationError("count", count, f"the number of shards must be an integer in 1..{MAX_SHARDS}")


def has_hash_tag(key: str) -> bool:
    """True when Redis Cluster hashes ``key`` by a tag: a ``{`` followed later by a ``}`` with at
    least one character between them (Redis's own rule: only the first ``{`` counts)."""
    start = key.find("{")
    if start < 0:
        return False
    end = key.find("}", start + 1)
    return end > start + 1


@functools.lru_cache(maxsize=4096)
def shard_tag(prefix: str, index: int, count: int) -> str:
    """The hash tag (braces included) of shard ``index`` of ``count`` for ``prefix``: the first
    candidate whose slot lies in ``[index * 16384 // count, (index + 1) * 16384 // count)``."""
    _check_count(count)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
        raise ValidationError("index", index, f"a shard index must be in 0..{count - 1}")
    base = prefix.replace("{", "").replace("}", "")
    low = index * REDIS_CLUSTER_HASH_SLOTS // count
    high = (index + 1) * REDIS_CLUSTER_HASH_SLOTS // count
    for attempt in range(_MAX_CANDIDATES):
        tag = f"{{{base}:{index}}}" if attempt == 0 else f"{{{base}:{index}.{attempt}}}"
        if low <= key_slot(tag.encode()) < high:
            return tag
    raise RuntimeError(f"no hash tag for shard {index} of {count} in {_MAX_CANDIDATES} candidates")


def shard_keys(prefix: str, count: int, *, cluster: bool = False) -> tuple[QueueKeys, ...]:
    """The key names of each of ``count`` shards, in shard order.

    ``count == 1`` gives ``(QueueKeys(prefix),)``, today's keys, unless ``cluster`` is set and the
    prefix has no hash tag (its keys would spread over slots and CROSSSLOT): then the one shard is
    tagged like any other."""
    _check_count(count)
    if count == 1 and (not cluster or has_hash_tag(prefix)):
        return (QueueKeys(prefix),)
    return tuple(QueueKeys(shard_tag(prefix, i, count)) for i in range(count))


def all_shard_keys(prefix: str, counts: Iterable[int], *, cluster: bool = False) -> tuple[QueueKeys, ...]:
    """Every shard of every shard count in ``counts`` (the counts ever used), each queue once, in
    the order of ``counts``: what a drain must visit so a change of K strands nothing."""
    seen: dict[QueueKeys, None] = {}
    for count in counts:
        for keys in shard_keys(prefix, count, cluster=cluster):
            seen.setdefault(keys)
    return tuple(seen)


async def queue_depths(client: aioredis.Redis | RedisCluster, shards: Sequence[QueueKeys]) -> list[int]:
    """LLEN of each shard's queue, in the order given (the total is their sum).

    One pipeline: on a plain Redis one round trip; on a cluster, redis-py's (non-transactional)
    cluster pipeline groups the commands by the node that owns their slot and sends one batch per
    node concurrently (``asyncio.gather`` over the nodes), following MOVED/ASK for a command whose
    slot moved. LLEN only reads, so a re-sent one is harmless."""
    if not shards:
        return []
    pipe: Any = client.pipeline(transaction=False)
    async with pipe:
        for keys in shards:
            pipe.llen(keys.queue)
        depths = await pipe.execute()
    return [int(depth) for depth in depths]
