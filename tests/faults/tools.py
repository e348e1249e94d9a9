"""Small tools the scenarios share: seed the queue, look at rows and backlog, hold a table lock,
and drive flush tasks while waiting for a condition (always with a deadline)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import asyncpg
import pytest
import redis

from analytics_sdk import AnalyticsClient, Settings
from analytics_sdk._queue import QueueKeys

from .ledger import Ledger

__all__ = [
    "TableLock",
    "backlog",
    "db_fetchval",
    "drive_until",
    "in_flight",
    "lock_waiters",
    "rows",
    "seed",
    "stats",
]


def seed(
    settings: Settings,
    count: int,
    *,
    chunk: int = 1_000,
    event_type: str = "seed",
    created_at: datetime | None = None,
) -> Ledger:
    """Track ``count`` events through the SDK (track_many, ``chunk`` per MULTI); all accepted.
    ``created_at`` gives them all that time (default: the time of tracking)."""
    when = {} if created_at is None else {"created_at": created_at}

    async def push() -> list[str]:
        ids: list[str] = []
        async with AnalyticsClient(settings) as client:
            for start in range(0, count, chunk):
                batch = [
                    {"event_type": event_type, "user_id": str(i), "event_metadata": {"i": i}, **when}
                    for i in range(start, min(count, start + chunk))
                ]
                ids += await client.track_many(batch)
        return ids

    ledger = Ledger()
    ledger.accept(asyncio.run(push()))
    assert len(ledger.accepted) == count
    return ledger


def db_fetchval(settings: Settings, sql: str, *args: Any) -> Any:
    async def fetch() -> Any:
        conn = await asyncpg.connect(settings.database_url, timeout=10)
        try:
            return await conn.fetchval(sql, *args)
        finally:
            await conn.close()

    return asyncio.run(fetch())


def rows(settings: Settings) -> int:
    return int(db_fetchval(settings, "SELECT count(*) FROM analytics_events"))


def lock_waiters(settings: Settings) -> int:
    """Backends of this database waiting on a lock (a drain blocked behind our TableLock)."""
    return int(
        db_fetchval(
            settings,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'",
        )
    )


def backlog(settings: Settings) -> tuple[int, int]:
    """(events queued, leases in flight)."""
    keys = QueueKeys(settings.analytics_key_prefix)
    with redis.Redis.from_url(settings.redis_dsn, socket_timeout=5) as r:
        return int(r.llen(keys.queue)), int(r.zcard(keys.leases))


def in_flight(settings: Settings) -> int:
    """Events held in the in-flight lists of all current leases."""
    keys = QueueKeys(settings.analytics_key_prefix)
    with redis.Redis.from_url(settings.redis_dsn, socket_timeout=5) as r:
        return sum(int(r.llen(keys.inflight(b.decode()))) for b in r.zrange(keys.leases, 0, -1))


def stats(settings: Settings) -> dict[str, str]:
    keys = QueueKeys(settings.analytics_key_prefix)
    with redis.Redis.from_url(settings.redis_dsn, socket_timeout=5) as r:
        return {k.decode(): v.decode() for k, v in r.hgetall(keys.stats).items()}


def drive_until(
    predicate: Callable[[], object],
    send: Callable[[], object],
    *,
    timeout: float,
    every: float = 1.0,
    message: str = "",
) -> None:
    """Send a flush task every ``every`` s until ``predicate()`` holds; fail past ``timeout``.

    Reclaiming a dead drain's lease needs a drain that runs after the visibility timeout: in
    production beat provides it, here this loop does (deterministically, without a beat process).
    """
    deadline = time.monotonic() + timeout
    next_send = 0.0
    while not predicate():
        now = time.monotonic()
        if now > deadline:
            pytest.fail(f"condition not met within {timeout}s: {message or predicate}")
        if now >= next_send:
            send()
            next_send = now + every
        time.sleep(0.1)


class TableLock:
    """Hold ``LOCK TABLE analytics_events IN ACCESS EXCLUSIVE MODE`` from another connection.

    The lock lives in a thread with its own event loop (and its own asyncpg connection, made and
    closed there), so sync tests can hold it while a worker's insert blocks behind it.
    """

    def __init__(self, database_url: str, table: str = "analytics_events") -> None:
        self.database_url = database_url
        self.table = table
        self._locked = threading.Event()
        self._release = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="table-lock", daemon=True)

    def __enter__(self) -> TableLock:
        self._thread.start()
        if not self._locked.wait(15) or self._error is not None:
            self.release()
            raise RuntimeError(f"could not lock {self.table}: {self._error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        self._release.set()
        self._thread.join(15)

    def _run(self) -> None:
        try:
            asyncio.run(self._hold())
        except BaseException as exc:
            self._error = exc
            self._locked.set()

    async def _hold(self) -> None:
        conn = await asyncpg.connect(self.database_url, timeout=10)
        try:
            transaction = conn.transaction()
            await transaction.start()
            await conn.execute(f"LOCK TABLE {self.table} IN ACCESS EXCLUSIVE MODE")
            self._locked.set()
            await asyncio.get_running_loop().run_in_executor(None, self._release.wait)
            await transaction.rollback()
        finally:
            await conn.close()
