"""`analytics-bridge status`: read every figure an operator needs (judged and rendered in
:mod:`._status_report`).

Read-only: it never changes a key. Redis and PostgreSQL are asked separately, so a dead database
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
from redis.exceptions import AuthenticationError, AuthorizationError, NoPermissionError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from analytics_sdk._queue import QueueKeys
from analytics_sdk._redis import redis_client
from analytics_sdk._settings import Settings, redact_url

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

_SHOWN_BATCHES = 20  # in-flight batches listed one by one (the oldest first); all are counted
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


def _redis_error(exc: RedisError | OSError, settings: Settings) -> tuple[str, str]:
    """(kind, advice) for a Redis failure; the message itself is reported beside it."""
    if isinstance(exc, AuthenticationError):
        return "auth", "check the user and password in ANALYTICS_REDIS_URL (or ANALYTICS_REDIS_PASSWORD)"
    if isinstance(exc, AuthorizationError | NoPermissionError):
        return "refused", (
            "the Redis user lacks a command or key status reads: see the ACL lines in docs/operations.md"
        )
    if isinstance(exc, OSError | RedisConnectionError | RedisTimeoutError):
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


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


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


def _lease_age(score: float, now: float) -> float | None:
    """Seconds since a lease was last claimed, taken over or renewed; None for a lease its drain
    released (score 0: due for the next drain at once). A score ahead of Redis's clock (a lease scored
    by a host clock running fast) counts as fresh, not as a negative age."""
    if score <= 0:
        return None
    return round(max(0.0, now - score / 1000), 3)


async def _redis_figures(settings: Settings) -> dict[str, Any]:
    keys = QueueKeys(settings.analytics_key_prefix)
    client = redis_client(settings)
    try:
        async with client.pipeline(transaction=False) as pipe:
            pipe.time()
            pipe.llen(keys.queue)
            pipe.lindex(keys.queue, 0)
            pipe.zcard(keys.leases)
            pipe.zrange(keys.leases, 0, _SHOWN_BATCHES - 1, withscores=True)
            pipe.zrange(
                keys.leases, -1, -1, withscores=True
            )  # the highest score: ZRANGE, not ZREVRANGE (ACL)
            pipe.llen(keys.dead)
            pipe.get(keys.dropped)
            pipe.hgetall(keys.stats)
            (
                (seconds, micros),
                depth,
                head,
                lease_count,
                leases,
                newest,
                dead,
                dropped,
                stats,
            ) = await pipe.execute()
        now = int(seconds) + int(micros) / 1e6
        batches = []
        if leases:
            async with client.pipeline(transaction=False) as pipe:
                for member, _ in leases:
                    pipe.llen(keys.inflight(_text(member) or ""))
                    pipe.hget(keys.reclaims, member)
                counts = await pipe.execute()
            for i, (member, score) in enumerate(leases):
                batches.append(
                    {
                        "batch_id": _text(member),
                        "age_seconds": _lease_age(float(score), now),
                        "released": float(score) <= 0,
                        "events": int(counts[2 * i]),
                        "reclaims": int(counts[2 * i + 1] or 0),
                    }
                )
    finally:
        await client.aclose()
    age, age_error = _created_age(head, now)
    stats = {_text(k): _text(v) for k, v in stats.items()}
    last_at = float(stats["last_flush_at"]) if stats.get("last_flush_at") else None
    summary = msgspec.json.decode(stats["last_summary"]) if stats.get("last_summary") else None
    aged = [b["age_seconds"] for b in batches if b["age_seconds"] is not None]
    return {
        "redis_time": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
        "queue": {
            "depth": int(depth),
            "cap": settings.analytics_max_queue_size,
            # From the head event's created_at; the "is a worker running?" warning never uses it.
            "oldest_age_seconds": None if age is None else round(age, 3),
            **({"oldest_error": age_error} if age_error else {}),
        },
        "in_flight": {
            "batches": int(lease_count),
            "oldest_age_seconds": max(aged) if aged else None,
            # The most recently claimed or renewed lease: a fresh one means a drain is at work.
            "newest_age_seconds": _lease_age(float(newest[0][1]), now) if newest else None,
            "visibility_timeout": settings.analytics_visibility_timeout,
            "shown": batches,
        },
        "dead_letters": int(dead),
        "dropped": int(dropped or 0),
        "totals": {name: int(stats.get(name) or 0) for name in ("claimed", "inserted", "duplicates", "dead")},
        "last_flush": None
        if last_at is None
        else {
            "at": datetime.fromtimestamp(last_at, UTC).isoformat(timespec="seconds"),
            # the drain writes last_flush_at from Redis's TIME, the same clock as ``now``
            "age_seconds": round(max(0.0, now - last_at), 3),
            "summary": summary,
        },
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
        if not isinstance(redis_part, RedisError | OSError):
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
