"""Environment errors against the real PostgreSQL: held (released, never dead-lettered) with advice.

Each scenario that changes database settings or constraints gets a database of its own (``own_db``),
so nothing leaks into the session's shared one.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from click.testing import CliRunner, Result
from redis.exceptions import AuthenticationError

from analytics_sdk import AnalyticsClient, Settings
from analytics_sdk._queue import QueueKeys, expired_leases
from bridge._errors import (
    HeldByEnvironment,
    advice,
    is_configuration_error,
    is_connection_error,
    is_data_error,
    is_environment_error,
)
from bridge.cli import main
from bridge.drain import drain
from bridge.schema import migrate
from tests.conftest import PG_ADMIN_URL, _admin, run_blocking
from tests.faults.tools import TableLock
from tests.servers import free_port, start_redis


@pytest.fixture
async def own_db(settings: Settings) -> AsyncIterator[Settings]:
    """``settings`` with a fresh migrated database of this test's own (dropped afterwards)."""
    name = f"analytics_env_{secrets.token_hex(4)}"
    await _admin(f'CREATE DATABASE "{name}"')
    url = f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    await migrate(url)
    try:
        yield settings.replace(database_url=url)
    finally:
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _sql(settings: Settings, *statements: str) -> None:
    conn = await asyncpg.connect(settings.database_url)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def _rows(settings: Settings) -> int:
    conn = await asyncpg.connect(settings.database_url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM analytics_events"))
    finally:
        await conn.close()


async def _dead(redis_client: aioredis.Redis, keys: QueueKeys) -> list[dict[str, Any]]:
    return [json.loads(x) for x in await redis_client.lrange(keys.dead, 0, -1)]


# -- classification and advice -------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        asyncpg.ReadOnlySQLTransactionError("cannot execute INSERT in a read-only transaction"),
        asyncpg.DiskFullError("could not extend file"),
        asyncpg.OutOfMemoryError("out of memory"),
        asyncpg.PostgresIOError("could not read block"),
        asyncpg.InternalServerError("XX000"),
        asyncpg.UndefinedTableError('relation "analytics_events" does not exist'),
        asyncpg.InsufficientPrivilegeError("permission denied"),
        asyncpg.InvalidPasswordError("password authentication failed"),
        asyncpg.InvalidCatalogNameError("database does not exist"),
    ],
    ids=lambda e: e.sqlstate,
)
def test_server_errors_outside_22_23_are_environment_errors(exc: asyncpg.PostgresError) -> None:
    assert is_environment_error(exc)
    assert not is_data_error(exc) and not is_connection_error(exc)
    assert exc.sqlstate in advice(exc)


@pytest.mark.parametrize(
    "exc",
    [
        asyncpg.QueryCanceledError("canceling statement due to statement timeout"),
        asyncpg.LockNotAvailableError("canceling statement due to lock timeout"),
        asyncpg.TooManyConnectionsError("too many clients"),
        asyncpg.AdminShutdownError("terminating connection"),
        asyncpg.ConnectionFailureError("08006"),
    ],
    ids=lambda e: e.sqlstate,
)
def test_transient_states_are_retried_not_held(exc: asyncpg.PostgresError) -> None:
    assert is_connection_error(exc) and not is_environment_error(exc)


def test_advice_fits_the_error() -> None:
    read_only = advice(asyncpg.ReadOnlySQLTransactionError("read-only"))
    assert "primary" in read_only and "storage" in read_only and "migrate" not in read_only
    assert "analytics-bridge migrate" in advice(asyncpg.UndefinedTableError("no table"))
    assert "password in ANALYTICS_DATABASE_URL" in advice(asyncpg.InvalidPasswordError("auth"))
    assert "disk" in advice(asyncpg.DiskFullError("full"))
    redis_auth = advice(AuthenticationError("invalid username-password pair"))
    assert "authentication failed: check the password" in redis_auth and "ANALYTICS_REDIS_URL" in redis_auth
    assert is_configuration_error(asyncpg.UndefinedTableError("x"))
    assert not is_configuration_error(asyncpg.ReadOnlySQLTransactionError("x"))


# -- a drain that times out on a lock: batch and the group claimed ahead released -----------------


