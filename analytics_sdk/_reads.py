"""Coalesced queue-length reads: one read answers every ``get_queue_size()`` caller waiting for it.

The read is the LLEN of every shard of this producer's K (:func:`._shards.queue_depths`: one round
trip on a plain Redis, one per node on a cluster, sent concurrently), summed.

Group commit does this for writes (:mod:`._batcher`); here it is for a health endpoint under load.
Without it 300 concurrent callers took 300 connections, and redis-py 8 (a pool of 100 that raises
``MaxConnectionsError`` at once) failed them. A caller is answered by an LLEN sent after its call
began, never by one already out, which could predate an event this caller just tracked.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import AuthenticationError, RedisClusterException, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ._breaker import Breaker
from ._exceptions import PublishError
from ._keys import QueueKeys
from ._redis import AnyRedis
from ._shards import queue_depths

__all__ = ["SizeReader"]


def _chained(message: str, cause: BaseException) -> PublishError:
    error = PublishError(message)
    error.__cause__ = cause
    return error


class SizeReader:
    """The queue-length reads of one client (one event loop): at most one read out at a time."""

    def __init__(self, shards: Sequence[QueueKeys], breaker: Breaker, timeout: float) -> None:
        self._shards = tuple(shards)
        self._breaker = breaker
        self._timeout = timeout  # ANALYTICS_PUBLISH_TIMEOUT bounds each LLEN, as it bounds a push
        self._next: asyncio.Future[int] | None = None  # answers the callers of the next LLEN
        self._reader: asyncio.Task[None] | None = None

    async def read(self, client: AnyRedis) -> int:
        if self._breaker.is_open:
            raise self._breaker.error()
        future = self._next
        if future is None:
            loop = asyncio.get_running_loop()
            future = self._next = loop.create_future()
            # All its callers may have been cancelled: mark a failure as seen, or asyncio logs it.
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
            if self._reader is None:
                self._reader = loop.create_task(self._read_loop(client))
        # shield: one caller giving up must not cancel the answer the others wait for.
        return await asyncio.shield(future)

    async def _read_loop(self, client: AnyRedis) -> None:
        try:
            while (future := self._next) is not None:
                self._next = None
                try:
                    async with asyncio.timeout(self._timeout):
                        future.set_result(sum(await queue_depths(client, self._shards)))
                except AuthenticationError as exc:  # an answer: Redis is up
                    future.set_exception(_chained(f"could not read the queue length: {exc}", exc))
                except (RedisConnectionError, RedisTimeoutError, OSError, RedisClusterException) as exc:
                    # OSError: the deadline. One node of a cluster down does not stop the pushes
                    # (they go to other shards): only a plain Redis's failure opens the breaker.
                    if not isinstance(client, RedisCluster):
                        self._breaker.trip(client, exc)
                    future.set_exception(
                        _chained(f"could not read the queue length: {Breaker.describe(exc)}", exc)
                    )
                except RedisError as exc:
                    future.set_exception(_chained(f"could not read the queue length: {exc}", exc))
        finally:
            self._reader = None

    async def wait_idle(self) -> None:
        if self._reader is not None:
            await asyncio.wait({self._reader})

    def forget(self) -> None:
        """After a fork, or once the loop that ran the reads is gone."""
        self._next = self._reader = None
