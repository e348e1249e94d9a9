"""The drain: claim -> decode -> insert -> ack, with reclaim, bisection and dead letters (DESIGN §3).

**Shards.** One drain visits every shard of every shard count ever recorded
(:func:`analytics_sdk._topology.known_shards`: a queue left under an old K is drained until empty),
starting at a random one so concurrent workers spread over the shards. Expired leases are taken over
on every shard first, then each shard with events is claimed from until it is empty or the budget is
spent. The work itself is :class:`bridge._shard_drain.ShardDrain`'s; each claim carries its shard's
keys, so its ack, dead letters, renewals and releases go to that shard. Each shard keeps its own
counters (``inserted``, ``duplicates``, ``dead``) in its stats hash; ``last_flush_at`` and
``last_summary`` of the whole drain go to the base prefix's stats hash (with K = 1 on a plain Redis
that is the same hash as before).

One call of :func:`drain` makes its own Redis client and asyncpg connection and closes both before it
returns, so it can run under ``asyncio.run`` in a forked Celery worker as often as needed.

Order of work:

1. Leases older than the visibility timeout are taken over first (atomically: two drains never take
   the same one), and processed one lease per transaction, so an innocent lease is never retried
   alongside a poisoned one. A lease taken over more than :data:`MAX_RECLAIMS` times killed its
   workers that often: it is split into one lease per event and tried event by event, each marked
   before it is tried, so the next crash incriminates exactly one event, which is then dead-lettered.
2. Fresh claims of ``analytics_batch_size`` events are gathered until ``analytics_insert_batch_size``
   rows are in hand (claim size and transaction size are separate knobs: the first bounds what one
   crash leaves in flight, the second sets insert throughput; :mod:`bridge._groups` takes them in
   two round trips), inserted (COPYed straight into the table, :mod:`bridge._straight`, or through
   the staging table when PostgreSQL refuses any of them), and acked together after the COMMIT, in
   one allow-oom script that also writes their dead letters and counters.

Failures (handled by :class:`bridge._writer.BatchWriter`): an event that does not decode is
dead-lettered with its reason. A data error (SQLSTATE 22/23) bisects the rows until each bad one
failed alone; those are dead-lettered with SQLSTATE and message, the rest commit. A connection error
leaves the claimed batches in flight, writes no dead letter, and propagates, so the task retries.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import Any, cast

import asyncpg
import msgspec
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from analytics_sdk._queue import QueueKeys, expired_leases, redis_time
from analytics_sdk._settings import Settings
from analytics_sdk._shards import queue_depths
from analytics_sdk._topology import base_keys, known_shards, queue_client

from ._leases import settle_unfinished
from ._shard_drain import MAX_RECLAIMS, ShardDrain
from ._writer import DrainSummary
from .store import close, connect

__all__ = ["MAX_RECLAIMS", "DrainSummary", "drain", "drain_order"]

logger = logging.getLogger(__name__)


def drain_order(shards: tuple[QueueKeys, ...]) -> list[QueueKeys]:
    """``shards`` rotated to start at a random one: concurrent drains start on different shards, and a
    drain cut short by its budget does not always leave the same shards for last."""
    start = random.randrange(len(shards)) if shards else 0
    return [*shards[start:], *shards[:start]]


async def _work(
    settings: Settings,
    redis: aioredis.Redis,
    shards: list[QueueKeys],
    deadline: float,
    progress: Callable[[DrainSummary], None] | None,
    started: list[DrainSummary],
) -> DrainSummary:
    """Reclaim on every shard, then claim from every shard that has events; PostgreSQL is connected
    only when there is work (an idle beat tick costs a few Redis commands per shard)."""
    for keys in shards:
        await settle_unfinished(redis, keys)
    timeout = settings.analytics_visibility_timeout
    # Concurrently: on a cluster the shards' nodes answer in parallel (an idle tick stays cheap).
    found_by_shard = await asyncio.gather(*(expired_leases(redis, keys, timeout) for keys in shards))
    leases = list(zip(shards, found_by_shard, strict=True))
    depths = await queue_depths(redis, shards)
    if not any(found for _, found in leases) and not any(depths):
        return DrainSummary()
    conn: asyncpg.Connection[Any] = await connect(settings)
    worker = ShardDrain(settings, redis, conn, deadline, progress)
    started.append(worker.summary)  # what the caller logs if this raises
    try:
        worker.keeper.start()
        try:
            summary = worker.summary
            for keys, found in leases:
                if found and not (summary.budget_spent or summary.stopped):
                    await worker.reclaim(keys, found)
            for keys, depth in zip(shards, depths, strict=True):
                if depth and not (summary.budget_spent or summary.stopped):
                    await worker.claim_fresh(keys)
        finally:
            await worker.keeper.stop()
    finally:
        await close(conn)
    return worker.summary


async def _record(redis: aioredis.Redis, keys: QueueKeys, summary: DrainSummary) -> None:
    """``last_flush_at`` (Redis's clock, the one `status` compares with) and ``last_summary``."""
    line = msgspec.json.encode(summary.as_dict())
    try:
        seconds, micros = await redis_time(redis, keys.stats)
        finished = seconds + micros / 1e6
        await redis.hset(keys.stats, mapping={"last_flush_at": finished, "last_summary": line})
    except ResponseError as exc:  # OOM at maxmemory: the work is done, only `status` misses it
        logger.warning("could not record the drain summary in %s: %s", keys.stats, exc)


async def drain(
    settings: Settings,
    *,
    time_budget: float | None = None,
    progress: Callable[[DrainSummary], None] | None = None,
) -> DrainSummary:
    """Drain the queue of ``settings`` (every shard) into PostgreSQL until it is empty or
    ``time_budget`` seconds (default ``analytics_drain_time_budget``) are spent; ``progress`` is
    called after every ack.

    The budget is checked between transactions: with no expired lease, even a budget of 0 moves one
    transaction's worth (``analytics_insert_batch_size`` rows) before stopping; take-overs of expired
    leases are checked before each one, so a budget of 0 takes none over. With nothing queued and no
    lease expired, PostgreSQL is not even connected to. Connection-class errors propagate after the
    claimed batches were left in flight (see :func:`bridge._errors.is_connection_error`)."""
    started = time.monotonic()
    budget = settings.analytics_drain_time_budget if time_budget is None else time_budget
    base = base_keys(settings)
    # The cluster client answers the commands the drain uses like the plain one (see _topology).
    redis = cast("aioredis.Redis", queue_client(settings))
    work: list[DrainSummary] = []
    try:
        shards = drain_order(await known_shards(redis, settings))
        summary = await _work(settings, redis, shards, started + budget, progress, work)
        summary.backlog = sum(await queue_depths(redis, shards))
        summary.seconds = time.monotonic() - started
        await _record(redis, base, summary)
    except BaseException as exc:
        done = work[0].as_dict() if work else "nothing claimed"
        logger.warning("drain of %s stopped by %r; done so far: %s", base.queue, exc, done)
        raise
    finally:
        await redis.aclose()
    # An idle beat tick is not news: INFO only when the drain moved something.
    level = logging.INFO if summary.claimed or summary.reclaimed else logging.DEBUG
    logger.log(
        level,
        # today's line, so log parsers keep working; the shard count at the end
        "drained %s: claimed=%s inserted=%s duplicates=%s dead_lettered=%s reclaimed=%s "
        "batches=%s backlog=%s in %.3fs shards=%s",
        base.queue,
        summary.claimed,
        summary.inserted,
        summary.duplicates,
        summary.dead_lettered,
        summary.reclaimed,
        summary.batches,
        summary.backlog,
        summary.seconds,
        len(shards),
    )
    return summary
