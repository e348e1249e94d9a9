"""Shared fixtures: the real Redis and PostgreSQL, isolated per test by key prefix and database.

A test that needs a service it cannot reach fails with the command that starts it; nothing skips.
Several test runs may share the machine's Redis at once, so no fixture ever runs FLUSHDB: each test
gets its own key prefix and deletes exactly its own keys before and after.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import secrets
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar

import pytest
import redis
import redis.asyncio as aioredis

from analytics_sdk import AnalyticsClient, Settings

REDIS_URL = os.environ.get("ANALYTICS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PG_ADMIN_URL = os.environ.get("ANALYTICS_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")

T = TypeVar("T")

START_REDIS = (
    "redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save '' --appendonly no "
    "--dir /var/lib/redis --logfile /var/log/redis/ci.log"
)
START_POSTGRES = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"


@pytest.fixture(scope="session")
def redis_available() -> str:
    try:
        with redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3) as probe:
            probe.ping()
    except redis.RedisError as exc:
        pytest.fail(
            f"Redis is not reachable at {REDIS_URL} ({exc}). Start it with:\n  {START_REDIS}\n"
            "or point ANALYTICS_TEST_REDIS_URL at a running server.",
            pytrace=False,
        )
    return REDIS_URL


def _delete_prefix(url: str, prefix: str) -> None:
    # the prefix's own keys, and its shards' (each under the hash tag {<prefix>:<i>...}, see _shards)
    with redis.Redis.from_url(url) as sync:
        keys = [
            key
            for pattern in (f"{prefix}:*", f"{{{prefix}:*")
            for key in sync.scan_iter(match=pattern, count=1000)
        ]
        if keys:
            sync.delete(*keys)


@pytest.fixture
def key_prefix(redis_available: str) -> Iterator[str]:
    """A prefix no other test (or concurrent test run) uses; its keys are removed before and after."""
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    _delete_prefix(redis_available, prefix)
    yield prefix
    _delete_prefix(redis_available, prefix)


@pytest.fixture
def settings(redis_available: str, key_prefix: str) -> Settings:
    """Settings for the real Redis with this test's prefix; the backlog trigger off unless asked."""
    return Settings(
        redis_url=redis_available,
        analytics_key_prefix=key_prefix,
        analytics_backlog_trigger=False,
    )


@pytest.fixture
async def redis_client(redis_available: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_available)
    yield client
    await client.aclose()


@pytest.fixture
def sync_redis(redis_available: str) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_available) as client:
        yield client


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[AnalyticsClient]:
    async with AnalyticsClient(settings) as c:
        yield c


def _pg_fail(url: str, exc: BaseException) -> None:
    pytest.fail(
        f"PostgreSQL is not reachable at {url} ({exc}). Start it with:\n  {START_POSTGRES}\n"
        "or point ANALYTICS_TEST_PG_URL at a running server's maintenance database.",
        pytrace=False,
    )


async def _admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, migrated, dropped at the end."""
    name = f"analytics_test_{os.getpid()}_{secrets.token_hex(3)}"
    try:
        asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    except (TimeoutError, OSError) as exc:
        _pg_fail(PG_ADMIN_URL, exc)
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    url = f"{base}/{name}"
    from bridge.schema import migrate

    asyncio.run(migrate(url))
    yield url
    asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def db_settings(settings: Settings, database_url: str) -> Settings:
    """Redis with this test's prefix plus the session's PostgreSQL database (table emptied first)."""
    import asyncpg

    async def truncate() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute("TRUNCATE analytics_events")
        finally:
            await conn.close()

    run_blocking(truncate())
    return settings.replace(database_url=database_url)


def run_blocking(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run() in a fresh thread: usable from sync fixtures whether or not a loop is running."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()
