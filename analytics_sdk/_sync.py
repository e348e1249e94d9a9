"""SyncAnalyticsClient: the async client's surface for threads and sync frameworks.

One :class:`AnalyticsClient` runs on a private event-loop thread. Events from any number of threads
are handed straight to its group commit (:meth:`GroupCommit.submit_threadsafe`: a deque append and
at most one pending wake-up of the loop, no portal crossing per call), so they share its MULTIs:
eight threads calling ``track()`` cost far fewer round trips than eight pipelines. Each thread then
waits on its own future until Redis has acknowledged its event. A thread that has the client to
itself (nothing waiting on the loop, nobody else pushing alone) skips the hop and pushes from its
own thread, under the same rules (:mod:`._direct`): one thread is then as fast as a plain pipeline.
Validation and encoding run in the calling thread, so a bad event raises there without touching the
loop. The rarer calls (queue size, flush, close) go through an anyio blocking portal. After
``os.fork()`` the child starts its own loop thread and connections on first use; it never touches
the parent's. A disabled client (``ANALYTICS_ENABLED=false``, :mod:`._disabled`) validates and
returns ids and starts nothing: no thread, no loop, no connection.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Self, TypeVar

import anyio
from anyio.from_thread import BlockingPortal

from ._batcher import GroupCommit
from ._client import AnalyticsClient
from ._direct import DirectLane
from ._disabled import client_enabled
from ._event import Event, encode_fields
from ._exceptions import AnalyticsError, ClientClosedError, PublishError
from ._settings import Settings, redact_url

__all__ = ["SyncAnalyticsClient"]

T = TypeVar("T")


@dataclass(slots=True)
class _Runtime:
    pid: int
    portal: BlockingPortal
    client: AnalyticsClient
    batcher: GroupCommit  # the client's group commit, which the loop serves for every thread
    thread: threading.Thread
    direct: DirectLane  # a thread's own push while it has the client to itself


def _start_portal(
    on_exit: Callable[[], None],
) -> tuple[BlockingPortal, asyncio.AbstractEventLoop, threading.Thread]:
    """An event loop with a blocking portal on a daemon thread; ``on_exit()`` runs once it ended.

    Not anyio's ``start_blocking_portal``: its thread belongs to a ThreadPoolExecutor, which the
    interpreter joins at exit, so a program that forgot ``close()`` hung forever on exit. A daemon
    thread costs nothing at exit: every ``track()`` that returned was already acknowledged by Redis.
    """
    started: concurrent.futures.Future[tuple[BlockingPortal, asyncio.AbstractEventLoop]]
    started = concurrent.futures.Future()

    async def serve() -> None:
        async with BlockingPortal() as portal:
            started.set_result((portal, asyncio.get_running_loop()))
            await portal.sleep_until_stopped()

    def run() -> None:
        try:
            anyio.run(serve)
        except BaseException as exc:
            if not started.done():
                started.set_exception(exc)
            raise
        finally:
            on_exit()

    thread = threading.Thread(target=run, name="analytics-sdk", daemon=True)
    thread.start()
    portal, loop = started.result()
    return portal, loop, thread


class SyncAnalyticsClient:
    """Thread-safe, fork-safe sync client: ``with SyncAnalyticsClient.from_env() as client: ...``."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self._runtime: _Runtime | None = None
        self._lock = threading.Lock()  # guards only the one-time start of the portal thread
        self._lock_pid = os.getpid()
        self._closed = False
        # How long a thread waits for Redis's acknowledgment before giving up. A safety net for a
        # loop thread that died or hangs, never the normal way out: the loop itself answers every
        # event within its publish timeout (the deadline each event carries from its hand-over).
        self._wait_limit = 2 * self.settings.analytics_publish_timeout + 10.0
        self._enabled = client_enabled(self.settings)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Self:
        return cls(Settings.from_env(environ, **overrides))

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<SyncAnalyticsClient {state} redis={redact_url(self.settings.redis_dsn)!r}>"

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _get(self) -> _Runtime:
        if self._closed:
            raise ClientClosedError("this SyncAnalyticsClient is closed; create a new one")
        runtime = self._runtime
        pid = os.getpid()
        if runtime is not None and runtime.pid == pid:
            return runtime
        if self._lock_pid != pid:
            # Forked: another thread of the parent may have held the lock at fork time.
            self._lock, self._lock_pid = threading.Lock(), pid
        with self._lock:
            if self._closed:  # close() ran between the check above and here: start nothing
                raise ClientClosedError("this SyncAnalyticsClient is closed; create a new one")
            runtime = self._runtime
            if runtime is None or runtime.pid != pid:
                client = AnalyticsClient(self.settings)
                batcher = client._batcher
                # Once the loop has ended nothing can push what threads still hand over: fail it.
                portal, loop, thread = _start_portal(on_exit=batcher.reject_pending)
                batcher.attach(loop, client._get_redis)
                direct = DirectLane(
                    self.settings,
                    client._shards,
                    client._breaker,
                    busy=batcher.busy,
                    on_loop=portal.call,
                    soon=loop.call_soon_threadsafe,
                    later=loop.call_later,
                    trip=batcher.trip,
                    after_push=batcher.pushed,
                )
                batcher.ahead = direct.ahead
                runtime = _Runtime(pid, portal, client, batcher, thread, direct)
                self._runtime = runtime
        return runtime

    def _call(self, func: Callable[..., Awaitable[T]], *args: Any) -> T:
        runtime = self._get()
        try:
            return runtime.portal.call(func, *args)
        except RuntimeError as exc:
            # close() in another thread stopped the portal between _get() and the call.
            if self._closed and not isinstance(exc, AnalyticsError):
                raise ClientClosedError("this SyncAnalyticsClient is closed; create a new one") from exc
            raise

    def _push(self, payloads: list[bytes]) -> None:
        """Push ``payloads`` from this thread if it has the client to itself (:mod:`._direct`), else
        hand them to the loop's group commit; either way, return once Redis acknowledged them."""
        runtime = self._get()
        if runtime.direct.try_push(payloads):
            return
        future = runtime.batcher.submit_threadsafe(payloads)
        try:
            future.result(self._wait_limit)
        except TimeoutError:
            if not future.cancel():  # resolved just now, after all: that outcome stands
                future.result()
                return
            # Cancelled: if it was not taken into a MULTI yet it never will be; if it was, it may
            # still land, and the caller is told so.
            raise PublishError(
                f"no acknowledgment from Redis within {self._wait_limit:.0f}s; "
                f"{len(payloads)} event(s) may or may not have been queued"
            ) from None

    def _encode(self, fields: Mapping[str, Any]) -> tuple[str, bytes]:
        return encode_fields(fields, max_metadata_bytes=self.settings.analytics_max_metadata_bytes)

    def track(self, event_type: str, **fields: Any) -> str:
        """Validate and push one event; returns its event_id once Redis acknowledged it."""
        fields["event_type"] = event_type
        event_id, raw = self._encode(fields)
        if self._enabled:
            self._push([raw])
        elif self._closed:
            raise ClientClosedError("this SyncAnalyticsClient is closed; create a new one")
        return event_id

    def track_event(
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
        """The older service's call, with its keyword signature; same as :meth:`track`."""
        return self.track(
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

    def track_many(self, events: Iterable[Mapping[str, Any] | Event]) -> list[str]:
        """Validate all, then push all in one MULTI; one bad event pushes none."""
        if self._closed:  # also for an empty list, as the async client does
            raise ClientClosedError("this SyncAnalyticsClient is closed; create a new one")
        encoded = [(e.event_id, e.encode()) if isinstance(e, Event) else self._encode(e) for e in events]
        if encoded and self._enabled:
            self._push([raw for _, raw in encoded])
        return [event_id for event_id, _ in encoded]

    def get_queue_size(self) -> int:
        """Events waiting in the Redis queue; 0 if disabled."""
        if not self._enabled:
            self._check_open()
            return 0
        return self._call(self._get().client.get_queue_size)

    def flush_events_now(self) -> str | None:
        """Ask a bridge worker to drain the queue now: the Celery task id, or ``None`` if disabled."""
        if not self._enabled:
            self._check_open()
            return None
        return self._call(self._get().client.flush_events_now)

    def ping(self) -> bool:
        """For readiness probes: True if Redis answered a PING within ``ANALYTICS_PUBLISH_TIMEOUT``;
        False (never an exception) when it is down, hung or refusing, at once while the breaker is
        open. True without connecting when disabled. See :meth:`AnalyticsClient.ping`."""
        if not self._enabled:
            self._check_open()
            return True
        return self._call(self._get().client.ping)

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosedError("this SyncAnalyticsClient is closed; create a new one")

    def close(self) -> None:
        """Finish what was handed over, close connections and stop the loop thread. Idempotent."""
        self._closed = True
        runtime, self._runtime = self._runtime, None
        if runtime is None or runtime.pid != os.getpid():
            return  # nothing started here, or it belongs to the parent process
        try:
            runtime.direct.close()
            runtime.portal.call(runtime.client.aclose)
        finally:
            runtime.portal.call(runtime.portal.stop)
            runtime.thread.join(10)

    @property
    def closed(self) -> bool:
        return self._closed