@pytest.mark.parametrize(
    ("setting", "error"),
    [("lock_timeout", asyncpg.LockNotAvailableError), ("statement_timeout", asyncpg.QueryCanceledError)],
)
async def test_a_drain_timing_out_on_a_lock_releases_everything_it_claimed(
    own_db: Settings, redis_client: aioredis.Redis, setting: str, error: type[Exception]
) -> None:
    keys = QueueKeys(own_db.analytics_key_prefix)
    name = own_db.database_url.rsplit("/", 1)[1]
    await _admin(f'ALTER DATABASE "{name}" SET {setting} = 300')  # ms; new connections pick it up
    settings = own_db.replace(analytics_batch_size=100, analytics_insert_batch_size=100)
    async with AnalyticsClient(settings) as client:
        await client.track_many([{"event_type": "x", "user_id": str(i)} for i in range(300)])
    # Another session holds the table (a migration, say) while the drain inserts.
    with TableLock(settings.database_url), pytest.raises(error) as info:
        await drain(settings)
    assert is_connection_error(info.value)  # retried by the task, like an outage
    assert await _dead(redis_client, keys) == []
    assert await redis_client.hlen(keys.reclaims) == 0
    leased = await redis_client.zcard(keys.leases)
    # The batch in the database and the group claimed ahead: both released, i.e. takeable at once
    # even under the default 900 s visibility timeout, not after it.
    assert leased == 2
    assert len(await expired_leases(redis_client, keys, settings.analytics_visibility_timeout)) == leased
    summary = await drain(settings)  # the lock is gone: a later drain lands all
    assert (summary.inserted, summary.dead_lettered) == (300, 0)
    assert await redis_client.zcard(keys.leases) == 0 and await _rows(settings) == 300


# -- a batch of one row: given a neighbour, a copy of the newest stored row -----------------------


async def _one_event(settings: Settings, event_type: str) -> None:
    async with AnalyticsClient(settings) as client:
        await client.track(event_type)


async def test_a_lone_row_is_dead_lettered_when_a_stored_rows_copy_goes_in(
    own_db: Settings, redis_client: aioredis.Redis
) -> None:
    keys = QueueKeys(own_db.analytics_key_prefix)
    await _one_event(own_db, "good")
    assert (await drain(own_db)).inserted == 1
    await _sql(own_db, "ALTER TABLE analytics_events ADD CONSTRAINT no_bad CHECK (event_type <> 'bad')")
    await _one_event(own_db, "bad")
    summary = await drain(own_db)
    assert summary.dead_lettered == 1
    [entry] = await _dead(redis_client, keys)
    assert entry["sqlstate"] == "23514" and "no_bad" in entry["error"]
    assert await _rows(own_db) == 1 and await redis_client.zcard(keys.leases) == 0


@pytest.mark.parametrize("stored", [True, False], ids=["stored-row-refused-too", "empty-table"])
async def test_a_lone_row_is_held_when_the_table_refuses_everything(
    own_db: Settings, redis_client: aioredis.Redis, caplog: pytest.LogCaptureFixture, stored: bool
) -> None:
    keys = QueueKeys(own_db.analytics_key_prefix)
    if stored:
        await _one_event(own_db, "x")
        assert (await drain(own_db)).inserted == 1
    # NOT VALID: the stored row violates it too, as every row will.
    await _sql(own_db, "ALTER TABLE analytics_events ADD CONSTRAINT never CHECK (event_type = '') NOT VALID")
    await _one_event(own_db, "y")
    caplog.set_level(logging.ERROR, logger="bridge._writer")
    with pytest.raises(HeldByEnvironment) as info:
        await drain(own_db)
    assert info.value.constraint == "never" and info.value.sqlstate == "23514"
    assert await _dead(redis_client, keys) == []
    assert await redis_client.zcard(keys.leases) == 1
    [line] = [r.getMessage() for r in caplog.records]
    assert "1 events held in flight, none dead-lettered" in line and "never" in line
    await _sql(own_db, "ALTER TABLE analytics_events DROP CONSTRAINT never")
    summary = await drain(own_db)
    assert (summary.reclaimed, summary.inserted, summary.dead_lettered) == (1, 1, 0)


