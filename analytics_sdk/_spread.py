"""Which shard a producer's push goes to, where a failed push goes next, and replica acknowledgement.

Each push (one group-commit batch, or a thread's own push) goes to ONE shard. :class:`Shards` hands
them out round-robin from a random start, so one client spreads its pushes evenly over the K shards
and many client processes do not all begin on shard 0. A push that failed because its shard's node
did not answer (:data:`NODE_DOWN`: a connection error, a timeout, CLUSTERDOWN, TRYAGAIN, a MOVED loop
during a failover, a slot not covered; several of redis-py's cluster errors are not ``RedisError``)
is retried on the next shard that the client's slot map puts on *another* node, so ``track()``
succeeds while any primary is up. The retry keeps the batch's push token, but the guard that makes a
retry a no-op lives in the first shard's slot: a push that ran there and whose reply was lost is
queued again on the other shard. The sink's ``ON CONFLICT (event_id)`` makes the two copies one row.

With ``ANALYTICS_REPLICA_ACKS=N`` a push is acknowledged to its callers only once N replicas of the
node that took it hold it (:func:`._redis.replicated`: WAIT). Fewer within
``ANALYTICS_REPLICA_ACK_TIMEOUT``: :class:`PublishError` ("queued on the primary, not yet
replicated"); such a push is never retried (it *is* queued; a retry would only queue it twice).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import redis.cluster
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.exceptions import (
    AskError,
    AuthenticationError,
    ClusterError,
    RedisClusterException,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ._exceptions import PublishError
from ._keys import QueueKeys
from ._redis import AnyRedis, replicated
from ._settings import Settings
from ._topology import record_shard_count

if TYPE_CHECKING:  # _breaker imports this module
    from ._breaker import Breaker

__all__ = ["NODE_DOWN", "Shards", "answers", "not_replicated", "ready", "replica_acks"]

logger = logging.getLogger(__name__)

#: A push that failed with one of these was (probably) not run, or its node is failing over: retry it
#: on another shard. ``AuthenticationError`` (a ConnectionError) is caught before: retrying cannot help.
#: ClusterError: CLUSTERDOWN, MASTERDOWN; AskError: MovedError too (a redirection loop in a failover);
#: RedisClusterException: no node reachable, SlotNotCoveredError (plain Exceptions in redis-py).
NODE_DOWN: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    ClusterError,
    TryAgainError,
    AskError,
    RedisClusterException,
)


#: Seconds a node whose replicas did not acknowledge a push (ANALYTICS_REPLICA_ACKS) is passed over:
#: a primary just promoted has no replica of its own until one is attached, and every push sent to it
#: would wait the ack timeout and fail; its shards are skipped for this long, then tried again.
UNDER_REPLICATED_PAUSE = 10.0


class Shards:
    """The shards of one producer, handed out round-robin from a random start, passing over a
    cluster node that fell short of ``ANALYTICS_REPLICA_ACKS`` for a while; also remembers whether
    this producer's K has been recorded for the drains (:func:`._topology.record_shard_count`)."""

    def __init__(self, shards: Sequence[QueueKeys], settings: Settings) -> None:
        self.keys = tuple(shards)
        self._settings = settings
        self._next = random.randrange(len(self.keys))
        self.recorded = False
        self._passed_over: dict[str, float] = {}  # node name -> time.monotonic() it is tried again
        # ANALYTICS_MAX_QUEUE_SIZE bounds the whole queue: each shard trims at its share (K = 1: all)
        self.cap = -(-settings.analytics_max_queue_size // len(self.keys))

    def take(self, client: object = None) -> int:
        """The index of the shard for the next push (on a cluster, not on a node passed over while
        another node's shard is there to take it)."""
        index = self._next
        self._next = (index + 1) % len(self.keys)
        if not self._passed_over or not isinstance(client, (AsyncRedisCluster, redis.cluster.RedisCluster)):
            return index
        now = time.monotonic()
        self._passed_over = {name: until for name, until in self._passed_over.items() if until > now}
        count = len(self.keys)
        for step in range(count):
            candidate = (index + step) % count
            if _node_name(client, self.keys[candidate]) not in self._passed_over:
                return candidate
        return index  # every node fell short: this one, as any

    def under_replicated(self, client: object, index: int) -> None:
        """``index``'s node took a push but too few replicas acknowledged it: pass over that node's
        shards for :data:`UNDER_REPLICATED_PAUSE` seconds (a plain Redis has one node: nothing to do)."""
        if isinstance(client, (AsyncRedisCluster, redis.cluster.RedisCluster)):
            name = _node_name(client, self.keys[index])
            if name is not None:
                self._passed_over[name] = time.monotonic() + UNDER_REPLICATED_PAUSE

    def after_failure(self, client: object, failed: int) -> int:
        """The shard to retry a push on after ``failed``'s node did not answer: the next one (in
        round-robin order) that the cluster client's slot map puts on another node; the next one
        when that cannot be told (a plain Redis, or a slot map being re-read)."""
        count = len(self.keys)
        following = [(failed + step) % count for step in range(1, count + 1)]
        if isinstance(client, (AsyncRedisCluster, redis.cluster.RedisCluster)):  # async or sync
            down = _node_name(client, self.keys[failed])
            if down is not None:
                for index in following:
                    name = _node_name(client, self.keys[index])
                    if name is not None and name != down:
                        return index
        return following[0]

    def forget(self) -> None:
        """A new connection (after a fork): record K again on it."""
        self.recorded = False

    async def record(self, client: AnyRedis) -> None:
        """Add K to the drains' set, once per client connection; a failure is logged and retried
        with a later push (never the push's failure: its events are what matter)."""
        try:
            await record_shard_count(client, self._settings)
        except (RedisConnectionError, RedisTimeoutError, OSError, RedisClusterException, ClusterError) as exc:
            logger.debug("could not record the shard count yet (retried later): %r", exc)
            return
        except RedisError as exc:  # an answer (an ACL denial): asking again would be refused again
            logger.warning(
                "could not record ANALYTICS_QUEUE_SHARDS=%s for the drains (%s): grant SADD on %s, or "
                "drains that use another K may not visit these shards",
                self._settings.analytics_queue_shards,
                exc,
                QueueKeys(self._settings.analytics_key_prefix).shard_counts,
            )
        self.recorded = True


def _node_name(client: AsyncRedisCluster | redis.cluster.RedisCluster, keys: QueueKeys) -> str | None:
    """The node the client's slot map puts ``keys``'s shard on, or None when it cannot tell."""
    try:
        node = client.get_node_from_key(keys.queue)
    except Exception:
        return None
    return None if node is None else str(node.name)


def not_replicated(keys: QueueKeys, events: int, acked: int, wanted: int, wait_for: float) -> PublishError:
    """The error of a push that its primary took but fewer than ``wanted`` replicas acknowledged."""
    return PublishError(
        f"queued on the primary, not yet replicated: {events} event(s) on shard {keys.prefix!r}, "
        f"{acked} of ANALYTICS_REPLICA_ACKS={wanted} replica(s) acknowledged within "
        f"ANALYTICS_REPLICA_ACK_TIMEOUT={wait_for}s (a failover now could lose them)"
    )


async def replica_acks(client: AnyRedis, keys: QueueKeys, events: int, settings: Settings) -> None:
    """Return once ``ANALYTICS_REPLICA_ACKS`` replicas of ``keys``'s node hold every write made there
    so far (this push included); else raise :class:`PublishError`. A no-op with 0."""
    wanted = settings.analytics_replica_acks
    if wanted <= 0:
        return
    wait_for = settings.analytics_replica_ack_timeout
    try:
        # WAIT's own timeout ends it server-side; this bound covers a primary that stops answering.
        async with asyncio.timeout(wait_for + settings.analytics_redis_timeout):
            acked = await replicated(client, keys, wanted, wait_for)
    except AuthenticationError as exc:
        raise _chained(f"queued on the primary; replication not confirmed: {exc}", exc) from exc
    except (*NODE_DOWN, RedisError) as exc:  # type: ignore[misc]  # a tuple of exception classes
        raise _chained(
            f"queued on the primary, not yet replicated: {events} event(s) on shard {keys.prefix!r}; "
            f"could not ask how many replicas hold them: {type(exc).__name__}: {exc}",
            exc,
        ) from exc
    if acked < wanted:
        raise not_replicated(keys, events, acked, wanted, wait_for)


def _chained(message: str, cause: BaseException) -> PublishError:
    error = PublishError(message)
    error.__cause__ = cause
    return error


async def answers(client: AnyRedis, within: float) -> bool:
    """True when Redis answers a PING within ``within`` seconds: on a cluster, when any primary does (a
    producer pushes to another shard while one node fails over). Raises what the PING raised on a
    plain Redis; on a cluster only when every primary failed (the first error)."""
    async with asyncio.timeout(within):
        if not isinstance(client, AsyncRedisCluster):
            await client.ping()
            return True
        await client.initialize()
        nodes = client.get_primaries()
        results = await asyncio.gather(
            *(client.execute_command("PING", target_nodes=node) for node in nodes), return_exceptions=True
        )
    errors = [result for result in results if isinstance(result, BaseException)]
    if nodes and len(errors) < len(nodes):
        return True
    if errors:
        raise errors[0]
    return False


async def ready(client: AnyRedis, breaker: Breaker, within: float) -> bool:
    """:meth:`AnalyticsClient.ping`'s answer: never raises for Redis's state. A PING that could not
    connect or timed out opens the breaker, as a failed push would (on a cluster: every primary)."""
    try:
        return await answers(client, within)
    except AuthenticationError:  # up, but refusing us: not ready, and nothing to fail fast on
        return False
    except (RedisConnectionError, RedisTimeoutError, OSError, RedisClusterException) as exc:
        breaker.trip(client, exc)  # OSError: the bound in answers()
        return False
    except RedisError:  # an answer (ACL denial, LOADING): Redis is up but cannot serve us
        return False
