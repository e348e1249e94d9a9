"""Group commit: the engine that turns many concurrent ``track()`` calls into few Redis MULTIs.

Calls that arrive while a pipeline is in flight wait together and go in the next single MULTI (at
most ``MAX_BATCH_EVENTS`` events or ``MAX_BATCH_BYTES``). Each caller's future is resolved only once
Redis has acknowledged the MULTI that carried its own event. A lone caller pays exactly one round
trip: there is no timer. There is no Python lock: the event loop serialises the bookkeeping and
Redis makes each MULTI atomic.

Other threads hand events over with :meth:`GroupCommit.submit_threadsafe` (SyncAnalyticsClient): an
append to a deque and, only when none is pending already, one wake-up of the loop; the loop moves
them onto the same waiting list, so events from many threads share one MULTI too.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import random
from collections.abc import Callable
from typing import Any, TypeAlias

import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ._exceptions import AnalyticsError, ClientClosedError, PublishError
from ._keys import QueueKeys
from ._queue import PushResult, new_token, push
from ._settings import Settings

__all__ = ["MAX_BATCH_BYTES", "MAX_BATCH_EVENTS", "GroupCommit"]

logger = logging.getLogger(__name__)

MAX_BATCH_EVENTS = 1_000
MAX_BATCH_BYTES = 1 << 20

# An async caller's future or a thread's: both have done(), set_result() and set_exception().
_Future: TypeAlias = "asyncio.Future[None] | concurrent.futures.Future[None]"
_Waiter = tuple[list[bytes], int, _Future]  # (payloads, their bytes, the caller's future)
_INVALID_STATE = (asyncio.InvalidStateError, concurrent.futures.InvalidStateError)


def _settle(future: _Future, error: BaseException | None = None) -> None:
    """Resolve a caller's future unless it is done. A thread may cancel its own at any moment (it gave
    up waiting), even between done() and the set: the caller has gone, not the push loop's error."""
    if future.done():
        return
    try:
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
    except _INVALID_STATE:
        pass


def _not_attached(*args: Any) -> Any:
    raise AnalyticsError("GroupCommit: submit_threadsafe() before attach()")


def _publish_error(message: str, cause: BaseException | None) -> PublishError:
    error = PublishError(message)
    error.__cause__ = cause
    return error


def _pop_all(inbox: collections.deque[_Waiter]) -> list[_Waiter]:
    taken: list[_Waiter] = []
    while True:
        try:
            taken.append(inbox.popleft())
        except IndexError:
            return taken


