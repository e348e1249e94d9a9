"""Start-up checks of the worker (and the CLI's flush): a Redis that runs the scripts, a migrated table.

- **Redis >= 7.0** (on a cluster: on every primary): every drain script starts with
  ``#!lua flags=allow-oom``, which older servers cannot compile, so on 6.2 nothing would ever drain.
  That never fixes itself: the worker refuses to start (exit code 2) with the version found and the
  version needed, and so does the CLI's flush.
- **The table**: a worker started before ``analytics-bridge migrate`` (no table, a column missing, or
  a revision older than the code's, :func:`bridge.schema.schema_problem`) logs one ERROR naming
  migrate and keeps running. Refusing would crash-loop a deployment that starts workers and runs migrate in
  parallel (a Kubernetes Job, a release script); running, each drain holds its batches with one ERROR
  line and the first drain after migrate lands them, with no restart.
- The CLI's flush checks both before it claims anything, so it exits 2 on a missing or outdated
  table even with an empty queue (where the drain itself would not connect to PostgreSQL at all).
- **Scripts** are loaded on every node of a cluster at worker start (one SCRIPT LOAD per script and
  node: cheap); a node promoted later, or a plain Redis, gets them through the EVALSHA -> EVAL fallback.
- A service that does not answer yet is logged and not fatal: the broker connection retries at
  start-up, and the drain retries like any outage.

Everything runs under one ``asyncio.run`` in the worker's main process before the pool forks; every
client is made and closed inside it, so nothing crosses the fork.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import RedisClusterException, RedisError

from analytics_sdk._redis import cluster_client, load_scripts
from analytics_sdk._settings import Settings, redact_url

from ._errors import NotMigrated, RedisTooOld, advice, is_connection_error
from .schema import asyncpg_dsn, schema_problem

__all__ = [
    "REDIS_MIN_VERSION",
    "check_postgres",
    "check_redis",
    "check_redis_version",
    "worker_preflight",
]

logger = logging.getLogger(__name__)

#: ``#!lua flags=...`` in the scripts' first line (Redis 7.0 release notes, "Function flags").
REDIS_MIN_VERSION = (7, 0)
_NEEDED = ".".join(map(str, REDIS_MIN_VERSION))
_TIMEOUT = 10.0


def check_redis_version(version: str, where: str = "Redis") -> None:
    """Raise :class:`RedisTooOld` unless ``version`` (INFO's ``redis_version``) is >= 7.0."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise RedisTooOld(f"{where} reports version {version!r}; the bridge needs Redis >= {_NEEDED}")
    if (int(match[1]), int(match[2])) < REDIS_MIN_VERSION:
        raise RedisTooOld(
            f"{where} is version {version}; the bridge needs Redis >= {_NEEDED} (its scripts declare "
            "`#!lua flags=allow-oom`, which older servers cannot compile, so nothing would drain): "
            "upgrade Redis or point ANALYTICS_REDIS_URL at a newer server"
        )


async def redis_version(client: aioredis.Redis) -> str:
    info: dict[str, Any] = await client.info("server")
    return str(info["redis_version"])


async def _check_cluster(settings: Settings, *, load: bool) -> str:
    """``INFO server`` on every primary of the cluster (a shard's scripts run on its primary, any
    of them); the lowest version found is returned. With ``load``, the scripts are loaded on every
    node too (a warm-up: EVALSHA falls back to EVAL on a node without them)."""
    client = cluster_client(settings, startup_nodes=settings.cluster_startup_nodes)
    try:
        await client.initialize()
        versions: list[tuple[str, str]] = []
        for node in client.get_primaries():
            info: Any = await client.execute_command("INFO", "server", target_nodes=node)
            versions.append((str(node.name), str(info["redis_version"])))
        for name, version in versions:
            check_redis_version(version, f"Redis Cluster primary {name}")
        if load:  # a warm-up only: load_scripts logs a node it cannot reach and goes on
            await load_scripts(client)
    finally:
        await client.aclose()
    return min((v for _, v in versions), key=_version_key, default="?")


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


async def check_redis(settings: Settings, *, load: bool = False) -> str:
    """Ask the queue's Redis for its version (``INFO server``) and check it; returns the version.
    On a cluster every primary is asked, and with ``load`` the queue scripts are loaded on every node
    (a plain Redis loads them on first use: one EVAL per script, and no SCRIPT in its ACL)."""
    if settings.analytics_redis_cluster:
        return await _check_cluster(settings, load=load)
    timeout = settings.analytics_redis_timeout
    client = aioredis.Redis.from_url(
        settings.redis_dsn, socket_timeout=timeout, socket_connect_timeout=timeout
    )
    try:
        version = await redis_version(client)
    finally:
        await client.aclose()
    check_redis_version(version, f"Redis at {redact_url(settings.redis_dsn)}")
    return version


async def _check_postgres(settings: Settings) -> str | None:
    """The schema problem of the configured database, or None when the drain can write to it."""
    conn = await asyncpg.connect(asyncpg_dsn(settings.database_url), timeout=_TIMEOUT)
    try:
        return await schema_problem(conn)
    finally:
        await conn.close()


async def check_postgres(settings: Settings) -> None:
    """Raise :class:`NotMigrated` (or what connecting raised) unless the drain can write the table."""
    problem = await _check_postgres(settings)
    if problem is not None:
        raise NotMigrated(problem)


async def _checks(settings: Settings) -> None:
    redis_url, database_url = redact_url(settings.redis_dsn), redact_url(settings.database_url)
    try:
        version = await check_redis(settings, load=True)
    except (RedisError, RedisClusterException) as exc:  # not fatal: the drain retries (RedisTooOld is
        # neither: it propagates)
        logger.error("start-up check: Redis at %s: %s", redis_url, advice(exc))
    else:
        logger.info("start-up check: Redis %s at %s", version, redis_url)
    try:
        problem = await _check_postgres(settings)
    except Exception as exc:
        level = logging.WARNING if is_connection_error(exc) else logging.ERROR
        logger.log(level, "start-up check: PostgreSQL at %s: %s", database_url, advice(exc))
        return
    if problem is not None:
        logger.error(
            "start-up check: PostgreSQL at %s: %s; until then every drain holds its events in flight",
            database_url,
            problem,
        )
    else:
        logger.info("start-up check: PostgreSQL at %s is migrated", database_url)


def worker_preflight(settings: Settings) -> None:
    """The worker's start-up check; raises ``SystemExit(2)`` (the worker stops) for a Redis < 7.0."""
    try:
        asyncio.run(_checks(settings))
    except RedisTooOld as exc:
        logger.critical("refusing to start: %s", exc)
        raise SystemExit(2) from exc
