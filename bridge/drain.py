"""The drain: claim -> decode -> insert -> ack, with reclaim, bisection and dead letters (DESIGN §3).

One call of :func:`drain` makes its own Redis client and asyncpg connection and closes both before it
returns, so it can run under ``asyncio.run`` in a forked Celery worker as often as needed.

Order of work:

1. Leases older than the visibility timeout are taken over first (atomically: two drains never take
   the same one), and processed one lease per transaction, so an innocent lease is never retried
   alongside a poisoned one. A lease taken over more than :data:`MAX_RECLAIMS` times killed its
   workers that often: it is split into one lease per event and tried event by event, each marked
   before it is tried, so the next crash incriminates exactly one event, which is then dead-lettered.
2. Fresh claims of ``analytics_batch_size`` events are gathered until ``analytics_insert_batch_size``
   rows are in hand (claim size and transaction size are separate knobs: the first bounds what one
   crash leaves in flight, the second sets insert throughput; :mod:`bridge._groups` takes them in
   two round trips), inserted (COPYed straight into the table, :mod:`bridge._straight`, or through
   the staging table when PostgreSQL refuses any of them), and acked together after the COMMIT, in
   one allow-oom script that also writes their dead letters and counters.

Failures (handled by :class:`bridge._writer.BatchWriter`): an event that does not decode is
dead-lettered with its reason. A data error (SQLSTATE 22/23) bisects the rows until each bad one
failed alone; those are dead-lettered with SQLSTATE and message, the rest commit. A connection error
leaves the claimed batches in flight, writes no dead letter, and propagates, so the task retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import asyncpg
import msgspec
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from analytics_sdk._queue import (
    Claim,
    QueueKeys,
    dead_letter_entry,
    expired_leases,
    mark_reclaims,
    split_lease,
    take_over,
)
from analytics_sdk._redis import redis_client
from analytics_sdk._settings import Settings

from . import _failpoints, _shutdown
from ._groups import claim_group
from ._leases import settle_unfinished
from ._writer import BatchWriter, DrainSummary
from .store import InsertResult, close, connect

__all__ = ["MAX_RECLAIMS", "DrainSummary", "drain"]

logger = logging.getLogger(__name__)

#: A lease taken over more often than this is split event by event (its workers keep dying).
MAX_RECLAIMS = 3


class _Drain(BatchWriter):
    """One drain call: a :class:`BatchWriter` with a deadline and a claiming strategy."""

    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        conn: asyncpg.Connection[Any],
        deadline: float,
        progress: Callable[[DrainSummary], None] | None,
    ) -> None:
        super().__init__(settings, redis, conn, progress)
        self.deadline = deadline

    def out_of_time(self) -> bool:
        return time.monotonic() >= self.deadline

    # -- reclaim --------------------------------------------------------------------------------

    async def reclaim(self, leases: list[tuple[str, str]]) -> None:
        seen: set[str] = set()
        while leases:
            for batch_id, score in leases:
                if self.out_of_time():
                    self.summary.budget_spent = True
                    return
                if _shutdown.stop_requested():
                    self.summary.stopped = True
                    return
                seen.add(batch_id)
                taken = await take_over(
                    self.redis, self.keys, batch_id, score, self.settings.analytics_visibility_timeout
                )
                if taken is None:  # another drain got it first, it was acked, or it is alive after all
                    continue
                self.keeper.hold([taken])
                self.summary.reclaimed += len(taken.items)
                logger.info(
                    "took over expired lease %s (%s events, take-over #%s)",
                    batch_id,
                    len(taken.items),
                    taken.reclaims,
                )
                if taken.reclaims > MAX_RECLAIMS:
                    await self._split(taken)
                else:
                    await self.process([taken])
            more = await expired_leases(self.redis, self.keys, self.settings.analytics_visibility_timeout)
            leases = [lease for lease in more if lease[0] not in seen]

    async def _split(self, taken: Claim) -> None:
        if len(taken.items) <= 1:
            reason = (
                f"poison: drains working on this event died or timed out {taken.reclaims} times; "
                "set aside so the queue can move on"
            )
            dead = [
                dead_letter_entry(raw, reason, stage="reclaim", reclaims=taken.reclaims)
                for raw in taken.items
            ]
            await self.ack([taken], dead, InsertResult(0, 0))
            return
        parts = [(uuid.uuid4().hex, [raw]) for raw in taken.items]
        self.keeper.drop([taken])
        if not await split_lease(self.redis, self.keys, taken, parts):
            logger.warning(
                "lease %s was taken over by another drain before it could be split", taken.batch_id
            )
            return
        logger.warning(
            "lease %s was taken over %s times: trying its %s events one lease at a time",
            taken.batch_id,
            taken.reclaims,
            len(parts),
        )
        pieces = [Claim(new_id, list(items), 0, taken.token) for new_id, items in parts]
        self.keeper.hold(pieces)
        for piece in pieces:
            if _shutdown.stop_requested() or self.out_of_time():
                # The untried pieces go back as ordinary leases (not counted as deaths).
                self.summary.stopped = _shutdown.stop_requested()
                await self.release([p for p in pieces if p.batch_id in self.keeper.held])
                return
            # Marked before it is tried: if this one kills the drain, its next take-over exceeds the
            # limit and it alone is dead-lettered; the untried ones come back as ordinary leases.
            if await mark_reclaims(self.redis, self.keys, piece, MAX_RECLAIMS):
                await self.process([piece._replace(reclaims=MAX_RECLAIMS)])

    # -- fresh claims ---------------------------------------------------------------------------

    async def claim_fresh(self) -> None:
        """Claim, decode, insert, ack until the queue is empty or the budget is spent.

        Pipelined by one group: while group k is in PostgreSQL (its COPY and COMMIT run in the
        server's process), group k+1 is claimed and decoded here, so decoding and the database work
        overlap instead of adding up. At most two groups are in flight at any time.
        """
        pending: asyncio.Task[None] | None = None
        try:
            while True:
                if _shutdown.stop_requested():
                    self.summary.stopped = True
                    break
                claims, exhausted = await claim_group(self)
                if claims:
                    _failpoints.hit("after_claim")
                    decoded = await self.decode_yielding(claims)
                    if pending is not None:
                        try:
                            await pending
                        except BaseException:
                            # This group was never tried: release it for the next drain at once
                            # rather than after the visibility timeout.
                            await self.release(claims)
                            raise
                    if _shutdown.stop_requested():  # the worker is stopping: keep nothing claimed ahead
                        await self.release(claims)
                        self.summary.stopped = True
                        break
                    pending = asyncio.create_task(self.store(claims, decoded, fresh=True))
                if exhausted:
                    break
                if self.out_of_time():
                    self.summary.budget_spent = True
                    break
            if pending is not None:
                await pending
        finally:
            if pending is not None and not pending.done():
                # Claiming failed while a group was in the database: let that group commit and ack.
                with contextlib.suppress(BaseException):
                    await pending


async def drain(
    settings: Settings,
    *,
    time_budget: float | None = None,
    progress: Callable[[DrainSummary], None] | None = None,
) -> DrainSummary:
    """Drain the queue of ``settings`` into PostgreSQL until it is empty or ``time_budget`` seconds
    (default ``analytics_drain_time_budget``) are spent; ``progress`` is called after every ack.

    The budget is checked between transactions: with no expired lease, even a budget of 0 moves one
    transaction's worth (``analytics_insert_batch_size`` rows) before stopping; take-overs of expired
    leases are checked before each one, so a budget of 0 takes none over. With nothing queued and no
    lease expired, PostgreSQL is not even connected to. Connection-class errors propagate after the
    claimed batches were left in flight (see :func:`bridge._errors.is_connection_error`)."""
    started = time.monotonic()
    budget = settings.analytics_drain_time_budget if time_budget is None else time_budget
    keys = QueueKeys(settings.analytics_key_prefix)
    redis = redis_client(settings)
    conn: asyncpg.Connection[Any] | None = None
    worker: _Drain | None = None
    try:
        await settle_unfinished(redis, keys)
        leases = await expired_leases(redis, keys, settings.analytics_visibility_timeout)
        if leases or await redis.llen(keys.queue):
            # Connect only when there is work: an idle beat tick costs two Redis commands.
            conn = await connect(settings)
            worker = _Drain(settings, redis, conn, started + budget, progress)
            worker.keeper.start()
            try:
                await worker.reclaim(leases)
                if not (worker.summary.budget_spent or worker.summary.stopped):
                    await worker.claim_fresh()
            finally:
                await worker.keeper.stop()
        summary = worker.summary if worker is not None else DrainSummary()
        summary.backlog = int(await redis.llen(keys.queue))
        summary.seconds = time.monotonic() - started
        line = msgspec.json.encode(summary.as_dict())
        try:
            seconds, micros = await redis.time()  # Redis's clock, the one `status` compares with
            finished = int(seconds) + int(micros) / 1e6
            await redis.hset(keys.stats, mapping={"last_flush_at": finished, "last_summary": line})
        except ResponseError as exc:  # OOM at maxmemory: the work is done, only `status` misses it
            logger.warning("could not record the drain summary in %s: %s", keys.stats, exc)
    except BaseException as exc:
        done = worker.summary.as_dict() if worker is not None else "nothing claimed"
        logger.warning("drain of %s stopped by %r; done so far: %s", keys.queue, exc, done)
        raise
    finally:
        try:
            if conn is not None:
                await close(conn)
        finally:  # even when a cancellation interrupts the PostgreSQL goodbye
            await redis.aclose()
    # An idle beat tick is not news: INFO only when the drain moved something.
    level = logging.INFO if summary.claimed or summary.reclaimed else logging.DEBUG
    logger.log(
        level,
        "drained %s: claimed=%s inserted=%s duplicates=%s dead_lettered=%s reclaimed=%s batches=%s "
        "backlog=%s in %.3fs",
        keys.queue,
        summary.claimed,
        summary.inserted,
        summary.duplicates,
        summary.dead_lettered,
        summary.reclaimed,
        summary.batches,
        summary.backlog,
        summary.seconds,
    )
    return summary
