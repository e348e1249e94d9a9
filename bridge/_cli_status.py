"""`analytics-bridge status`: read every figure an operator needs, and render it as a table or JSON.

Read-only: it never changes a key. Redis and PostgreSQL are asked separately, so a dead database
still leaves the queue figures visible (and the other way round).
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from analytics_sdk._queue import QueueKeys
from analytics_sdk._settings import Settings, redact_url

__all__ = ["START_POSTGRES", "START_REDIS", "collect_status", "redis_client", "render_status", "warnings_for"]

#: How to start the services on a machine like the CI's (Debian packages), shown when one is down.
START_REDIS = (
    "redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save '' --appendonly no "
    "--dir /var/lib/redis --logfile /var/log/redis/ci.log"
)
START_POSTGRES = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"

_SHOWN_BATCHES = 20  # in-flight batches listed one by one (the oldest first); all are counted
_COUNT_TIMEOUT = 5.0  # seconds for count(*) before falling back to the planner's estimate


def redis_client(settings: Settings) -> aioredis.Redis:
    """A Redis client for one CLI command; the caller closes it inside the same event loop."""
    timeout = settings.analytics_redis_timeout
    return aioredis.Redis.from_url(settings.redis_dsn, socket_timeout=timeout, socket_connect_timeout=timeout)


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def _oldest_age(head: bytes | None, now: float) -> tuple[float | None, str | None]:
    """Age in seconds of the head item from its created_at, or (None, why not)."""
    if head is None:
        return None, None
    try:
        created = datetime.fromisoformat(orjson.loads(head)["created_at"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        # The drain will dead-letter it; status only reports that the age is unknown.
        return None, "the head item is not a readable event"
    if created.tzinfo is None:
        created = created.replace(tzinfo=UTC)
    return max(0.0, now - created.timestamp()), None


async def _redis_figures(settings: Settings, now: float) -> dict[str, Any]:
    keys = QueueKeys(settings.analytics_key_prefix)
    client = redis_client(settings)
    try:
        async with client.pipeline(transaction=False) as pipe:
            pipe.llen(keys.queue)
            pipe.lindex(keys.queue, 0)
            pipe.zcard(keys.leases)
            pipe.zrange(keys.leases, 0, _SHOWN_BATCHES - 1, withscores=True)
            pipe.llen(keys.dead)
            pipe.get(keys.dropped)
            pipe.hgetall(keys.stats)
            depth, head, lease_count, leases, dead, dropped, stats = await pipe.execute()
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
                        "age_seconds": round(max(0.0, now - float(score) / 1000), 3),
                        "events": int(counts[2 * i]),
                        "reclaims": int(counts[2 * i + 1] or 0),
                    }
                )
    finally:
        await client.aclose()
    age, age_error = _oldest_age(head, now)
    stats = {_text(k): _text(v) for k, v in stats.items()}
    last_at = float(stats["last_flush_at"]) if stats.get("last_flush_at") else None
    summary = orjson.loads(stats["last_summary"]) if stats.get("last_summary") else None
    return {
        "queue": {
            "depth": int(depth),
            "cap": settings.analytics_max_queue_size,
            "oldest_age_seconds": None if age is None else round(age, 3),
            **({"oldest_error": age_error} if age_error else {}),
        },
        "in_flight": {
            "batches": int(lease_count),
            "oldest_age_seconds": batches[0]["age_seconds"] if batches else None,
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
            "age_seconds": round(max(0.0, now - last_at), 3),
            "summary": summary,
        },
    }


async def _row_count(database_url: str) -> dict[str, Any]:
    from .schema import asyncpg_dsn  # the bridge extra; imported here so `status` of Redis never needs it

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
    """Every figure of `status`; an unreachable service yields an ``error`` entry, not an exception."""
    now = time.time()
    result: dict[str, Any] = {
        "redis": redact_url(settings.redis_dsn),
        "key_prefix": settings.analytics_key_prefix,
        "flush_interval": settings.analytics_flush_interval,
    }
    redis_part: dict[str, Any] | BaseException
    db_part: dict[str, Any] | BaseException
    redis_part, db_part = await asyncio.gather(
        _redis_figures(settings, now), _row_count(settings.database_url), return_exceptions=True
    )
    if isinstance(redis_part, BaseException):
        if not isinstance(redis_part, RedisError | OSError):
            raise redis_part
        result["redis_error"] = str(redis_part)
    else:
        result.update(redis_part)
    database: dict[str, Any] = {"url": redact_url(settings.database_url)}
    if isinstance(db_part, BaseException):
        if not isinstance(db_part, OSError | asyncpg.PostgresError | TimeoutError):
            raise db_part
        database["error"] = str(db_part) or type(db_part).__name__
    else:
        database.update(db_part)
    result["database"] = database
    return result


def warnings_for(status: dict[str, Any]) -> list[str]:
    """What needs an operator's attention, one line each (the README says what to do)."""
    out = []
    interval = float(status["flush_interval"])
    if "redis_error" in status:
        out.append(f"Redis unreachable: {status['redis_error']}; start it: {START_REDIS}")
    if "error" in status["database"]:
        error = status["database"]["error"]
        if "does not exist" in error:
            out.append(f"PostgreSQL: {error}; run `analytics-bridge migrate`")
        else:
            out.append(f"PostgreSQL unreachable: {error}; start it: {START_POSTGRES}")
    if "queue" not in status:
        return out
    age = status["queue"]["oldest_age_seconds"]
    if age is not None and age > 3 * interval:
        out.append(
            f"the oldest queued event waits for {age:.0f}s (> 3 flush intervals): is a worker running?"
        )
    if status["queue"]["depth"] >= 0.8 * status["queue"]["cap"]:
        out.append("the queue is at 80% of its cap: events will be dropped; add workers")
    expired = [
        b
        for b in status["in_flight"]["shown"]
        if b["age_seconds"] > status["in_flight"]["visibility_timeout"]
    ]
    if expired:
        out.append(
            f"{len(expired)} in-flight batch(es) past the visibility timeout: the next drain reclaims them"
        )
    if status["dead_letters"]:
        out.append(f"{status['dead_letters']} dead letter(s): see `analytics-bridge dead-letters list`")
    if status["dropped"]:
        out.append(f"{status['dropped']} event(s) dropped by the queue cap since the counter was created")
    last = status["last_flush"]
    if last is None:
        out.append("no flush recorded yet for this key prefix")
    elif last["age_seconds"] > 3 * interval and status["queue"]["depth"]:
        out.append(f"the last flush was {last['age_seconds']:.0f}s ago with events waiting: is beat running?")
    return out


