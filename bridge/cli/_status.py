"""`analytics-bridge status`: read every figure an operator needs (judged and rendered in
:mod:`._status_report`).

Read-only: it never changes a key. Every shard the drains visit is read (:mod:`._shard_figures`):
the figures `status` always had are totals over the shards, ``shards`` has one entry per shard.
Redis and PostgreSQL are asked separately, so a dead database
still leaves the queue figures visible (and the other way round). Every age is measured against
Redis's clock (``TIME``), the clock the lease scripts use, not this host's.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import msgspec
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    NoPermissionError,
    RedisClusterException,
    RedisError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from analytics_sdk._redis import redis_client
from analytics_sdk._settings import Settings, redact_url

from ._shard_figures import ShardRead, counters, merged_batches, read_shards
from ._status_report import render_status, warnings_for

__all__ = [
    "START_POSTGRES",
    "START_REDIS",
    "collect_status",
    "redis_client",
    "render_status",
    "status_failed",
    "warnings_for",
]

#: How to start the services on a machine like the CI's (Debian packages), shown when one is down.
START_REDIS = (
    "redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save '' --appendonly no "
    "--dir /var/lib/redis --logfile /var/log/redis/ci.log"
)
START_POSTGRES = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"

_COUNT_TIMEOUT = 5.0  # seconds for count(*) before falling back to the planner's estimate
_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def redis_start_hint(settings: Settings) -> str:
    """How to bring the configured Redis up: the start command only where it fits (this host)."""
    parts = urlsplit(settings.redis_dsn)
    if parts.scheme == "unix":
        return f"start the Redis listening on {parts.path}, or point ANALYTICS_REDIS_URL elsewhere"
    host, port = parts.hostname or "127.0.0.1", parts.port or 6379
    if host in _LOCAL_HOSTS:
        return f"start it: {START_REDIS.replace('--port 6379', f'--port {port}')}"
    return f"check that {host}:{port} is up and reachable from here, or point ANALYTICS_REDIS_URL elsewhere"


def _redis_error(exc: RedisError | OSError | RedisClusterException, settings: Settings) -> tuple[str, str]:
    """(kind, advice) for a Redis failure; the message itself is reported beside it."""
    if isinstance(exc, AuthenticationError):
        return "auth", "check the user and password in ANALYTICS_REDIS_URL (or ANALYTICS_REDIS_PASSWORD)"
    if isinstance(exc, AuthorizationError | NoPermissionError):
        return "refused", (
            "the Redis user lacks a command or key status reads: see the ACL lines in docs/operations.md"
        )
    if isinstance(exc, OSError | RedisConnectionError | RedisTimeoutError | RedisClusterException):
        return "unreachable", redis_start_hint(settings)
    return "refused", "see the Redis server's log"


def _database_error(exc: BaseException) -> tuple[str, str]:
    """(kind, advice) for a PostgreSQL failure: unreachable, missing, not migrated or refusing."""
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return "no_database", "run `analytics-bridge migrate` (it creates the database), or fix the URL"
    if isinstance(exc, asyncpg.UndefinedTableError):
        return "not_migrated", "run `analytics-bridge migrate` against this database"
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError | asyncpg.InvalidPasswordError):
        return "auth", "check the user and password in ANALYTICS_DATABASE_URL"
    if isinstance(exc, asyncpg.PostgresError):
        return "refused", f"SQLSTATE {exc.sqlstate}: see the PostgreSQL server's log"
    return "unreachable", f"start it: {START_POSTGRES}, or point ANALYTICS_DATABASE_URL elsewhere"


def _created_age(head: bytes | None, now: float) -> tuple[float | None, str | None]:
    """Seconds since the head item's ``created_at`` (client-supplied: a backfill is old by design, so
    this is no measure of waiting), or (None, why not)."""
    if head is None:
        return None, None
    try:
        created = datetime.fromisoformat(msgspec.json.decode(head)["created_at"])
    except (msgspec.DecodeError, KeyError, TypeError, ValueError):
        # The drain will dead-letter it; status only reports that the age is unknown.
        return None, "the head item is not a readable event"
    if created.tzinfo is None:
        created = created.replace(tzinfo=UTC)
    return max(0.0, now - created.timestamp()), None


def _shard_line(read: ShardRead) -> dict[str, Any]:
    """One shard's figures for ``status``'s ``shards`` list."""
    age, _ = _created_age(read["head"], read["now"])
    aged = [b["age_seconds"] for b in read["batches"] if b["age_seconds"] is not None]
    return {
        "shard": read["keys"].prefix,
        "queue": read["keys"].queue,
        "depth": read["depth"],
        "oldest_age_seconds": None if age is None else round(age, 3),
        "in_flight": read["lease_count"],
        "in_flight_oldest_age_seconds": max(aged) if aged else None,
        "dead_letters": read["dead"],
        "dropped": read["dropped"],
    }


async def _redis_figures(settings: Settings) -> dict[str, Any]:
    reads, base_stats = await read_shards(settings)
    now = max(read["now"] for read in reads)
    shards = [_shard_line(read) for read in reads]
    ages = [(line["oldest_age_seconds"], read) for line, read in zip(shards, reads, strict=True)]
    known = [age for age, _ in ages if age is not None]
    # A head item that is no readable event: its age is unknown (reported once, whichever shard).
    age_error = next(
        (_created_age(read["head"], read["now"])[1] for age, read in ages if age is None and read["head"]),
        None,
    )
    batches = merged_batches(reads)
    aged = [line["in_flight_oldest_age_seconds"] for line in shards]
    newest = [read["newest_age"] for read in reads if read["newest_age"] is not None]
    flushed = base_stats.get("last_flush_at")
    last_at = float(flushed) if flushed else None
    summary = base_stats.get("last_summary")
    return {
        "redis_time": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
        "queue": {
            "depth": sum(read["depth"] for read in reads),
            "cap": settings.analytics_max_queue_size,
            # From the head event's created_at; the "is a worker running?" warning never uses it.
            "oldest_age_seconds": max(known) if known else None,
            **({"oldest_error": age_error} if age_error else {}),
        },
        "in_flight": {
            "batches": sum(read["lease_count"] for read in reads),
            "oldest_age_seconds": max((a for a in aged if a is not None), default=None),
            # The most recently claimed or renewed lease: a fresh one means a drain is at work.
            "newest_age_seconds": min(newest) if newest else None,
            "visibility_timeout": settings.analytics_visibility_timeout,
            "shown": batches,
        },
        "dead_letters": sum(read["dead"] for read in reads),
        "dropped": sum(read["dropped"] for read in reads),
        "totals": counters(reads),
        "last_flush": None
        if last_at is None
        else {
            "at": datetime.fromtimestamp(last_at, UTC).isoformat(timespec="seconds"),
            # the drain writes last_flush_at from Redis's TIME, the same clock as ``now``
            "age_seconds": round(max(0.0, now - last_at), 3),
            "summary": msgspec.json.decode(summary) if summary else None,
        },
        # Per shard (one entry with K = 1): every shard of every K recorded, as the drains visit them.
        "shards": shards,
    }


async def _row_count(database_url: str) -> dict[str, Any]:
    from ..schema import asyncpg_dsn  # the bridge extra; imported here so `status` of Redis never needs it

    conn = await asyncpg.connect(asyncpg_dsn(database_url), timeout=_COUNT_TIMEOUT)
    try:
        try:
            rows = await conn.fetchval("SELECT count(*) FROM analytics_events", timeout=_COUNT_TIMEOUT)
            return {"rows": int(rows), "estimated": False}
        except (TimeoutError, asyncpg.QueryCanceledError):
            # count(*) reads the whole table; on a big one the planner's estimate answers at once.
            estimate = await conn.fetchval(
                "SELECT reltuples::bigint FROM pg_class WHERE oid = 'analytics_events'::regclass"
            )
            return {"rows": max(0, int(estimate)), "estimated": True}
    finally:
        await conn.close()


async def collect_status(settings: Settings) -> dict[str, Any]:
    """Every figure of `status`; a failing service yields an error entry (with its kind and the
    advice that fits it), not an exception."""
    result: dict[str, Any] = {
        "redis": redact_url(settings.redis_dsn),
        "key_prefix": settings.analytics_key_prefix,
        "flush_interval": settings.analytics_flush_interval,
    }
    redis_part: dict[str, Any] | BaseException
    db_part: dict[str, Any] | BaseException
    redis_part, db_part = await asyncio.gather(
        _redis_figures(settings), _row_count(settings.database_url), return_exceptions=True
    )
    if isinstance(redis_part, BaseException):
        if not isinstance(redis_part, RedisError | OSError | RedisClusterException):
            raise redis_part
        kind, advice = _redis_error(redis_part, settings)
        result.update(redis_error=str(redis_part), redis_error_kind=kind, redis_advice=advice)
    else:
        result.update(redis_part)
    database: dict[str, Any] = {"url": redact_url(settings.database_url)}
    if isinstance(db_part, BaseException):
        if not isinstance(db_part, OSError | asyncpg.PostgresError | TimeoutError):
            raise db_part
        kind, advice = _database_error(db_part)
        database.update(error=str(db_part) or type(db_part).__name__, error_kind=kind, advice=advice)
    else:
        database.update(db_part)
    result["database"] = database
    return result


def status_failed(status: dict[str, Any]) -> bool:
    """True when a figure is missing because a service is unreachable, unconfigured or not migrated:
    `status` then exits 2, so a probe can rely on the exit code alone."""
    return "redis_error" in status or "error" in status["database"]
