"""What a push does when Redis fails: bounded retries within a deadline, then the circuit breaker.

:func:`push_with_retry` retries a push that failed on a connection error or a timeout, with
exponential backoff and jitter, at most ``ANALYTICS_PUBLISH_RETRIES`` times and never past its
deadline (``ANALYTICS_PUBLISH_TIMEOUT`` after its earliest event was handed over): redis-py's own
retries are off, so that bound is the whole story. Errors that are answers (OOM, WRONGTYPE, ACL,
a wrong password) are not retried. Each push goes to one shard (:class:`._spread.Shards`); a retry
goes to a shard on another node, so one node down costs a retry, not a failure, and the breaker
opens only when the retries failed too. With ``ANALYTICS_REPLICA_ACKS`` the push then waits for
the replicas (:func:`._spread.replica_acks`); a replication timeout is a PublishError, not retried.

The circuit breaker of one client: once Redis is known down, fail at once instead of waiting. On
a cluster its probe (like ``ping()``) is satisfied by any primary answering.

Without it every ``track()`` against a Redis that accepts connections and never answers waits out its
whole ``ANALYTICS_PUBLISH_TIMEOUT``, request after request. The breaker opens when a push (or a queue
length read) gave up on a connection error or a timeout, never on an answer (OOM, a wrong password,
WRONGTYPE: Redis is up, retrying cannot help, and failing fast would hide nothing). While it is open,
calls raise :class:`PublishError` at once, chained to the error that opened it. A probe on the
client's loop sends PING every ``PROBE_INTERVAL`` seconds (each bounded by the publish timeout) and
closes the breaker at the first answer, so no caller ever pays for finding out that Redis is back.

Only the loop writes the state; other threads (SyncAnalyticsClient) only read ``is_open``, a plain
attribute, which is all they need to fail fast before handing an event over.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, RedisClusterException, RedisError

from ._exceptions import PublishError
from ._keys import QueueKeys
from ._queue import PushResult, new_token, push
from ._redis import AnyRedis
from ._settings import Settings
from ._spread import NODE_DOWN, Shards, answers, replica_acks

__all__ = ["PROBE_INTERVAL", "Breaker", "gave_up", "push_with_retry", "retry_delay"]

logger = logging.getLogger(__name__)

#: Seconds between two PINGs while the breaker is open: how late a client notices Redis is back.
PROBE_INTERVAL = 0.5


class Breaker:
    """Open/closed state, the error callers get while open, and the probe that closes it."""

    def __init__(self, where: str, probe_timeout: float) -> None:
        self._where = where  # the redacted Redis URL, for messages
        self._probe_timeout = probe_timeout
        self.is_open = False
        self._cause: BaseException | None = None
        self._opened_at = 0.0
        self._probe: asyncio.Task[None] | None = None

    @staticmethod
    def describe(exc: BaseException | None) -> str:
        """``Type: message`` (redis-py 8's repr of its errors says little; a bare TimeoutError is empty)."""
        text = str(exc)
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

    def error(self) -> PublishError:
        """A new PublishError for one caller while the breaker is open (each caller its own)."""
        down_for = time.monotonic() - self._opened_at
        error = PublishError(
            f"Redis at {self._where} is not answering (for {down_for:.1f}s: {self.describe(self._cause)}); "
            f"failing at once until a probe (every {PROBE_INTERVAL}s) sees it back"
        )
        error.__cause__ = self._cause
        return error

    def trip(self, client: AnyRedis, cause: BaseException | None) -> None:
        """On the loop, after a push or read gave up because Redis did not answer: open, start probing."""
        if self.is_open:
            return
        self.is_open, self._cause, self._opened_at = True, cause, time.monotonic()
        logger.warning(
            "Redis at %s is not answering (%s): track() and get_queue_size() now fail at once with "
            "PublishError until it answers a PING again (probed every %ss)",
            self._where,
            self.describe(cause),
            PROBE_INTERVAL,
        )
        self._probe = asyncio.get_running_loop().create_task(self._run_probe(client))

    async def _run_probe(self, client: AnyRedis) -> None:
        try:
            while True:
                await asyncio.sleep(PROBE_INTERVAL)
                try:  # on a cluster: any primary answering will do (pushes go to its shards)
                    if not await answers(client, self._probe_timeout):
                        continue
                except (RedisError, OSError, RedisClusterException):  # TimeoutError: the deadline
                    continue
                down_for = time.monotonic() - self._opened_at
                self.is_open, self._cause = False, None
                logger.warning(
                    "Redis at %s answers again after %.1fs; publishing resumes", self._where, down_for
                )
                return
        finally:
            self._probe = None

    async def stop(self) -> None:
        """Cancel the probe (the client is closing); the state stays as it is."""
        probe = self._probe
        if probe is not None:
            probe.cancel()
            await asyncio.wait({probe})  # not `await probe`: that would swallow our own cancellation

    def forget(self) -> None:
        """After a fork or once the probe's loop is gone: its task is not ours to finish; start closed."""
        self.is_open, self._cause, self._probe = False, None, None


def _any(client: AnyRedis) -> Any:
    # _queue's functions are typed for the plain client; the push script runs alike on a cluster's
    return client


def retry_delay(attempt: int, retries: int, deadline: float, expired: bool) -> float | None:
    """After attempt ``attempt`` (from 0) failed on a connection error or a timeout: the backoff to
    wait before the next one (exponential, with jitter), or ``None`` when the retries are spent or
    the deadline would pass first. Shared by the loop's pushes and a thread's own (:mod:`._direct`)."""
    delay = min(1.0, 0.05 * 2.0**attempt) * (0.5 + random.random())
    if expired or attempt == retries or time.monotonic() + delay >= deadline:
        return None
    return delay


def gave_up(exc: BaseException, events: int, attempts: int, expired: bool, limit: float) -> PublishError:
    """The error of a push that gave up after ``attempts`` on a connection error or a timeout."""
    if expired:
        message = f"no acknowledgment within ANALYTICS_PUBLISH_TIMEOUT={limit}s"
    else:
        message = f"not acknowledged after {attempts} attempt(s) within {limit}s"
    error = PublishError(
        f"Redis did not acknowledge {events} event(s): {message} (they may or may not "
        f"have been queued): {Breaker.describe(exc)}"
    )
    error.__cause__ = exc
    return error


async def push_with_retry(
    client: AnyRedis,
    shards: Shards,
    batch: list[bytes],
    settings: Settings,
    breaker: Breaker,
    deadline: float,
) -> tuple[PushResult, QueueKeys]:
    """Push until acknowledged, refused, ``publish_retries`` retries spent or ``deadline`` passed; a
    retry goes to another shard's node (:mod:`._spread`). Returns the result and the shard that took
    it, once ``ANALYTICS_REPLICA_ACKS`` replicas hold it (else :class:`PublishError`, not retried)."""
    token = new_token()  # one per batch, kept across its retries: a retry of a push that ran is a no-op
    # With shards on several nodes, one attempt may spend only half of what is left of the deadline
    # (the last one all of it): a hung node then costs a retry on another node, not the whole
    # deadline and the breaker. (Alone on one Redis, a retry would meet the same server: all of it.)
    halves = len(shards.keys) > 1 and not isinstance(client, aioredis.Redis)
    # The client's first push also records its K for the drains, alongside (another connection):
    # its callers return once both are done, so the SADD costs no round trip of its own.
    recording = None if shards.recorded else asyncio.ensure_future(shards.record(client))
    try:
        result, keys = await _attempts(client, shards, batch, settings, breaker, deadline, token, halves)
    except BaseException:
        if recording is not None:  # not on the push's failure: its node may be the one down
            recording.cancel()
        raise
    if recording is not None:  # bounded: a slow node holding the set must not hold the callers
        await asyncio.wait({recording}, timeout=max(0.0, deadline - time.monotonic()))
        recording.cancel()  # (a no-op once done; else recorded stays False: a later push asks again)
    if settings.analytics_replica_acks:  # (no coroutine per push without them)
        try:
            await replica_acks(client, keys, len(batch), settings)
        except PublishError:
            shards.under_replicated(client, shards.keys.index(keys))  # the next pushes go elsewhere
            raise
    return result, keys


async def _attempts(
    client: AnyRedis,
    shards: Shards,
    batch: list[bytes],
    settings: Settings,
    breaker: Breaker,
    deadline: float,
    token: str,
    halves: bool,
) -> tuple[PushResult, QueueKeys]:
    retries = settings.analytics_publish_retries
    index = shards.take(client)
    for attempt in range(retries + 1):
        keys = shards.keys[index]
        left = max(0.0, deadline - time.monotonic())
        bound = asyncio.timeout(left / 2 if halves and attempt < retries else left)
        try:
            async with bound:
                result = await push(_any(client), keys, batch, shards.cap, token=token)
            return result, keys
        except AuthenticationError as exc:  # a ConnectionError subclass, but retrying cannot help
            raise PublishError(f"Redis refused the credentials: {exc}") from exc
        except NODE_DOWN as exc:
            # A push that timed out may have run: re-sent with the same token to the same shard, it
            # queues nothing twice if Redis ran the first within the guard's lifetime; a copy queued
            # anyway (a retry on another shard) becomes one row through the sink's ON CONFLICT.
            expired = time.monotonic() >= deadline if halves else bound.expired()
            delay = retry_delay(attempt, retries, deadline, expired)
            if delay is None:
                breaker.trip(client, exc)
                limit = settings.analytics_publish_timeout
                raise gave_up(exc, len(batch), attempt + 1, expired, limit) from exc
            index = shards.after_failure(client, index)
            logger.warning(
                "push of %s event(s) failed (%s); retrying in %.2fs on shard %s",
                len(batch),
                Breaker.describe(exc),
                delay,
                shards.keys[index].prefix,
            )
            await asyncio.sleep(delay)
        except RedisError as exc:
            # OOM under maxmemory, WRONGTYPE, ACL denial: retrying cannot help, say so at once.
            raise PublishError(f"Redis refused {len(batch)} event(s): {exc}") from exc
    raise AssertionError("unreachable")