def _age(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f}s"


def render_status(status: dict[str, Any]) -> str:
    """The readable table of `status`."""
    lines = [("redis", f"{status['redis']}  (prefix {status['key_prefix']!r})")]
    if "queue" in status:
        queue, flight = status["queue"], status["in_flight"]
        oldest = queue.get("oldest_error") or _age(queue["oldest_age_seconds"])
        lines += [
            ("queue depth", f"{queue['depth']:,} of cap {queue['cap']:,}"),
            ("oldest queued", oldest),
            ("in-flight batches", f"{flight['batches']}  (oldest {_age(flight['oldest_age_seconds'])})"),
        ]
        for batch in flight["shown"]:
            lines.append(
                (
                    "",
                    f"  {batch['batch_id']}: {batch['events']} events, age {batch['age_seconds']:.1f}s,"
                    f" reclaimed {batch['reclaims']}x",
                )
            )
        totals = status["totals"]
        lines += [
            ("dead letters", f"{status['dead_letters']:,}"),
            ("dropped (cap)", f"{status['dropped']:,}"),
            ("totals", ", ".join(f"{k} {v:,}" for k, v in totals.items())),
        ]
        last = status["last_flush"]
        if last is None:
            lines.append(("last flush", "never"))
        else:
            lines.append(("last flush", f"{last['at']} ({_age(last['age_seconds'])} ago)"))
            summary = last["summary"] or {}
            lines.append(("", "  " + ", ".join(f"{k} {v}" for k, v in summary.items())))
    database = status["database"]
    if "error" in database:
        lines.append(("rows in table", f"unknown ({database['url']})"))
    else:
        approx = "~" if database["estimated"] else ""
        lines.append(("rows in table", f"{approx}{database['rows']:,}  ({database['url']})"))
    width = max(len(label) for label, _ in lines)
    text = [f"{label:<{width}}  {value}" for label, value in lines]
    text += [f"WARNING: {w}" for w in warnings_for(status)]
    return "\n".join(text)
