"""One unit of the drain's work: decode claimed items, insert them, ack the claims.

:class:`BatchWriter` holds a drain's Redis client, PostgreSQL connection and running
:class:`DrainSummary`; :mod:`bridge.drain` decides what to claim and when to stop.

- An item that does not decode is dead-lettered with its reason (``stage: decode``).
- A data error (SQLSTATE 22/23) bisects the rows until each bad one failed alone; those are
  dead-lettered with SQLSTATE and message (``stage: insert``), the rest commit. When the refusal is
  the database's (every row fails the same way, an identity sequence behind the rows), the batch is
  held like an environment error: :meth:`BatchWriter._insert_bisect`.
- A connection or environment error leaves the claims in flight (released for the next drain),
  writes no dead letter and propagates; an environment error is logged once at ERROR with advice.
- The ack (dead letters, counters, release of every claim) runs only after the COMMIT, in one
  allow-oom Lua script (atomic like a MULTI, and still allowed when Redis is at maxmemory).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from analytics_sdk._event import Event, decode, decode_many
from analytics_sdk._queue import Claim, QueueKeys, dead_letter_entry
from analytics_sdk._settings import Settings

from . import _failpoints
from ._errors import (
    ConnectionLostError,
    advice,
    is_connection_error,
    is_data_error,
    is_environment_error,
    is_transient_conflict,
    mark_reported,
    sqlstate_of,
    was_reported,
)
from ._held import held_at_once, held_before_bisecting, held_by_environment
from ._leases import LeaseKeeper
from ._straight import copy_straight
from .store import InsertResult, insert_events

__all__ = ["BatchWriter", "DrainSummary"]

logger = logging.getLogger(__name__)

_CONFLICT_ATTEMPTS = 3
#: Events decoded between two hand-backs of the loop (a few hundred microseconds of work).
YIELD_EVERY = 128


@dataclass
class DrainSummary:
    """What one drain did. ``claimed`` counts every event it took (fresh claims and take-overs);
    ``reclaimed`` the part of those taken over from expired leases; ``batches`` the leases released;
    ``backlog`` the queue length when it stopped; ``budget_spent`` whether the time budget stopped it;
    ``stopped`` whether a worker shutdown did."""

    claimed: int = 0
    inserted: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    reclaimed: int = 0
    batches: int = 0
    seconds: float = 0.0
    backlog: int = 0
    budget_spent: bool = False
    stopped: bool = False  # the worker is shutting down: claimed nothing more, released the rest

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["seconds"] = round(self.seconds, 3)
        return data


# (events that decoded, their raw payloads, dead-letter entries for those that did not)
_Decoded = tuple[list[Event], list[bytes], list[bytes]]


def _decode_one(raw: bytes, limit: int) -> Event | Exception:
    try:
        return decode(raw, max_metadata_bytes=limit)
    except Exception as exc:  # ValidationError, or a decoder bug: never block the rest
        return exc


def _before_commit() -> None:
    _failpoints.hit("before_commit")


class BatchWriter:
    """Decode, insert and ack claims over one drain's connections, counting into ``summary``."""

    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        conn: asyncpg.Connection[Any],
        progress: Callable[[DrainSummary], None] | None = None,
    ) -> None:
        self.settings = settings
        self.keys = QueueKeys(settings.analytics_key_prefix)  # the base's; a Claim carries its shard's
        self.redis = redis
        self.conn = conn
        self.progress = progress
        self.summary = DrainSummary()
        self.keeper = LeaseKeeper(redis, self.keys, settings.analytics_visibility_timeout)

    async def process(self, claims: Sequence[Claim]) -> None:
        """Decode, insert and ack ``claims``; on a connection error leave them in flight and raise."""
        _failpoints.hit("after_claim")
        await self.store(claims, self.decode(claims))

    async def decode_yielding(self, claims: Sequence[Claim]) -> _Decoded:
        """:meth:`decode`, handing the loop back every :data:`YIELD_EVERY` events: the group in the
        database sends its next command (COMMIT after the INSERT, the ack after the COMMIT) within a
        fraction of a millisecond instead of after the whole group is decoded, so the two overlap."""
        events: list[Event] = []
        raws: list[bytes] = []
        dead: list[bytes] = []
        for taken in claims:
            items = taken.items
            for start in range(0, len(items), YIELD_EVERY):
                part = self._decode_items(items[start : start + YIELD_EVERY])
                events += part[0]
                raws += part[1]
                dead += part[2]
                await asyncio.sleep(0)
        return events, raws, dead

    async def store(self, claims: Sequence[Claim], decoded: _Decoded, *, fresh: bool = False) -> None:
        """Insert what ``claims`` decoded to and ack them. ``fresh`` claims (none taken over) try a
        COPY straight into the table first (:mod:`bridge._straight`), which steps aside for the
        staging path whenever PostgreSQL refuses anything."""
        events, raws, dead = decoded
        try:
            result = InsertResult(0, 0)
            if events:
                _failpoints.crash_on_event(e.event_id for e in events)
                step = self.settings.analytics_insert_batch_size
                for start in range(0, len(events), step):
                    part = None
                    if fresh:
                        part = await copy_straight(
                            self.conn, events[start : start + step], before_commit=_before_commit
                        )
                    if part is None:
                        part = await self._insert_bisect(
                            events[start : start + step], raws[start : start + step], dead
                        )
                    result = InsertResult(
                        result.inserted + part.inserted, result.duplicates + part.duplicates
                    )
            _failpoints.hit("after_commit")
        except Exception as exc:
            conflict = is_transient_conflict(exc)  # a deadlock that outlasted its re-runs
            lost = not (conflict or is_connection_error(exc)) and await self._postgres_lost()
            if lost or conflict or is_connection_error(exc) or is_environment_error(exc):
                # Not the events' fault: keep them in flight but release them for the next drain
                # now, and do not let the outage count towards the poison limit.
                await self.release(claims)
            if lost or conflict:  # retried by the task like an outage
                what = "PostgreSQL connection lost" if lost else "insert kept deadlocking"
                raise ConnectionLostError(f"{what}: {type(exc).__name__}: {exc}") from exc
            raise
        await self.ack(claims, dead, result)

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

    def decode(self, claims: Sequence[Claim]) -> _Decoded:
        return self._decode_items([raw for taken in claims for raw in taken.items])

    def _decode_items(self, items: Sequence[bytes]) -> _Decoded:
        limit = self.settings.analytics_max_metadata_bytes
        events: list[Event] = []
        raws: list[bytes] = []
        dead: list[bytes] = []
        try:
            decoded: Sequence[Event | Exception] = decode_many(items, max_metadata_bytes=limit)
        except Exception:  # a decoder bug: one by one, so that it blocks only its own event
            decoded = [_decode_one(raw, limit) for raw in items]
        for raw, item in zip(items, decoded, strict=True):
            if isinstance(item, Exception):  # ValidationError, or a decoder bug: never block the rest
                field = getattr(item, "field", None)
                error = str(item) if field else f"{type(item).__name__}: {item}"
                dead.append(dead_letter_entry(raw, error, stage="decode", field=field))
            else:
                events.append(item)
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
        """Insert ``events``, bisecting on a data error; append a dead letter for each row that fails
        alone while its neighbours commit.

        Raises :class:`HeldByEnvironment` (the batch is held, nothing dead-lettered) when the refusal
        is the database's: a unique violation on a constraint other than event_id's (an identity
        sequence behind restored rows), a NOT NULL on a column the bridge never writes, or every row
        failing with the same SQLSTATE and constraint. Any other environment error (read-only, disk
        full...) propagates unchanged. Either way one ERROR line says what to do."""
        failures: list[tuple[int, BaseException]] = []
        try:
            result = await self._bisect(events, 0, failures, first=True)
            if failures:
                held = await held_by_environment(self.conn, len(events), failures)
                if held is not None:
                    raise held from failures[0][1]
        except Exception as exc:
            if is_environment_error(exc) and not was_reported(exc):
                line = f"{len(events)} events held in flight, none dead-lettered: {advice(exc)}"
                logger.error("%s", line)
                mark_reported(exc, line)
            raise
        for index, error in failures:
            dead.append(
                dead_letter_entry(
                    raws[index],
                    f"{type(error).__name__}: {error}",
                    stage="insert",
                    sqlstate=sqlstate_of(error),
                    event_id=events[index].event_id,
                )
            )
        return result

    async def _bisect(
        self,
        events: Sequence[Event],
        offset: int,
        failures: list[tuple[int, BaseException]],
        first: bool = False,
    ) -> InsertResult:
        """Insert, halving on data errors; the rows that failed alone go to ``failures`` (by index)."""
        try:
            return await self._insert(events)
        except Exception as exc:
            if not is_data_error(exc):
                raise
            held = held_at_once(exc)
            if held is None and first and len(events) > 1:
                held = await held_before_bisecting(self.conn, exc)
            if held is not None:
                raise held from exc
            if len(events) == 1:
                failures.append((offset, exc))
                return InsertResult(0, 0)
        middle = len(events) // 2
        left = await self._bisect(events[:middle], offset, failures)
        right = await self._bisect(events[middle:], offset + middle, failures)
        return InsertResult(left.inserted + right.inserted, left.duplicates + right.duplicates)

    async def release(self, claims: Sequence[Claim]) -> None:
        """Give ``claims`` back for the next drain at once (their items stay in flight)."""
        await self.keeper.release(claims)

    async def ack(self, claims: Sequence[Claim], dead: list[bytes], result: InsertResult) -> None:
        ours, written = await self.keeper.ack(claims, dead, result.inserted, result.duplicates)
        summary = self.summary
        summary.claimed += sum(len(c.items) for c in ours)
        summary.inserted += result.inserted
        summary.duplicates += result.duplicates
        summary.dead_lettered += len(written)
        summary.batches += len(ours)
        if written:
            where = self.keeper.shard_of(ours[0]).dead
            for entry in written[:3]:
                logger.warning("dead-lettered to %s: %s", where, entry.decode()[:500])
            if len(written) > 3:
                logger.warning("dead-lettered %s more event(s) to %s", len(written) - 3, where)
        if self.progress is not None:
            self.progress(dataclasses.replace(summary))