async def test_a_not_null_column_the_bridge_does_not_write_holds_at_once(
    own_db: Settings, redis_client: aioredis.Redis
) -> None:
    keys = QueueKeys(own_db.analytics_key_prefix)
    await _sql(own_db, "ALTER TABLE analytics_events ADD COLUMN tenant text NOT NULL")
    async with AnalyticsClient(own_db) as client:
        await client.track_many([{"event_type": "x"} for _ in range(40)])
    with pytest.raises(HeldByEnvironment, match="column tenant"):
        await drain(own_db)
    assert await _dead(redis_client, keys) == []
    await _sql(own_db, "ALTER TABLE analytics_events ALTER COLUMN tenant SET DEFAULT 'main'")
    assert (await drain(own_db)).inserted == 40


# -- the CLI: advice that fits, exit codes that match the README ----------------------------------


def _invoke(settings: Settings, *args: str) -> Result:
    env = {
        "ANALYTICS_REDIS_URL": settings.redis_dsn,
        "ANALYTICS_KEY_PREFIX": settings.analytics_key_prefix,
        "ANALYTICS_DATABASE_URL": settings.database_url,
        "ANALYTICS_BACKLOG_TRIGGER": "0",
    }
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def test_flush_on_an_unmigrated_database_exits_2_naming_migrate(settings: Settings) -> None:
    name = f"analytics_bare_{secrets.token_hex(4)}"
    run_blocking(_admin(f'CREATE DATABASE "{name}"'))
    try:
        bare = settings.replace(database_url=f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}")
        empty = _invoke(bare, "flush")  # even with nothing queued: a probe must see it
        assert empty.exit_code == 2, empty.output
        assert "analytics-bridge migrate" in empty.output
        run_blocking(_one_event(bare, "x"))
        queued = _invoke(bare, "flush")
        assert queued.exit_code == 2 and "analytics-bridge migrate" in queued.output, queued.output
    finally:
        run_blocking(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def test_flush_on_a_missing_database_exits_2(settings: Settings) -> None:
    missing = settings.replace(database_url=f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/nope_{secrets.token_hex(4)}")
    result = _invoke(missing, "flush")
    assert result.exit_code == 2, result.output
    assert "3D000" in result.output and "analytics-bridge migrate" in result.output


def test_migrate_on_a_read_only_database_gives_the_read_only_advice(settings: Settings) -> None:
    name = f"analytics_ro_{secrets.token_hex(4)}"
    run_blocking(_admin(f'CREATE DATABASE "{name}"'))
    try:
        run_blocking(_admin(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on'))
        result = _invoke(settings.replace(database_url=f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"), "migrate")
        assert result.exit_code == 1, result.output
        assert "25006" in result.output and "primary" in result.output
        assert "has `analytics-bridge migrate` run" not in result.output
    finally:
        run_blocking(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def test_a_wrong_redis_password_on_another_port_says_so(settings: Settings, tmp_path: Path) -> None:
    with start_redis(tmp_path) as server:
        with server.client() as admin:
            admin.config_set("requirepass", "right-one")
        wrong = settings.replace(redis_url=server.url.replace("redis://", "redis://:wrong-one@"))
        result = _invoke(wrong, "flush")
    assert result.exit_code == 2, result.output
    assert "authentication failed: check the password" in result.output
    assert "redis-server" not in result.output and "wrong-one" not in result.output


def test_redis_unreachable_elsewhere_is_not_told_to_start_it_here(settings: Settings) -> None:
    # .invalid never resolves (RFC 6761): a host that is not this machine.
    result = _invoke(settings.replace(redis_url="redis://redis.invalid:6390/0"), "flush")
    assert result.exit_code == 2, result.output
    assert "did not answer" in result.output and "redis-server" not in result.output
    assert "reachable from here" in result.output


def test_redis_unreachable_on_this_machine_is_told_to_start_it_on_its_port(settings: Settings) -> None:
    port = free_port()
    result = _invoke(settings.replace(redis_url=f"redis://127.0.0.1:{port}/0"), "flush")
    assert result.exit_code == 2, result.output
    assert f"--port {port} " in result.output and "--port 6379" not in result.output
