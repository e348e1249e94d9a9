"""AnalyticsClient: validate, encode and push events to the Redis queue, with group commit.

Group commit (:class:`._batcher.GroupCommit`, which the client owns): ``track()`` calls that arrive
while a pipeline is in flight wait together and go in the next single push. Each caller returns only
once Redis has acknowledged the push that carried its own event (a lone caller pays one round trip;
no timer, no Python lock). The client keeps the public API, its lifecycle and the backlog trigger.
Each push goes to one of the ``ANALYTICS_QUEUE_SHARDS`` shards, on a plain Redis or (with
``ANALYTICS_REDIS_CLUSTER``) a Redis Cluster: :mod:`._spread`, :mod:`._topology`.

Reads coalesce the same way (:mod:`._reads`), so one client needs a handful of connections at most:
its pool is capped at ``MAX_CONNECTIONS`` and a caller waits for a free one (within its deadline)
instead of failing. Once Redis is known down, calls fail at once (:mod:`._breaker`).

With ``ANALYTICS_ENABLED=false`` (:mod:`._disabled`) the client validates and returns event ids and
never connects. :meth:`AnalyticsClient.ping` answers readiness probes without ever raising for Redis.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable, Mapping
from datetime import datetime
from threading import get_ident
from types import TracebackType
from typing import Any, Self

import anyio.to_thread

from ._backlog import AfterPush
from ._batcher import GroupCommit
from ._breaker import Breaker
from ._disabled import client_enabled
from ._event import Event, encode_fields
from ._exceptions import AnalyticsError, ClientClosedError, PublishError
from ._keys import QueueKeys
from ._reads import SizeReader
from ._redis import AnyRedis
from ._sender import TaskSender
from ._settings import Settings, redact_url
from ._spread import Shards, ready
from ._topology import producer_shards, queue_client, trigger_keys

__all__ = ["MAX_CONNECTIONS", "AnalyticsClient"]

logger = logging.getLogger(__name__)

#: Connections one client may open: one push and one LLEN at a time, the breaker's PING, the backlog
#: trigger's SET; the rest is headroom. redis-py 8's own default (100, then MaxConnectionsError at
#: once) is replaced by a blocking pool: past the cap a command waits for a connection.
MAX_CONNECTIONS = 8

# Bumped in every forked child: track() compares an int instead of paying a getpid() syscall per call.
_forks = [0]
os.register_at_fork(after_in_child=lambda: _forks.__setitem__(0, _forks[0] + 1))


class AnalyticsClient:
    """Async client. Use ``async with AnalyticsClient.from_env() as client: await client.track(...)``.

    One client belongs to one event loop. A ``redis.asyncio.Redis`` passed in is used as is and not
    closed by :meth:`aclose`; otherwise the client makes its own on first use, inside the loop.
    ``ANALYTICS_ENABLED=false`` in the environment (or ``Settings(analytics_enabled=False)``) makes a
    client that validates and returns ids but sends nothing; it is read here, for every client.
    """

    def __init__(self, settings: Settings | None = None, *, redis: AnyRedis | None = None) -> None:
        self.settings = settings or Settings()
        self.keys = QueueKeys(self.settings.analytics_key_prefix)  # the base prefix's (not a shard's)
        # the shards this client pushes to, one per push, round-robin (_spread)
        self._shards = Shards(producer_shards(self.settings), self.settings)
        self._redis = redis
        self._owns_redis = redis is None
        self._sender = TaskSender(self.settings)
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0  # threading.get_ident() of the loop's thread, once _get_redis() checked it
        self._pid = os.getpid()
        self._forks = _forks[0]
        self._metadata_limit = self.settings.analytics_max_metadata_bytes
        self._breaker = Breaker(
            redact_url(self.settings.redis_dsn) or "", self.settings.analytics_publish_timeout
        )
        self._after_push = AfterPush(
            self.settings, trigger_keys(self.settings), self._shards, self._sender, logger
        )
        self._background = self._after_push.background
        self._batcher = GroupCommit(self.settings, self._shards, self._after_push, self._breaker)
        self._sizes = SizeReader(self._shards.keys, self._breaker, self.settings.analytics_publish_timeout)
        self._enabled = client_enabled(self.settings)

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
        del fields  # not kept alive (nor walked by the GC) while this caller waits
        if self._enabled:
            await self._enqueue_one(raw)
        else:
            self._check_open()
        return event_id

    async def track_event(
        self,
        event_type: str,
        user_id: str | int | None = None,
        session_id: str | None = None,
        entity_type: str | None = None,
        entity_id: str | int | None = None,
        event_metadata: Mapping[str, Any] | str | None = None,
        ip_address: str | None = None,
        user_agent: str | None = None,
        referrer: str | None = None,
        created_at: datetime | str | None = None,
    ) -> str:
        """The older service's call, with its signature (positional or keyword); same as :meth:`track`."""
        return await self.track(
            event_type,
            user_id=user_id,
            session_id=session_id,
            entity_type=entity_type,
            entity_id=entity_id,
            event_metadata=event_metadata,
            ip_address=ip_address,
            user_agent=user_agent,
            referrer=referrer,
            created_at=created_at,
        )

    async def track_many(self, events: Iterable[Mapping[str, Any] | Event]) -> list[str]:
        """Validate every event first (one bad event pushes none), then push all in one script run."""
        self._check_open()  # also for an empty list: a closed client says so every time
        limit = self._metadata_limit
        encoded = [
            (e.event_id, e.encode()) if isinstance(e, Event) else encode_fields(e, max_metadata_bytes=limit)
            for e in events
        ]
        if encoded and self._enabled:
            client = self._get_redis()  # (submit fails at once while the breaker is open)
            await self._batcher.submit(asyncio.get_running_loop(), client, [raw for _, raw in encoded])
        return [event_id for event_id, _ in encoded]

    async def get_queue_size(self) -> int:
        """Events waiting in the Redis queue, over all its shards (not counting batches a drain has
        claimed); 0 if disabled. Concurrent callers share one read (:mod:`._reads`), bounded by the
        publish timeout.
        """
        if not self._enabled:
            self._check_open()
            return 0
        return await self._sizes.read(self._get_redis())

    async def flush_events_now(self) -> str | None:
        """Ask a bridge worker to drain the queue now; returns the Celery task id, or ``None`` when the
        client is disabled (no task was sent: there is nothing to drain)."""
        self._check_open()
        if not self._enabled:
            return None
        try:
            return await anyio.to_thread.run_sync(self._sender.send)
        except Exception as exc:
            raise PublishError(f"could not send the flush task to the broker: {exc}") from exc

    async def ping(self) -> bool:
        """For readiness probes: True if Redis answered a PING within ``ANALYTICS_PUBLISH_TIMEOUT``
        (on a cluster: any primary, since pushes then go to its shards).

        Never raises for Redis being down, slow or refusing: False. While the breaker is open (Redis
        known down) it answers False at once, without waiting; a PING that times out or cannot
        connect opens the breaker, as a failed ``track()`` would. A disabled client answers True
        without connecting: it is ready to take events. Raises only :class:`ClientClosedError` (and
        the other-loop :class:`AnalyticsError`), which are bugs in the caller, not Redis's state.
        """
        self._check_open()
        if not self._enabled:
            return True
        client = self._get_redis()
        if self._breaker.is_open:
            return False
        return await ready(client, self._breaker, self.settings.analytics_publish_timeout)

    async def aclose(self) -> None:
        """Wait for events already handed to the client, then release its connections. Idempotent.

        A client whose loop has ended (used under one ``asyncio.run``, closed under another) has
        nothing left to wait for: what belonged to that loop is dropped without awaiting on it, and
        its sockets are closed as they are collected. Closing from another loop while the client's
        own is still open raises :class:`AnalyticsError`: close it there.
        """
        if self._closed:
            return
        loop = self._loop
        dead = loop is not None and loop is not asyncio.get_running_loop()
        if dead and not loop.is_closed():  # type: ignore[union-attr]
            raise AnalyticsError("this AnalyticsClient belongs to another event loop; close it there")
        self._closed = True
        self._batcher.close()
        if dead or self._pid != os.getpid():
            self._batcher.forget()
            self._breaker.forget()
            self._after_push.forget()
            self._sizes.forget()
        else:
            await self._batcher.wait_idle()
            await self._breaker.stop()
            await self._after_push.stop()
            await self._sizes.wait_idle()
        self._after_push.report_dropped()  # a short-lived process must not take the rest of the count with it
        self._sender.close()
        if self._owns_redis and self._redis is not None and self._pid == os.getpid() and not dead:
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

    def _get_redis(self) -> AnyRedis:
        self._check_open()
        if self._pid != os.getpid():
            if not self._owns_redis:
                raise AnalyticsError("an injected Redis client cannot be used across a fork")
            # The parent's sockets are not ours to touch: drop them and start afresh.
            self._redis, self._pid = None, os.getpid()
            self._batcher.forget()
            self._breaker.forget()
            self._sizes.forget()
            self._after_push.forget()
            self._shards.forget()
        self._forks, self._thread = _forks[0], get_ident()
        if self._redis is None:
            # No hidden retry: ours (_breaker.push_with_retry) is the only one, its worst case known;
            # a command past the pool's cap waits for a connection, within the publish deadline.
            # With ANALYTICS_REDIS_CLUSTER, redis-py's cluster client (_topology).
            self._redis = queue_client(
                self.settings, max_connections=MAX_CONNECTIONS, wait=self.settings.analytics_publish_timeout
            )
        return self._redis

    def _enqueue_one(self, payload: bytes) -> asyncio.Future[None]:
        """A plain function returning the future, not a coroutine: the caller awaits the future
        itself (one coroutine less per event, one frame less to resume when Redis answers)."""
        loop, client = self._loop, self._redis
        # One cheap test per event: in the thread of this client's loop while that loop runs (one
        # running loop per thread: it is ours), open, not forked. Any doubt takes _get_redis(), which
        # checks everything and raises the right error. Not asyncio.get_running_loop(): on 3.11
        # it makes a getpid() syscall per call.
        if (
            client is None
            or loop is None
            or self._closed
            or self._thread != get_ident()
            or self._forks != _forks[0]
            or not loop.is_running()
        ):
            client = self._get_redis()
            loop = asyncio.get_running_loop()
        return self._batcher.submit_one(loop, client, payload)
