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
   crash leaves in flight, the second sets insert throughput), inserted, and acked together after
   the COMMIT, in one MULTI that also writes their dead letters and counters.

Failures: an event that does not decode is dead-lettered with its reason. A data error (SQLSTATE
22/23) bisects the rows until each bad one failed alone; those are dead-lettered with SQLSTATE and
message, the rest commit. A connection error leaves the claimed batches in flight, writes no dead
letter, and propagates, so the task retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
import redis.asyncio as aioredis

from analytics_sdk._event import Event, decode
from analytics_sdk._queue import (
    Claim,
    QueueKeys,
    ack,
    claim,
    dead_letter_entry,
    expired_leases,
    set_reclaims,
    split_lease,
    take_over,
)
from analytics_sdk._settings import Settings

from . import _failpoints
from ._errors import (
    ConnectionLostError,
    is_connection_error,
    is_data_error,
    is_transient_conflict,
    sqlstate_of,
)
from .schema import asyncpg_dsn
from .store import InsertResult, insert_events

__all__ = ["MAX_RECLAIMS", "DrainSummary", "drain"]

logger = logging.getLogger(__name__)

#: A lease taken over more often than this is split event by event (its workers keep dying).
MAX_RECLAIMS = 3
_CONNECT_TIMEOUT = 10.0
_CONFLICT_ATTEMPTS = 3
_APPLICATION_NAME = "analytics-drain"


@dataclass
class DrainSummary:
    """What one drain did. ``claimed`` counts every event it took (fresh claims and take-overs);
    ``reclaimed`` the part of those taken over from expired leases; ``batches`` the leases released;
    ``backlog`` the queue length when it stopped; ``budget_spent`` whether the time budget stopped it."""

    claimed: int = 0
    inserted: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    reclaimed: int = 0
    batches: int = 0
    seconds: float = 0.0
    backlog: int = 0
    budget_spent: bool = False

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["seconds"] = round(self.seconds, 3)
        return data


def _before_commit() -> None:
    _failpoints.hit("before_commit")


class _Drain:
    """The state of one drain call: its connections, its deadline and its running summary."""

    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        conn: asyncpg.Connection[Any],
        deadline: float,
        progress: Callable[[DrainSummary], None] | None,
    ) -> None:
        self.settings = settings
        self.keys = QueueKeys(settings.analytics_key_prefix)
        self.redis = redis
        self.conn = conn
        self.deadline = deadline
        self.progress = progress
        self.summary = DrainSummary()

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
                seen.add(batch_id)
                taken = await take_over(self.redis, self.keys, batch_id, score)
                if taken is None:  # another drain got it first, or it was acked meanwhile
                    continue
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
            await self._ack([taken], dead, InsertResult(0, 0))
            return
        parts = [(uuid.uuid4().hex, [raw]) for raw in taken.items]
        await split_lease(self.redis, self.keys, taken.batch_id, parts)
        logger.warning(
            "lease %s was taken over %s times: trying its %s events one lease at a time",
            taken.batch_id,
            taken.reclaims,
            len(parts),
        )
        for new_id, items in parts:
            # Marked before it is tried: if this one kills the drain, its next take-over exceeds the
            # limit and it alone is dead-lettered; the untried ones come back as ordinary leases.
            await set_reclaims(self.redis, self.keys, new_id, MAX_RECLAIMS)
            await self.process([Claim(new_id, items, MAX_RECLAIMS)])

    # -- fresh claims ---------------------------------------------------------------------------

    async def claim_fresh(self) -> None:
        size = self.settings.analytics_batch_size
        per_transaction = max(size, self.settings.analytics_insert_batch_size)
        while True:
            claims: list[Claim] = []
            rows = 0
            exhausted = False
            while rows < per_transaction:
                taken = await claim(self.redis, self.keys, size, uuid.uuid4().hex)
                if taken.items:
                    claims.append(taken)
                    rows += len(taken.items)
                if len(taken.items) < size:
                    exhausted = True
                    break
            if claims:
                await self.process(claims)
            if exhausted:
                return
            if self.out_of_time():
                self.summary.budget_spent = True
                return

    # -- one unit of work -----------------------------------------------------------------------

    async def process(self, claims: Sequence[Claim]) -> None:
        """Decode, insert and ack ``claims``; on a connection error leave them in flight and raise."""
        try:
            _failpoints.hit("after_claim")
            events, raws, dead = self._decode(claims)
            result = InsertResult(0, 0)
            if events:
                _failpoints.crash_on_event(e.event_id for e in events)
                step = self.settings.analytics_insert_batch_size
                for start in range(0, len(events), step):
                    part = await self._insert_bisect(
                        events[start : start + step], raws[start : start + step], dead
                    )
                    result = InsertResult(
                        result.inserted + part.inserted, result.duplicates + part.duplicates
                    )
            _failpoints.hit("after_commit")
        except Exception as exc:
            lost = not is_connection_error(exc) and await self._postgres_lost()
            if lost or is_connection_error(exc):
                # An outage is not the events' fault: do not let it count towards the poison limit.
                with contextlib.suppress(Exception):
                    await self.redis.hdel(self.keys.reclaims, *(c.batch_id for c in claims))
            if lost:
                raise ConnectionLostError(f"PostgreSQL connection lost: {type(exc).__name__}: {exc}") from exc
            raise
        await self._ack(claims, dead, result)

    async def _postgres_lost(self) -> bool:
        """After an unclassified error: is the session gone? asyncpg can report a session the server
        terminated while it sat idle as an InternalClientError ("another operation is in progress")."""
        if self.conn.is_closed():
            return True
        try:
            await asyncio.wait_for(self.conn.fetchval("SELECT 1"), 5)
        except Exception:
            return True
        return False

    def _decode(self, claims: Sequence[Claim]) -> tuple[list[Event], list[bytes], list[bytes]]:
        limit = self.settings.analytics_max_metadata_bytes
        events: list[Event] = []
        raws: list[bytes] = []
        dead: list[bytes] = []
        for taken in claims:
            for raw in taken.items:
                try:
                    events.append(decode(raw, max_metadata_bytes=limit))
                except Exception as exc:  # ValidationError, or a decoder bug: never block the rest
                    field = getattr(exc, "field", None)
                    error = str(exc) if field else f"{type(exc).__name__}: {exc}"
                    dead.append(dead_letter_entry(raw, error, stage="decode", field=field))
                else:
                    raws.append(raw)
        return events, raws, dead

    async def _insert(self, events: Sequence[Event]) -> InsertResult:
        for attempt in range(1, _CONFLICT_ATTEMPTS + 1):
            try:
                return await insert_events(self.conn, events, before_commit=_before_commit)
            except asyncpg.PostgresError as exc:
                # Two drains inserting the same redelivered events can deadlock on the unique index.
                if not is_transient_conflict(exc) or attempt == _CONFLICT_ATTEMPTS:
                    raise
                logger.info("insert of %s rows hit %s; running it again", len(events), exc.sqlstate)
        raise AssertionError("unreachable")

    async def _insert_bisect(
        self, events: Sequence[Event], raws: Sequence[bytes], dead: list[bytes]
    ) -> InsertResult:
        try:
            return await self._insert(events)
        except Exception as exc:
            if not is_data_error(exc):
                raise
            if len(events) == 1:
                dead.append(
                    dead_letter_entry(
                        raws[0],
                        f"{type(exc).__name__}: {exc}",
                        stage="insert",
                        sqlstate=sqlstate_of(exc),
                        event_id=events[0].event_id,
                    )
                )
                return InsertResult(0, 0)
        middle = len(events) // 2
        left = await self._insert_bisect(events[:middle], raws[:middle], dead)
        right = await self._insert_bisect(events[middle:], raws[middle:], dead)
        return InsertResult(left.inserted + right.inserted, left.duplicates + right.duplicates)

    async def _ack(self, claims: Sequence[Claim], dead: list[bytes], result: InsertResult) -> None:
        claimed = sum(len(c.items) for c in claims)
        stats = {
            "claimed": claimed,
            "inserted": result.inserted,
            "duplicates": result.duplicates,
            "dead": len(dead),
        }
        await ack(self.redis, self.keys, [c.batch_id for c in claims], dead_letters=dead, stats=stats)
        summary = self.summary
        summary.claimed += claimed
        summary.inserted += result.inserted
        summary.duplicates += result.duplicates
        summary.dead_lettered += len(dead)
        summary.batches += len(claims)
        if dead:
            for entry in dead[:3]:
                logger.warning("dead-lettered to %s: %s", self.keys.dead, entry.decode()[:500])
            if len(dead) > 3:
                logger.warning("dead-lettered %s more event(s) to %s", len(dead) - 3, self.keys.dead)
        if self.progress is not None:
            self.progress(dataclasses.replace(summary))