class GroupCommit:
    """The waiting list and push loop of one :class:`AnalyticsClient` (one event loop).

    ``on_pushed(client, result)`` runs on the loop after every acknowledged MULTI (the client's
    backlog trigger); the events dropped by the cap are counted and logged here.
    """

    def __init__(
        self, settings: Settings, keys: QueueKeys, on_pushed: Callable[[aioredis.Redis, PushResult], None]
    ) -> None:
        self.settings = settings
        self.keys = keys
        self._on_pushed = on_pushed
        self._waiting: list[_Waiter] = []
        self._flusher: asyncio.Task[None] | None = None
        # Thread side (see submit_threadsafe): the inbox, whether the loop will look at it without
        # being woken, whether the client is closing, and what attach() gives.
        self._inbox: collections.deque[_Waiter] = collections.deque()
        self._wake_pending = False
        self._closed = False
        self._call_soon_threadsafe: Callable[[Callable[[], None]], object] = _not_attached
        self._connect: Callable[[], aioredis.Redis] = _not_attached

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
        self._inbox, self._wake_pending = collections.deque(), False

    def close(self) -> None:
        """From now on events handed over by threads fail with ClientClosedError."""
        self._closed = True

    # -- from other threads -----------------------------------------------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop, connect: Callable[[], aioredis.Redis]) -> None:
        """Serve :meth:`submit_threadsafe` on ``loop``, which must be running in its own thread.

        ``connect()`` runs on the loop when a push loop is started for handed-over events: it returns
        the Redis client or raises, and those events' callers hear it.
        """
        self._call_soon_threadsafe, self._connect = loop.call_soon_threadsafe, connect

    def submit_threadsafe(self, payloads: list[bytes], size: int = -1) -> concurrent.futures.Future[None]:
        """From any thread: queue ``payloads`` for the next MULTI; resolved once Redis acknowledged.

        No lock: ``deque.append`` is atomic, and the loop is woken only when it would not look at the
        inbox otherwise. ``_wake_pending`` True means "the loop side will clear this flag and *then*
        empty the inbox, later": a scheduled wake-up (:meth:`_take_inbox`) or the running push loop,
        which does that before it goes idle. Why no append is ever missed: a thread appends, then
        reads the flag. Read False: it schedules a wake-up itself, which will find its entry. Read
        True: that clearing has not happened yet (the flag would read False after it), so neither
        has the emptying that follows it, which will take this entry. Clearing *after* emptying
        would lose one: an append landing between the two would read True, schedule nothing, and
        wait until some later call woke the loop. At worst two threads both read False and both
        schedule; the second wake-up finds less to do. (The GIL orders these plain reads/writes.)
        """
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._inbox.append((payloads, sum(map(len, payloads)) if size < 0 else size, future))
        if not self._wake_pending:
            self._wake_pending = True
            try:
                self._call_soon_threadsafe(self._take_inbox)
            except RuntimeError:  # the loop is closed: nobody will ever push these
                self.reject_pending()
        return future

    def _take_inbox(self) -> None:
        """The wake-up, on the loop: move handed-over events to the waiting list; start the push loop."""
        self._wake_pending = False  # before emptying: see submit_threadsafe
        taken = _pop_all(self._inbox)
        if not taken:
            return
        if self._closed or self._flusher is not None:
            if self._admit(taken):
                self._wake_pending = True  # the running push loop looks at the inbox (see below)
            return
        try:
            client = self._connect()
        except Exception as exc:  # not a closed client: close() marked this engine closed first
            for _, _, future in taken:
                error = PublishError(f"could not start pushing: {exc}")
                error.__cause__ = exc
                _settle(future, error)
            return
        self._waiting += taken
        self._flusher = asyncio.get_running_loop().create_task(self._flush_loop(client))
        # The push loop empties the inbox after every MULTI and clears the flag before it goes idle:
        # until then threads need not wake the loop (a write and a read of its self-pipe saved).
        self._wake_pending = True

    def _admit(self, taken: list[_Waiter]) -> bool:
        """Put handed-over events on the waiting list, or fail them once the client is closing."""
        if self._closed:
            for _, _, future in taken:
                _settle(future, ClientClosedError("the client is closed; create a new one"))
            return False
        self._waiting += taken
        return True

    def reject_pending(self) -> None:
        """Once the loop has stopped for good (or is closed): fail every event still waiting.

        Nothing can push them any more, so their callers must not wait for ever. Events in a pipeline
        were failed by the push loop itself when it was cancelled; these were never sent.
        """
        self._wake_pending = False  # before popping, for the same reason as in _take_inbox
        pending, self._waiting = [*self._waiting, *_pop_all(self._inbox)], []
        for _, _, future in pending:
            _settle(future, ClientClosedError("the client was closed before this event was pushed"))

    # -- the push loop ------------------------------------------------------------------------------

    def _take_batch(self) -> tuple[list[bytes], list[_Future]]:
        batch: list[bytes] = []
        futures: list[_Future] = []
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
        futures: list[_Future] = []
        try:
            while True:
                if self._inbox:  # handed over by threads while the last MULTI was out
                    self._admit(_pop_all(self._inbox))
                if not self._waiting:
                    # Going idle: from now on threads must wake the loop. Clear, then look once more
                    # (see submit_threadsafe); keep going if an append got in before the clearing.
                    self._wake_pending = False
                    if not self._inbox:
                        break
                    self._wake_pending = True
                    continue
                batch, futures = self._take_batch()
                if not batch:  # only empty payloads: nothing to send, nobody left waiting
                    for future in futures:
                        _settle(future)
                    continue
                try:
                    result = await self._push_with_retry(client, batch)
                except PublishError as exc:
                    for future in futures:  # each caller its own error, chained to the Redis one
                        _settle(future, _publish_error(str(exc), exc.__cause__))
                    continue
                for future in futures:
                    _settle(future)
                self._on_pushed(client, result)
        except BaseException as exc:
            # A bug or a cancellation here must not leave any caller waiting forever: not those whose
            # batch was in flight (off _waiting already), nor those queued, nor those in the inbox
            # (the flag cleared first, so that threads handing over later wake the loop themselves).
            self._wake_pending = False
            for future in [*futures, *(f for _, _, f in [*self._waiting, *_pop_all(self._inbox)])]:
                _settle(future, _publish_error(f"the client's push loop stopped: {exc!r}", exc))
            self._waiting.clear()
            raise
        finally:
            self._flusher = None

    async def _push_with_retry(self, client: aioredis.Redis, batch: list[bytes]) -> PushResult:
        retries = self.settings.analytics_publish_retries
        # One token for every attempt: a retry of a push that ran with its reply lost returns the
        # first result, so nothing is queued twice and the dropped count stays exact.
        token = new_token()
        for attempt in range(retries + 1):
            try:
                return await push(
                    client, self.keys, batch, self.settings.analytics_max_queue_size, token=token
                )
            except AuthenticationError as exc:  # a ConnectionError subclass, but retrying cannot help
                raise PublishError(f"Redis refused the credentials: {exc}") from exc
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                # A push that timed out may have run: the same token makes the retry a no-op then.
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
