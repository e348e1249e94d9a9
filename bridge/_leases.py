"""The leases one drain holds (on any number of shards: each claim carries its shard's keys and every
write for it goes to that shard): a heartbeat that keeps them, their fenced ack and release, and a settler
that finishes those when Redis stalls.

**Heartbeat.** While a drain works, its leases are renewed every ``visibility_timeout / 4`` under its
owner tokens (one fenced script for all of them). So the visibility timeout can be short (a minute):
a live drain never looks dead however long its batches take, and a dead worker's batches are back
within the timeout. A renewal that finds a lease taken over logs it; that batch's ack will do nothing.

**Ack and release.** An ack writes each batch's dead letters with its own batch only, so a batch that
another drain took over meanwhile (this one was paused past its lease) gets none from us: its new owner
writes them. A release makes a batch due at once for the next drain without counting as a death.

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
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import msgspec
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

    def shard_of(self, claim: Claim) -> QueueKeys:
        """The keys of the shard ``claim`` came from (this keeper's own for a claim without any)."""
        return claim.keys or self.keys

    def by_shard(self, claims: Sequence[Claim]) -> dict[QueueKeys, list[Claim]]:
        groups: dict[QueueKeys, list[Claim]] = {}
        for c in claims:
            groups.setdefault(self.shard_of(c), []).append(c)
        return groups

    async def ack(
        self, claims: Sequence[Claim], dead: list[bytes], inserted: int, duplicates: int
    ) -> tuple[list[Claim], list[bytes]]:
        """After COMMIT: ack ``claims`` with their dead letters and the transaction's counts, through a
        stall if need be. Returns the claims that were still ours and the dead letters written.

        Each shard's claims are acked by one script on that shard's keys (one slot); a group of the
        drain comes from one shard, so the transaction's counts go to that shard's stats."""
        by_batch = _dead_by_batch(claims, dead)
        self.drop(claims)  # acked leases need no renewal (and would look taken over)
        flag_of: dict[str, bool] = {}
        stats = {"inserted": inserted, "duplicates": duplicates}
        for keys, group in self.by_shard(claims).items():
            await self._ack_shard(keys, group, by_batch, stats, flag_of)
            stats = {}  # the transaction's counts are written once, with its first shard
        flags = [flag_of[c.batch_id] for c in claims]
        ours = [c for c, flag in zip(claims, flags, strict=True) if flag]
        if len(ours) < len(claims):
            # Another drain took these over while we worked (we were paused past the lease): it owns
            # them now and writes their dead letters; ours would be second copies. (Or an attempt of
            # this very ack ran through a stall with its reply lost: then they are acked already.)
            lost = [c.batch_id for c, flag in zip(claims, flags, strict=True) if not flag]
            logger.warning(
                "%s batch(es) were no longer this drain's when it acked them: another drain took them "
                "over (their rows are in; the new owner acks them), or an earlier attempt of this ack "
                "ran with its reply lost: %s",
                len(lost),
                ", ".join(lost[:5]),
            )
        return ours, [entry for c in ours for entry in by_batch.get(c.batch_id, ())]

    async def _ack_shard(
        self,
        keys: QueueKeys,
        claims: list[Claim],
        by_batch: dict[str, list[bytes]],
        stats: dict[str, int],
        flag_of: dict[str, bool],
    ) -> None:
        dead = {c.batch_id: by_batch[c.batch_id] for c in claims if c.batch_id in by_batch}
        try:
            flags = await settle("ack", lambda: ack(self.redis, keys, claims, dead_letters=dead, stats=stats))
        except _STALL_ERRORS:
            keep_unfinished_ack(keys, claims, dead, stats)
            raise
        flag_of.update((c.batch_id, flag) for c, flag in zip(claims, flags, strict=True))

    async def release(self, claims: Sequence[Claim]) -> None:
        """Give ``claims`` back for the next drain at once (their items stay in flight). Through a
        Redis stall it keeps trying for a while, then leaves them to the next drain in this process."""
        if not claims:
            return
        self.drop(claims)
        for keys, group in self.by_shard(claims).items():
            try:
                await settle("release", _releasing(self.redis, keys, group))
            except _STALL_ERRORS:
                keep_unfinished_release(keys, group)
            except Exception as exc:  # e.g. a refused script: the leases expire on their own
                logger.warning("could not release %s batch(es): %s", len(group), exc)

    def start(self) -> None:
        self._task = asyncio.create_task(self._beat(), name="analytics-lease-heartbeat")

    async def stop(self) -> None:
        """Cancel the heartbeat and wait for it, boundedly. ``asyncio.wait``, not ``await task``
        under a suppress(CancelledError): that would also swallow a cancellation of the caller (the
        drain's own task being cancelled while it stops the heartbeat) and could wait for ever."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            _, still = await asyncio.wait({task}, timeout=5)
            if still:
                logger.warning("the lease heartbeat did not stop within 5 s; leaving it")

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            stakes = list(self.held.values())
            if not stakes:
                continue
            outcome: list[tuple[Claim, bool]] = []
            for keys, group in self.by_shard(stakes).items():
                try:
                    outcome += zip(group, await renew(self.redis, keys, group), strict=True)
                except _STALL_ERRORS as exc:  # the next beat tries again; the lease has slack till then
                    logger.warning("could not renew %s lease(s) of %s: %s", len(group), keys.prefix, exc)
            # A lease acked or released while the renewal was in flight is no longer held: not lost.
            lost = [c for c, ours in outcome if not ours and c.batch_id in self.held]
            if lost:
                self.drop(lost)
                logger.warning(
                    "%s lease(s) were taken over by another drain (this one was too slow to renew): %s",
                    len(lost),
                    ", ".join(c.batch_id for c in lost[:5]),
                )


def _releasing(redis: aioredis.Redis, keys: QueueKeys, claims: list[Claim]) -> Callable[[], Awaitable[int]]:
    return lambda: release(redis, keys, claims)


def _dead_by_batch(claims: Sequence[Claim], dead: list[bytes]) -> dict[str, list[bytes]]:
    """Which claim each dead letter came from (by its payload), so that each is written only with
    its own batch's ack. Dead letters are rare: this runs on the slow path only."""
    if not dead:
        return {}
    if len(claims) == 1:
        return {claims[0].batch_id: dead}
    origin = {raw.decode("utf-8", errors="backslashreplace"): c.batch_id for c in claims for raw in c.items}
    by_batch: dict[str, list[bytes]] = {}
    for entry in dead:
        batch_id = origin.get(msgspec.json.decode(entry)["payload"], claims[0].batch_id)
        by_batch.setdefault(batch_id, []).append(entry)
    return by_batch
