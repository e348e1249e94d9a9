"""AnalyticsClient: validate, encode and push events to the Redis queue, with group commit.

Group commit (:class:`._batcher.GroupCommit`, which the client owns): ``track()`` calls that arrive
while a pipeline is in flight wait together and go in the next single MULTI. Each caller returns only
once Redis has acknowledged the MULTI that carried its own event. A lone caller pays exactly one round
trip: there is no timer. There is no Python lock: the event loop serialises the bookkeeping and Redis
makes each MULTI atomic. The client keeps the public API, its lifecycle and the backlog trigger.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any, Self

import anyio.to_thread
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ._batcher import GroupCommit
from ._event import Event, encode_fields
from ._exceptions import AnalyticsError, ClientClosedError, PublishError
from ._keys import QueueKeys
from ._queue import PushResult
from ._sender import TaskSender
from ._settings import Settings, redact_url

__all__ = ["AnalyticsClient"]

logger = logging.getLogger(__name__)

_DROP_LOG_EVERY = 10.0  # seconds between warnings about events dropped by the cap

# Bumped in every forked child: track() compares an int instead of paying a getpid() syscall per call.
_forks = [0]
os.register_at_fork(after_in_child=lambda: _forks.__setitem__(0, _forks[0] + 1))


class AnalyticsClient:
    """Async client. Use ``async with AnalyticsClient.from_env() as client: await client.track(...)``.

    One client belongs to one event loop. A ``redis.asyncio.Redis`` passed in is used as is and not
    closed by :meth:`aclose`; otherwise the client makes its own on first use, inside the loop.
    """

    def __init__(self, settings: Settings | None = None, *, redis: aioredis.Redis | None = None) -> None:
        self.settings = settings or Settings()
        self.keys = QueueKeys(self.settings.analytics_key_prefix)
        self._redis = redis
        self._owns_redis = redis is None
        self._sender = TaskSender(self.settings)
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pid = os.getpid()
        self._forks = _forks[0]
        self._metadata_limit = self.settings.analytics_max_metadata_bytes
        self._batcher = GroupCommit(self.settings, self.keys, self._after_push)
        self._background: set[asyncio.Task[Any]] = set()
        self._trigger_after = 0.0  # monotonic time before which no backlog flush is attempted
        self._dropped_unlogged = 0
        self._drop_logged_at = 0.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Self:
        """A client configured from ``ANALYTICS_*`` variables (see :meth:`Settings.from_env`)."""
        return cls(Settings.from_env(environ, **overrides))

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<AnalyticsClient {state} redis={redact_url(self.settings.redis_dsn)!r}>"

    async def __aenter__(self) -> Self:
        self._check_open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- public API -----------------------------------------------------------------------------

    async def track(self, event_type: str, **fields: Any) -> str:
        """Validate one event, push it, and return its event_id once Redis has acknowledged it.

        Raises :class:`ValidationError` (nothing pushed) or :class:`PublishError` (not acknowledged).
        """
        fields["event_type"] = event_type
        event_id, raw = encode_fields(fields, max_metadata_bytes=self._metadata_limit)
        await self._enqueue([raw], len(raw))
        return event_id

    async def track_event(self, event_type: str, **fields: Any) -> str:
        """The older service's name for :meth:`track`; same fields, same behaviour."""
        return await self.track(event_type, **fields)

    async def track_many(self, events: Iterable[Mapping[str, Any] | Event]) -> list[str]:
        """Validate every event first (one bad event pushes none), then push all in one MULTI."""
        self._check_open()  # also for an empty list: a closed client says so every time
        limit = self._metadata_limit
        encoded = [
            (e.event_id, e.encode()) if isinstance(e, Event) else encode_fields(e, max_metadata_bytes=limit)
            for e in events
        ]
        if encoded:
            await self._enqueue([raw for _, raw in encoded])
        return [event_id for event_id, _ in encoded]

    async def get_queue_size(self) -> int:
        """Events waiting in the Redis queue (not counting batches a drain has claimed)."""
        client = self._get_redis()
        try:
            return int(await client.llen(self.keys.queue))
        except RedisError as exc:
            raise PublishError(f"could not read the queue length: {exc}") from exc

    async def flush_events_now(self) -> str:
        """Ask a bridge worker to drain the queue now; returns the Celery task id."""
        self._check_open()
        try:
            return await anyio.to_thread.run_sync(self._sender.send)
        except Exception as exc:
            raise PublishError(f"could not send the flush task to the broker: {exc}") from exc

    async def aclose(self) -> None:
        """Wait for events already handed to the client, then release its connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._batcher.close()
        await self._batcher.wait_idle()
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.wait(self._background)
        self._sender.close()
        if self._owns_redis and self._redis is not None and self._pid == os.getpid():
            await self._redis.aclose()
        self._redis = None

    @property
    def closed(self) -> bool:
        return self._closed

    # -- plumbing -------------------------------------------------------------------------------

    def _check_open(self) -> asyncio.AbstractEventLoop:
        if self._closed:
            raise ClientClosedError("this AnalyticsClient is closed; create a new one")
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise AnalyticsError(
                "this AnalyticsClient belongs to another event loop; create one client per loop "
                "(or use SyncAnalyticsClient from threads)"
            )
        return loop

    def _get_redis(self) -> aioredis.Redis:
        self._check_open()
        if self._pid != os.getpid():
            if not self._owns_redis:
                raise AnalyticsError("an injected Redis client cannot be used across a fork")
            # The parent's sockets are not ours to touch: drop them and start afresh.
            self._redis, self._pid = None, os.getpid()
            self._batcher.forget()
        self._forks = _forks[0]
        if self._redis is None:
            timeout = self.settings.analytics_redis_timeout
            self._redis = aioredis.Redis.from_url(
                self.settings.redis_dsn,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                # Our own bounded retry (below) is the only one, so its worst case is known.
                retry=Retry(NoBackoff(), 0),
            )
        return self._redis

    async def _enqueue(self, payloads: list[bytes], size: int = -1) -> None:
        loop = asyncio.get_running_loop()
        client = self._redis
        # One cheap test on the hot path; any doubt (first use, closed, other loop, forked) takes
        # _get_redis(), which checks everything and raises the right error.
        if client is None or self._closed or loop is not self._loop or self._forks != _forks[0]:
            client = self._get_redis()
        await self._batcher.submit(loop, client, payloads, size)

    def _after_push(self, client: aioredis.Redis, result: PushResult) -> None:
        """After every acknowledged MULTI (called by the group commit): drops, the backlog trigger."""
        settings = self.settings
        if result.dropped:
            self._note_dropped(result.dropped)
        if settings.analytics_backlog_trigger and result.length >= settings.analytics_batch_size:
            now = time.monotonic()
            if now >= self._trigger_after:
                self._trigger_after = now + settings.analytics_backlog_trigger_cooldown
                task = asyncio.get_running_loop().create_task(self._trigger_flush(client))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    def _note_dropped(self, count: int) -> None:
        # Rate-limited: a queue at its cap drops on every push; the exact total is in the counter.
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

    async def _trigger_flush(self, client: aioredis.Redis) -> None:
        cooldown_ms = int(self.settings.analytics_backlog_trigger_cooldown * 1000)
        try:
            if await client.set(self.keys.flush_cooldown, b"1", nx=True, px=cooldown_ms):
                task_id = await anyio.to_thread.run_sync(self._sender.send)
                logger.debug("backlog: sent flush task %s", task_id)
        except Exception as exc:  # the events are safe in Redis; beat will flush them
            logger.warning("could not send a backlog flush (beat will drain instead): %s", exc)