async def _close(conn: asyncpg.Connection[Any]) -> None:
    try:
        await asyncio.wait_for(conn.close(), 5)
    except Exception:  # a broken connection cannot say goodbye: drop the socket
        conn.terminate()


async def drain(
    settings: Settings,
    *,
    time_budget: float | None = None,
    progress: Callable[[DrainSummary], None] | None = None,
) -> DrainSummary:
    """Drain the queue of ``settings`` into PostgreSQL until it is empty or ``time_budget`` seconds
    (default ``analytics_drain_time_budget``) are spent; ``progress`` is called after every ack."""
    started = time.monotonic()
    budget = settings.analytics_drain_time_budget if time_budget is None else time_budget
    keys = QueueKeys(settings.analytics_key_prefix)
    timeout = settings.analytics_redis_timeout
    redis = aioredis.Redis.from_url(
        settings.redis_dsn, socket_timeout=timeout, socket_connect_timeout=timeout
    )
    conn: asyncpg.Connection[Any] | None = None
    worker: _Drain | None = None
    try:
        leases = await expired_leases(redis, keys, settings.analytics_visibility_timeout)
        if leases or await redis.llen(keys.queue):
            # Connect only when there is work: an idle beat tick costs two Redis commands.
            conn = await asyncpg.connect(
                asyncpg_dsn(settings.database_url),
                timeout=_CONNECT_TIMEOUT,
                server_settings={"application_name": _APPLICATION_NAME},
            )
            worker = _Drain(settings, redis, conn, started + budget, progress)
            await worker.reclaim(leases)
            if not worker.summary.budget_spent:
                await worker.claim_fresh()
        summary = worker.summary if worker is not None else DrainSummary()
        summary.backlog = int(await redis.llen(keys.queue))
        summary.seconds = time.monotonic() - started
        line = orjson.dumps(summary.as_dict())
        await redis.hset(keys.stats, mapping={"last_flush_at": time.time(), "last_summary": line})
    except BaseException as exc:
        done = worker.summary.as_dict() if worker is not None else "nothing claimed"
        logger.warning("drain of %s stopped by %r; done so far: %s", keys.queue, exc, done)
        raise
    finally:
        if conn is not None:
            await _close(conn)
        await redis.aclose()
    logger.info(
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
