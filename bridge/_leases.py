"""The leases one drain holds: a heartbeat that keeps them, and a settler that finishes their acks and
releases when Redis stalls.

**Heartbeat.** While a drain works, its leases are renewed every ``visibility_timeout / 4`` under its
owner tokens (one fenced script for all of them). So the visibility timeout can be short (a minute):
a live drain never looks dead however long its batches take, and a dead worker's batches are back
within the timeout. A renewal that finds a lease taken over logs it; that batch's ack will do nothing.

**Settling through a stall.** An ack after COMMIT and a release after a failure are Redis writes; when
Redis stalls (paused, failing over, a network blip) they fail too, and the batches would sit in flight
until their leases expire, their rows often committed already. So these writes are retried with
backoff for up to :data:`SETTLE_WINDOW` seconds; what still fails is kept in this process and finished
by the next drain that runs here before it claims anything. Both writes are fenced and idempotent, so
doing one again after a lost reply is harmless. The kept work is plain data (ids, tokens, bytes): it
crosses ``asyncio.run`` calls safely.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from analytics_sdk._queue import Claim, QueueKeys, ack, release, renew

__all__ = ["SETTLE_WINDOW", "LeaseKeeper", "settle", "settle_unfinished"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds an ack or release keeps retrying through a Redis stall before it is left to the next drain.
SETTLE_WINDOW = 30.0
_STALL_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)

# What a drain could not finish, per queue prefix: (claims, dead letters by batch, counters) for acks,
# and claims to release. Finished by the next drain of the same queue in this process.
_unfinished_acks: dict[str, list[tuple[list[Claim], dict[str, list[bytes]], dict[str, int]]]] = {}
_unfinished_releases: dict[str, list[Claim]] = {}


async def settle(what: str, attempt: Callable[[], Awaitable[T]], window: float = SETTLE_WINDOW) -> T:
    """Run ``attempt`` (a fenced, idempotent Redis write), retrying through a stall for ``window`` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + window
    delay = 0.1
    while True:
        try:
            return await attempt()
        except _STALL_ERRORS as exc:
            if loop.time() + delay > deadline:
                raise
            logger.warning("%s: Redis did not answer (%s); trying again in %.1fs", what, exc, delay)
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 2.0)


def keep_unfinished_ack(
    keys: QueueKeys, claims: Sequence[Claim], dead: dict[str, list[bytes]], stats: dict[str, int]
) -> None:
    _unfinished_acks.setdefault(keys.prefix, []).append((list(claims), dead, stats))
    logger.error(
        "could not ack %s committed batch(es) of %s while Redis stalled; the next drain in this "
        "process acks them (or their leases expire and another drain re-inserts them as duplicates)",
        len(claims),
        keys.queue,
    )


def keep_unfinished_release(keys: QueueKeys, claims: Sequence[Claim]) -> None:
    _unfinished_releases.setdefault(keys.prefix, []).extend(claims)


async def settle_unfinished(redis: aioredis.Redis, keys: QueueKeys) -> int:
    """Finish the acks and releases an earlier drain in this process could not; how many batches."""
    done = 0
    acks = _unfinished_acks.pop(keys.prefix, [])
    while acks:
        claims, dead, stats = acks[0]
        try:
            flags = await ack(redis, keys, claims, dead_letters=dead, stats=stats)
        except BaseException:
            _unfinished_acks.setdefault(keys.prefix, [])[:0] = acks
            raise
        acks.pop(0)
        done += sum(flags)
    releases = _unfinished_releases.pop(keys.prefix, [])
    if releases:
        try:
            done += await release(redis, keys, releases)
        except BaseException:
            _unfinished_releases.setdefault(keys.prefix, [])[:0] = releases
            raise
    if done:
        logger.info("finished %s ack(s)/release(s) an earlier drain left when Redis stalled", done)
    return done


class LeaseKeeper:
    """The heartbeat of one drain: renews every lease it holds until it stops."""

    def __init__(self, redis: aioredis.Redis, keys: QueueKeys, visibility_timeout: float) -> None:
        self.redis = redis
        self.keys = keys
        self.interval = max(0.05, visibility_timeout / 4)
        self.held: dict[str, Claim] = {}
        self._task: asyncio.Task[None] | None = None

    def hold(self, claims: Sequence[Claim]) -> None:
        for c in claims:
            self.held[c.batch_id] = c

    def drop(self, claims: Sequence[Claim]) -> None:
        for c in claims:
            self.held.pop(c.batch_id, None)

    def start(self) -> None:
        self._task = asyncio.create_task(self._beat(), name="analytics-lease-heartbeat")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            stakes = list(self.held.values())
            if not stakes:
                continue
            try:
                flags = await renew(self.redis, self.keys, stakes)
            except _STALL_ERRORS as exc:  # the next beat tries again; the lease has slack till then
                logger.warning("could not renew %s lease(s): %s", len(stakes), exc)
                continue
            lost = [c for c, ours in zip(stakes, flags, strict=True) if not ours]
            if lost:
                self.drop(lost)
                logger.warning(
                    "%s lease(s) were taken over by another drain (this one was too slow to renew): %s",
                    len(lost),
                    ", ".join(c.batch_id for c in lost[:5]),
                )
