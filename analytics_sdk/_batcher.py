"""Group commit: the engine that turns many concurrent ``track()`` calls into few Redis pushes.

Calls that arrive while a pipeline is in flight wait together and go in the next single push (at
most ``MAX_BATCH_EVENTS`` events or ``MAX_BATCH_BYTES``; more is split evenly, see
:mod:`._waiting`, which keeps the waiting list), to one shard (round-robin, :mod:`._spread`). Each
caller's future is resolved only once Redis has acknowledged the push that carried its own event.
A lone caller pays exactly one round trip: there is no timer. There is no Python lock: the event
loop serialises the bookkeeping and Redis makes each push (one script) atomic.

Every event carries a deadline, ``ANALYTICS_PUBLISH_TIMEOUT`` after it was handed over: a push is
tried (and retried) only until the earliest deadline of the events it carries, and an event whose
deadline passed while it waited is failed unsent. When a push gives up because Redis did not answer,
the client's :class:`._breaker.Breaker` opens and every waiting event fails at once.

Other threads hand events over with :meth:`GroupCommit.submit_threadsafe` (SyncAnalyticsClient): an
append to a deque and, only when none is pending already, one wake-up of the loop; the loop moves
them onto the same waiting list, so events from many threads share one push too. (A thread alone
pushes by itself, :mod:`._direct`; the loop's next push waits for it: :attr:`GroupCommit.ahead`.)
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ._breaker import Breaker, push_with_retry
from ._exceptions import AnalyticsError, ClientClosedError, PublishError
from ._queue import PushResult
from ._redis import AnyRedis
from ._settings import Settings
from ._spread import Shards
from ._waiting import Future as _Future
from ._waiting import Waiting, settle, settle_all

__all__ = ["MAX_BATCH_BYTES", "MAX_BATCH_EVENTS", "GroupCommit"]

logger = logging.getLogger(__name__)

MAX_BATCH_EVENTS = 1_000
MAX_BATCH_BYTES = 1 << 20

# What a thread hands over: (payloads, the caller's future, its deadline in time.monotonic() seconds)
_Handed = tuple[list[bytes], _Future, float]


def _not_attached(*args: Any) -> Any:
    raise AnalyticsError("GroupCommit: submit_threadsafe() before attach()")


def _publish_error(message: str, cause: BaseException | None) -> PublishError:
    error = PublishError(message)
    error.__cause__ = cause
    return error


def _pop_all(inbox: collections.deque[_Handed]) -> list[_Handed]:
    taken: list[_Handed] = []
    while True:
        try:
            taken.append(inbox.popleft())
        except IndexError:
            return taken


class GroupCommit:
    """The waiting list and push loop of one :class:`AnalyticsClient` (one event loop).

    ``on_pushed(client, result)`` runs on the loop after every acknowledged push (the client's
    backlog trigger); the events dropped by the cap are counted and logged here.
    """

    def __init__(
        self,
        settings: Settings,
        shards: Shards,
        on_pushed: Callable[[AnyRedis, PushResult], None],
        breaker: Breaker,
    ) -> None:
        self.settings = settings
        self.shards = shards  # each push goes to one of them (round-robin, see _spread)
        self._on_pushed = on_pushed
        self.breaker = breaker
        self._timeout = settings.analytics_publish_timeout
        self._waiting = Waiting()
        self._flusher: asyncio.Task[None] | None = None
        # Thread side (see submit_threadsafe): the inbox, whether the loop will look at it without
        # being woken, whether the client is closing, and what attach() gives.
        self._inbox: collections.deque[_Handed] = collections.deque()
        self._wake_pending = False
        self._closed = False
        self._call_soon_threadsafe: Callable[[Callable[[], None]], object] = _not_attached
        self._connect: Callable[[], AnyRedis] = _not_attached
        # On the loop, before each push: what must land first (a thread's own push, see _direct), or None.
        self.ahead: Callable[[], Awaitable[None] | None] = lambda: None

    def submit(
        self, loop: asyncio.AbstractEventLoop, client: AnyRedis, payloads: list[bytes]
    ) -> asyncio.Future[None]:
        """Queue ``payloads`` for the next push; the future resolves once Redis acknowledged them."""
        future: asyncio.Future[None] = loop.create_future()
        if self.breaker.is_open:
            future.set_exception(self.breaker.error())
            return future
        self._waiting.add(future, payloads, time.monotonic() + self._timeout)
        if self._flusher is None:
            self._flusher = loop.create_task(self._flush_loop(client))
        return future

    def submit_one(
        self, loop: asyncio.AbstractEventLoop, client: AnyRedis, payload: bytes
    ) -> asyncio.Future[None]:
        """:meth:`submit` of one event (``track()``), inlined: no list and no call per event."""
        future: asyncio.Future[None] = loop.create_future()
        if self.breaker.is_open:
            future.set_exception(self.breaker.error())
            return future
        waiting = self._waiting
        waiting.futures.append(future)
        waiting.counts.append(1)
        waiting.dues.append(time.monotonic() + self._timeout)
        waiting.payloads.append(payload)
        waiting.size += len(payload)
        if self._flusher is None:
            self._flusher = loop.create_task(self._flush_loop(client))
        return future

    async def wait_idle(self) -> None:
        """Return once every event handed over so far has been pushed (or has failed)."""
        if self._flusher is not None:
            await asyncio.wait({self._flusher})

    def forget(self) -> None:
        """After a fork: the parent's waiters and push loop are not the child's to finish."""
        self._waiting, self._flusher = Waiting(), None
        self._inbox, self._wake_pending = collections.deque(), False

    def close(self) -> None:
        """From now on events handed over by threads fail with ClientClosedError."""
        self._closed = True

    # -- from other threads -----------------------------------------------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop, connect: Callable[[], AnyRedis]) -> None:
        """Serve :meth:`submit_threadsafe` on ``loop``, which must be running in its own thread.

        ``connect()`` runs on the loop when a push loop is started for handed-over events: it returns
        the Redis client or raises, and those events' callers hear it.
        """
        self._call_soon_threadsafe, self._connect = loop.call_soon_threadsafe, connect

    def submit_threadsafe(self, payloads: list[bytes]) -> concurrent.futures.Future[None]:
        """From any thread: queue ``payloads`` for the next push; resolved once Redis acknowledged.

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
        if self.breaker.is_open:  # a plain read from this thread: fail fast without waking the loop
            future.set_exception(self.breaker.error())
            return future
        self._inbox.append((payloads, future, time.monotonic() + self._timeout))
        if not self._wake_pending:
            self._wake_pending = True
            try:
                self._call_soon_threadsafe(self._take_inbox)
            except RuntimeError:  # the loop is closed: nobody will ever push these
                self.reject_pending()
        return future

    def busy(self) -> bool:
        """From any thread (a plain read): events are waiting for the loop's pushes or in one."""
        return self._flusher is not None or bool(self._inbox)

    def trip(self, cause: BaseException) -> None:
        """On the loop: a thread's own push (:mod:`._direct`) gave up; open the breaker, probe."""
        with contextlib.suppress(AnalyticsError):  # closed meanwhile: nobody left to protect
            self.breaker.trip(self._connect(), cause)

    def pushed(self, result: PushResult) -> None:
        """On the loop: the after-push callback of a thread's own push (:mod:`._direct`)."""
        with contextlib.suppress(AnalyticsError):
            self._on_pushed(self._connect(), result)

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
            for _, future, _ in taken:
                error = PublishError(f"could not start pushing: {exc}")
                error.__cause__ = exc
                settle(future, error)
            return
        self._add(taken)
        self._flusher = asyncio.get_running_loop().create_task(self._flush_loop(client))
        # The push loop empties the inbox after every push and clears the flag before it goes idle:
        # until then threads need not wake the loop (a write and a read of its self-pipe saved).
        self._wake_pending = True

    def _admit(self, taken: list[_Handed]) -> bool:
        """Put handed-over events on the waiting list, or fail them once the client is closing."""
        if self._closed:
            for _, future, _ in taken:
                settle(future, ClientClosedError("the client is closed; create a new one"))
            return False
        self._add(taken)
        return True

    def _add(self, taken: list[_Handed]) -> None:
        add = self._waiting.add
        for payloads, future, due in taken:
            add(future, payloads, due)

    def reject_pending(self) -> None:
        """Once the loop has stopped for good (or is closed): fail every event still waiting.

        Nothing can push them any more, so their callers must not wait for ever. Events in a pipeline
        were failed by the push loop itself when it was cancelled; these were never sent.
        """
        self._wake_pending = False  # before popping, for the same reason as in _take_inbox
        pending = [*self._waiting.clear(), *(future for _, future, _ in _pop_all(self._inbox))]
        for future in pending:
            settle(future, ClientClosedError("the client was closed before this event was pushed"))

    # -- the push loop ------------------------------------------------------------------------------

    def _expire(self, future: _Future) -> None:
        settle(future, PublishError(f"not sent: no push could take it within {self._timeout}s"))

    async def _flush_loop(self, client: AnyRedis) -> None:
        futures: list[_Future] = []
        try:
            while True:
                if self._inbox:  # handed over by threads while the last push was out
                    self._admit(_pop_all(self._inbox))
                if self.breaker.is_open:  # Redis is known down: nobody waits for it
                    for future in self._waiting.clear():
                        settle(future, self.breaker.error())
                if not self._waiting:
                    # Going idle: from now on threads must wake the loop. Clear, then look once more
                    # (see submit_threadsafe); keep going if an append got in before the clearing.
                    self._wake_pending = False
                    if not self._inbox:
                        break
                    self._wake_pending = True
                    continue
                batch, futures, deadline = self._waiting.take(
                    time.monotonic(), MAX_BATCH_EVENTS, MAX_BATCH_BYTES, self._expire
                )
                if not batch:  # only empty payloads (or none left): nothing to send
                    settle_all(futures)
                    continue
                ahead = self.ahead()  # a thread's own push under way: ours must land after it
                if ahead is not None:
                    await ahead
                try:
                    result, _ = await push_with_retry(
                        client, self.shards, batch, self.settings, self.breaker, deadline
                    )
                except PublishError as exc:
                    for future in futures:  # each caller its own error, chained to the Redis one
                        settle(future, _publish_error(str(exc), exc.__cause__))
                    continue
                settle_all(futures)
                self._on_pushed(client, result)
        except BaseException as exc:
            # A bug or a cancellation here must not leave any caller waiting forever: not those whose
            # batch was in flight (off _waiting already), nor those queued, nor those in the inbox
            # (the flag cleared first, so that threads handing over later wake the loop themselves).
            self._wake_pending = False
            queued = [*self._waiting.clear(), *(f for _, f, _ in _pop_all(self._inbox))]
            for future in [*futures, *queued]:
                settle(future, _publish_error(f"the client's push loop stopped: {exc!r}", exc))
            raise
        finally:
            self._flusher = None
