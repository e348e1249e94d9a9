"""Group commit: the engine that turns many concurrent ``track()`` calls into few Redis MULTIs.

Calls that arrive while a pipeline is in flight wait together and go in the next single MULTI (at
most ``MAX_BATCH_EVENTS`` events or ``MAX_BATCH_BYTES``). Each caller's future is resolved only once
Redis has acknowledged the MULTI that carried its own event. A lone caller pays exactly one round
trip: there is no timer. There is no Python lock: the event loop serialises the bookkeeping and
Redis makes each MULTI atomic.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ._exceptions import PublishError
from ._keys import QueueKeys
from ._queue import PushResult, push
from ._settings import Settings

__all__ = ["MAX_BATCH_BYTES", "MAX_BATCH_EVENTS", "GroupCommit"]

logger = logging.getLogger(__name__)

MAX_BATCH_EVENTS = 1_000
MAX_BATCH_BYTES = 1 << 20
_DROP_LOG_EVERY = 10.0  # seconds between warnings about events dropped by the cap

_Waiter = tuple[list[bytes], int, "asyncio.Future[None]"]  # (payloads, their bytes, the caller's future)


class GroupCommit:
    """The waiting list and push loop of one :class:`AnalyticsClient` (one event loop).

    ``on_pushed(client, result)`` runs on the loop after every acknowledged MULTI (the client's
    backlog trigger); the events dropped by the cap are counted and logged here.
    """

    def __init__(
        self,
        settings: Settings,
        keys: QueueKeys,
        on_pushed: Callable[[aioredis.Redis, PushResult], None],
    ) -> None:
        self.settings = settings
        self.keys = keys
        self._on_pushed = on_pushed
        self._waiting: list[_Waiter] = []
        self._flusher: asyncio.Task[None] | None = None
        self._dropped_unlogged = 0
        self._drop_logged_at = 0.0

    def submit(
        self, loop: asyncio.AbstractEventLoop, client: aioredis.Redis, payloads: list[bytes], size: int = -1
    ) -> asyncio.Future[None]:
        """Queue ``payloads`` for the next MULTI; the future resolves once Redis acknowledged them."""
        future: asyncio.Future[None] = loop.create_future()
        self._waiting.append((payloads, sum(map(len, payloads)) if size < 0 else size, future))
        if self._flusher is None:
            self._flusher = loop.create_task(self._flush_loop(client))
        return future

    async def wait_idle(self) -> None:
        """Return once every event handed over so far has been pushed (or has failed)."""
        if self._flusher is not None:
            await asyncio.wait({self._flusher})

    def forget(self) -> None:
        """After a fork: the parent's waiters and push loop are not the child's to finish."""
        self._waiting, self._flusher = [], None

    def _take_batch(self) -> tuple[list[bytes], list[asyncio.Future[None]]]:
        batch: list[bytes] = []
        futures: list[asyncio.Future[None]] = []
        size = 0
        taken = 0
        for payloads, weight, future in self._waiting:
            if future.done():  # its caller was cancelled before the send: never pushed
                taken += 1
                continue
            if batch and (len(batch) + len(payloads) > MAX_BATCH_EVENTS or size + weight > MAX_BATCH_BYTES):
                break
            batch.extend(payloads)
            futures.append(future)
            size += weight
            taken += 1
        del self._waiting[:taken]
        return batch, futures

    async def _flush_loop(self, client: aioredis.Redis) -> None:
        futures: list[asyncio.Future[None]] = []
        try:
            while self._waiting:
                batch, futures = self._take_batch()
                if not batch:
                    continue
                try:
                    result = await self._push_with_retry(client, batch)
                except PublishError as exc:
                    for future in futures:
                        if not future.done():
                            error = PublishError(str(exc))
                            error.__cause__ = exc.__cause__
                            future.set_exception(error)
                    continue
                for future in futures:
                    if not future.done():
                        future.set_result(None)
                if result.dropped:
                    self._note_dropped(result.dropped)
                self._on_pushed(client, result)
        except BaseException as exc:
            # A bug or a cancellation here must not leave any caller waiting forever: neither those
            # whose batch was in flight (already taken off _waiting) nor those still queued.
            for future in [*futures, *(f for _, _, f in self._waiting)]:
                if not future.done():
                    error = PublishError(f"the client's push loop stopped: {exc!r}")
                    error.__cause__ = exc
                    future.set_exception(error)
            self._waiting.clear()
            raise
        finally:
            self._flusher = None

    async def _push_with_retry(self, client: aioredis.Redis, batch: list[bytes]) -> PushResult:
        retries = self.settings.analytics_publish_retries
        for attempt in range(retries + 1):
            try:
                return await push(client, self.keys, batch, self.settings.analytics_max_queue_size)
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                # A MULTI that timed out may have run: re-sending can queue an event twice, which
                # the sink's ON CONFLICT (event_id) turns back into one row.
                if attempt == retries:
                    raise PublishError(
                        f"Redis did not acknowledge {len(batch)} event(s) after {retries + 1} attempts: {exc}"
                    ) from exc
                delay = min(1.0, 0.05 * 2**attempt) * (0.5 + random.random())
                logger.warning("push of %s event(s) failed (%s); retrying in %.2fs", len(batch), exc, delay)
                await asyncio.sleep(delay)
            except RedisError as exc:
                # OOM under maxmemory, WRONGTYPE, ACL denial: retrying cannot help, say so at once.
                raise PublishError(f"Redis refused {len(batch)} event(s): {exc}") from exc
        raise AssertionError("unreachable")

    def _note_dropped(self, count: int) -> None:
        self._dropped_unlogged += count
        now = time.monotonic()
        if now - self._drop_logged_at >= _DROP_LOG_EVERY:
            logger.warning(
                "queue %s is at its cap of %s: dropped the %s oldest event(s) since the last warning",
                self.keys.queue,
                self.settings.analytics_max_queue_size,
                self._dropped_unlogged,
            )
            self._dropped_unlogged = 0
            self._drop_logged_at = now
