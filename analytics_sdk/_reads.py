"""Coalesced queue-length reads: one LLEN answers every ``get_queue_size()`` caller waiting for it.

Group commit does this for writes (:mod:`._batcher`); here it is for a health endpoint under load.
Without it 300 concurrent callers took 300 connections, and redis-py 8 (a pool of 100 that raises
``MaxConnectionsError`` at once) failed them. A caller is answered by an LLEN sent after its call
began, never by one already out, which could predate an event this caller just tracked.
"""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ._breaker import Breaker
from ._exceptions import PublishError
from ._keys import QueueKeys

__all__ = ["SizeReader"]


def _chained(message: str, cause: BaseException) -> PublishError:
    error = PublishError(message)
    error.__cause__ = cause
    return error


class SizeReader:
    """The queue-length reads of one client (one event loop): at most one LLEN out at a time."""

    def __init__(self, keys: QueueKeys, breaker: Breaker, timeout: float) -> None:
        self._keys = keys
        self._breaker = breaker
        self._timeout = timeout  # ANALYTICS_PUBLISH_TIMEOUT bounds each LLEN, as it bounds a push
        self._next: asyncio.Future[int] | None = None  # answers the callers of the next LLEN
        self._reader: asyncio.Task[None] | None = None

    async def read(self, client: aioredis.Redis) -> int:
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

    async def _read_loop(self, client: aioredis.Redis) -> None:
        try:
            while (future := self._next) is not None:
                self._next = None
                try:
                    async with asyncio.timeout(self._timeout):
                        future.set_result(int(await client.llen(self._keys.queue)))
                except AuthenticationError as exc:  # an answer: Redis is up
                    future.set_exception(_chained(f"could not read the queue length: {exc}", exc))
                except (RedisConnectionError, RedisTimeoutError, OSError) as exc:  # OSError: the deadline
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
