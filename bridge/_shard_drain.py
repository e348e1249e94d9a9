"""The work of one drain call over the shards it visits (:func:`bridge.drain.drain` picks them):
take over expired leases, claim fresh groups, split poison leases.

Every Redis write for a batch goes to the shard the batch came from: a :class:`Claim` carries its
shard's keys (``Claim.keys``) and the lease keeper acks, renews and releases on those.
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
import redis.asyncio as aioredis

from analytics_sdk._queue import (
    Claim,
    QueueKeys,
    dead_letter_entry,
    expired_leases,
    mark_reclaims,
    split_lease,
    take_over,
)
from analytics_sdk._settings import Settings

from . import _failpoints, _shutdown
from ._groups import claim_group
from ._writer import BatchWriter, DrainSummary
from .store import InsertResult

__all__ = ["MAX_RECLAIMS", "ShardDrain"]

logger = logging.getLogger(__name__)

#: A lease taken over more often than this is split event by event (its workers keep dying).
MAX_RECLAIMS = 3


class ShardDrain(BatchWriter):
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

    async def reclaim(self, keys: QueueKeys, leases: list[tuple[str, str]]) -> None:
        """Take over ``leases`` of the shard ``keys`` (and any that expire meanwhile) one at a time."""
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
                    self.redis, keys, batch_id, score, self.settings.analytics_visibility_timeout
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
            more = await expired_leases(self.redis, keys, self.settings.analytics_visibility_timeout)
            leases = [lease for lease in more if lease[0] not in seen]

    async def _split(self, taken: Claim) -> None:
        keys = self.keeper.shard_of(taken)
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
        if not await split_lease(self.redis, keys, taken, parts):
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
        pieces = [Claim(new_id, list(items), 0, taken.token, keys) for new_id, items in parts]
        self.keeper.hold(pieces)
        for piece in pieces:
            if _shutdown.stop_requested() or self.out_of_time():
                # The untried pieces go back as ordinary leases (not counted as deaths).
                self.summary.stopped = _shutdown.stop_requested()
                await self.release([p for p in pieces if p.batch_id in self.keeper.held])
                return
            # Marked before it is tried: if this one kills the drain, its next take-over exceeds the
            # limit and it alone is dead-lettered; the untried ones come back as ordinary leases.
            if await mark_reclaims(self.redis, keys, piece, MAX_RECLAIMS):
                await self.process([piece._replace(reclaims=MAX_RECLAIMS)])

    # -- fresh claims ---------------------------------------------------------------------------

    async def claim_fresh(self, keys: QueueKeys) -> None:
        """Claim, decode, insert, ack from the shard ``keys`` until it is empty or the budget is spent.

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
                claims, exhausted = await claim_group(self, keys)
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
