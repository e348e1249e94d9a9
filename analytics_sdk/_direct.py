"""A thread's own push, for :class:`SyncAnalyticsClient` while one thread has the client to itself.

Handing an event to the loop thread costs two thread wake-ups and redis.asyncio's per-command work:
one thread calling ``track()`` did 2.5 k events/s that way, fewer than a plain redis-py pipeline per
event from the same thread. So a thread that finds the client idle (no other thread's events waiting
on or pushed by the loop, nobody else pushing this way) pushes its own events with a blocking
redis-py connection and returns; threads that arrive meanwhile share the loop's group commit.

The rules are the loop's: the push script, one token per push across its retries; the deadline
from the hand-over; the retry policy (:func:`._breaker.retry_delay`); the breaker, read here and
opened on the loop; the after-push callback run on the loop; the shards (:mod:`._spread`, shared
with the loop: two pushes racing for an index may both take it), a retry on another node's shard,
and with ``ANALYTICS_REPLICA_ACKS`` a WAIT on the connection that pushed (it counts that connection's
last write). On a cluster the thread uses redis-py's sync cluster client (:mod:`._lane_cluster`),
whose replies are bounded by its socket timeout (half the publish timeout), not by the deadline.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, NoScriptError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from . import _lua
from ._breaker import Breaker, gave_up, retry_delay
from ._exceptions import PublishError
from ._keys import QueueKeys
from ._lane_cluster import ClusterPusher
from ._queue import PUSH_GUARD_TTL_MS, PushResult, new_token
from ._settings import Settings
from ._spread import NODE_DOWN, Shards, not_replicated

__all__ = ["DirectLane"]

logger = logging.getLogger(__name__)

#: Seconds between two looks of the loop at direct pushes' results while they keep coming. Waking the
#: loop thread for each (its self-pipe, a thread switch, the GIL handed over and back) cost more than
#: the push itself: 89 us against 43 us per event from one thread.
AFTER_PUSH_EVERY = 0.05

#: Seconds a thread that found the client busy keeps every thread off the direct lane. Threads that
#: overlap share the loop's pushes; a lane taken in between would cost them a round trip of its own
#: (the loop waits for it, see ahead()): 8 threads fell from 1.1x to 0.8x a raw pipeline that way.
SHARED_FOR = 0.05


def _connection(settings: Settings) -> redis.connection.AbstractConnection:
    """One blocking connection (not connected yet) with no hidden retry, as :mod:`._redis` makes
    the async clients: the URL's query string cannot turn redis-py's retries back on."""
    pool = redis.ConnectionPool.from_url(settings.redis_dsn)
    kwargs = {**pool.connection_kwargs, "retry_on_timeout": False, "retry_on_error": []}
    kwargs["retry"] = Retry(NoBackoff(), 0)
    connection: redis.connection.AbstractConnection = pool.connection_class(**kwargs)
    return connection


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class DirectLane:
    """The push of one thread at a time, in that thread. :meth:`try_push` says whether it pushed.

    ``busy()`` tells whether the loop's group commit has events (then a thread joins them there);
    ``on_loop(fn, *args)`` runs ``fn`` on the loop and waits; ``soon(fn)`` schedules it there from
    another thread, ``later(delay, fn)`` from the loop itself.
    """

    def __init__(
        self,
        settings: Settings,
        shards: Shards,
        breaker: Breaker,
        busy: Callable[[], bool],
        on_loop: Callable[..., object],
        soon: Callable[[Callable[[], None]], object],
        later: Callable[[float, Callable[[], None]], object],
        trip: Callable[[BaseException], None],
        after_push: Callable[[PushResult], None],
    ) -> None:
        self._settings = settings
        self._shards = shards
        self._breaker = breaker
        self._busy, self._on_loop, self._soon, self._later = busy, on_loop, soon, later
        self._trip, self._after_push = trip, after_push
        self._lock = threading.Lock()  # held for a direct push (and while close() ends the lane)
        self._waiter: asyncio.Future[None] | None = None  # the loop's, waiting for that push to end
        self._closed = False
        self._shared_until = 0.0  # time.monotonic() before which threads go to the loop
        self._connection: redis.connection.AbstractConnection | None = None  # only under the lock
        # With ANALYTICS_REDIS_CLUSTER: the sync cluster client's pushes instead (only under the lock)
        self._cluster = ClusterPusher(settings) if settings.analytics_redis_cluster else None
        # Results waiting for the loop's after-push callback. _after_pending True: the loop will look
        # at them without being woken (a wake-up is scheduled, or the loop looks again soon).
        self._results: collections.deque[PushResult] = collections.deque()
        self._after_pending = False

    def try_push(self, payloads: list[bytes]) -> bool:
        """Push ``payloads`` from this thread if the client is idle: True once Redis acknowledged
        them (or raises :class:`PublishError`); False, having done nothing, if it is not idle."""
        now = time.monotonic()
        if now < self._shared_until:
            return False
        if self._busy() or not self._lock.acquire(blocking=False):
            self._shared_until = now + SHARED_FOR  # (a plain write; any thread's value will do)
            return False
        try:
            if self._closed or self._busy():
                return False
            if self._breaker.is_open:  # a plain read, as submit_threadsafe does
                raise self._breaker.error()
            result = self._push(payloads)
        finally:
            self._release()
        self._results.append(result)
        if not self._after_pending:
            self._after_pending = True
            try:
                self._soon(self._run_after_push)
            except RuntimeError:  # the loop has ended (the client is closing): nobody to tell
                self._after_pending = False
        return True

    def ahead(self) -> asyncio.Future[None] | None:
        """On the loop, before each of its pushes: a future resolved once the direct push under way
        has ended, or None if there is none. Events handed to the loop while a thread pushes alone
        were handed over after that thread's, so they must land after them: hand-over order holds
        across both ways in (a request's event before the next request's, whichever way each went)."""
        if not self._lock.locked():
            return None
        waiter = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        if not self._lock.locked():  # released before it could see the waiter: nothing to wait for
            self._waiter = None
            return None
        return waiter

    def _release(self) -> None:
        self._lock.release()
        waiter, self._waiter = self._waiter, None  # read after the release: see ahead()
        if waiter is not None:
            with contextlib.suppress(RuntimeError):  # the loop has ended: nobody waits any more
                self._soon(partial(_resolve, waiter))

    def close(self) -> None:
        """No direct push after this; waits for the one under way (bounded by its deadline), and
        has the loop run the after-push callback of every push made (drop counts included)."""
        self._lock.acquire()
        try:
            self._closed = True
            if self._connection is not None:
                self._connection.disconnect()  # type: ignore[no-untyped-call]
                self._connection = None
            if self._cluster is not None:
                self._cluster.close()
        finally:
            self._release()
        with contextlib.suppress(RuntimeError):  # the loop has ended: nothing left to tell
            self._on_loop(self._report)

    def _report(self) -> None:
        while self._results:
            self._after_push(self._results.popleft())

    def _run_after_push(self) -> None:
        """On the loop: report the results so far, then look again in AFTER_PUSH_EVERY while they keep
        coming (threads leave the loop asleep meanwhile); once none came, go idle."""
        if not self._results:
            # Clear, then look once more: an append that read the flag before the clearing did not
            # wake the loop (the reasoning of GroupCommit.submit_threadsafe).
            self._after_pending = False
            if not self._results:
                return
            self._after_pending = True
        self._report()
        self._later(AFTER_PUSH_EVERY, self._run_after_push)

    def _push(self, payloads: list[bytes]) -> PushResult:
        settings, shards = self._settings, self._shards
        deadline = time.monotonic() + settings.analytics_publish_timeout
        retries = settings.analytics_publish_retries
        token = new_token()  # one per push, kept across its retries (and shards: see _spread)
        cluster = None if self._cluster is None else self._cluster.client
        index = shards.take(cluster)
        for attempt in range(retries + 1):
            keys = shards.keys[index]
            guard = keys.push_guard(token)
            args = (3, keys.queue, keys.dropped, guard, shards.cap, PUSH_GUARD_TTL_MS)
            try:
                if self._cluster is None:
                    length, dropped, repeated = self._run(args, payloads, deadline)
                else:
                    length, dropped, repeated = self._cluster.push(args, payloads)
                break
            except AuthenticationError as exc:  # a ConnectionError subclass, but retrying cannot help
                raise PublishError(f"Redis refused the credentials: {exc}") from exc
            except NODE_DOWN as exc:
                expired = time.monotonic() >= deadline
                delay = retry_delay(attempt, retries, deadline, expired)
                if delay is None:
                    # Opened before this call returns: the next one fails at once. (RuntimeError: the
                    # loop has ended, the client is closing.)
                    with contextlib.suppress(RuntimeError):
                        self._on_loop(self._trip, exc)
                    limit = settings.analytics_publish_timeout
                    raise gave_up(exc, len(payloads), attempt + 1, expired, limit) from exc
                index = shards.after_failure(cluster, index)
                logger.warning(
                    "push of %s event(s) failed (%s); retrying in %.2fs on shard %s",
                    len(payloads),
                    Breaker.describe(exc),
                    delay,
                    shards.keys[index].prefix,
                )
                time.sleep(delay)
            except RedisError as exc:  # OOM, WRONGTYPE, ACL denial: retrying cannot help
                raise PublishError(f"Redis refused {len(payloads)} event(s): {exc}") from exc
        else:
            raise AssertionError("unreachable")
        if settings.analytics_replica_acks:
            try:
                self._replica_acks(keys, len(payloads))
            except PublishError:
                shards.under_replicated(cluster, index)  # the next pushes go to another node
                raise
        return PushResult(int(length), int(dropped), bool(repeated))

    def _replica_acks(self, keys: QueueKeys, events: int) -> None:
        """``ANALYTICS_REPLICA_ACKS``: return once that many replicas hold the push, else raise
        :class:`PublishError` (the push is queued: never retried). On a plain Redis, WAIT on the
        connection that pushed: it counts that connection's last write, the push."""
        settings = self._settings
        wanted, wait_for = settings.analytics_replica_acks, settings.analytics_replica_ack_timeout
        if wanted <= 0:
            return
        try:
            if self._cluster is not None:
                acked = self._cluster.replicated(keys, wanted, wait_for)
            else:
                acked = self._wait(wanted, wait_for)
        except (*NODE_DOWN, RedisError) as exc:  # type: ignore[misc]  # a tuple of exception classes
            error = PublishError(
                f"queued on the primary, not yet replicated: {events} event(s) on shard {keys.prefix!r}; "
                f"could not ask how many replicas hold them: {Breaker.describe(exc)}"
            )
            raise error from exc
        if acked < wanted:
            raise not_replicated(keys, events, acked, wanted, wait_for)

    def _wait(self, replicas: int, wait_for: float) -> int:
        connection = self._connection
        if connection is None:  # (cannot happen: the push that just succeeded made it)
            raise RedisConnectionError("no connection to ask WAIT on")
        try:
            connection.send_command("WAIT", replicas, max(1, math.ceil(wait_for * 1000)))  # type: ignore[no-untyped-call]
            return int(connection.read_response(timeout=wait_for + self._settings.analytics_redis_timeout))
        except BaseException:
            connection.disconnect()  # type: ignore[no-untyped-call]  # a reply may still come
            raise

    def _run(self, args: tuple[Any, ...], payloads: list[bytes], deadline: float) -> Any:
        """One attempt: EVALSHA (EVAL on a server that does not know the script yet). Connecting and
        each reply are bounded by ``ANALYTICS_REDIS_TIMEOUT`` and by what is left of ``deadline``."""
        connection = self._connection
        if connection is None:
            connection = self._connection = _connection(self._settings)
        try:
            for command, script in (("EVALSHA", _lua.PUSH.sha), ("EVAL", _lua.PUSH.source)):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RedisTimeoutError("the publish deadline passed before the push was sent")
                bound = min(left, self._settings.analytics_redis_timeout)
                connection.socket_connect_timeout = connection.socket_timeout = bound
                connection.connect()  # type: ignore[no-untyped-call]  # a no-op once connected
                connection.send_command(command, script, *args, *payloads)  # type: ignore[no-untyped-call]
                try:
                    return connection.read_response(timeout=bound)
                except NoScriptError:
                    continue
            raise AssertionError("unreachable")
        except BaseException:
            connection.disconnect()  # type: ignore[no-untyped-call]  # a reply may still come: not reusable
            raise
