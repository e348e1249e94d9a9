"""Start-up checks: Redis >= 7.0 (the scripts' `#!lua flags=allow-oom`), and a migrated table.

A Redis 6.2 cannot be had here, so the check is a function of the version string: it is run on the
real server's INFO and on "6.2.14". Its wiring is tested by sending Celery's start-up signal for this
app (and for another app, which must be ignored); fault scenario 23 watches a real worker run it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from types import SimpleNamespace

import asyncpg
import pytest
import redis
from celery import Celery
from celery.signals import celeryd_after_setup

from analytics_sdk import Settings
from bridge._errors import NotMigrated, RedisTooOld
from bridge._preflight import check_postgres, check_redis, check_redis_version
from bridge.celery_app import app
from bridge.schema import schema_problem
from tests.conftest import PG_ADMIN_URL, _admin


def test_the_real_servers_version_passes(settings: Settings, sync_redis: redis.Redis) -> None:
    version = str(sync_redis.info("server")["redis_version"])
    check_redis_version(version)
    assert asyncio.run(check_redis(settings)) == version


@pytest.mark.parametrize("version", ["6.2.14", "6.0.20", "5.0.7"])
def test_a_redis_older_than_7_is_refused_naming_both_versions(version: str) -> None:
    with pytest.raises(RedisTooOld) as info:
        check_redis_version(version, "Redis at redis://db.internal:6380/0")
    message = str(info.value)
    assert f"is version {version}" in message and "needs Redis >= 7.0" in message
    assert "redis://db.internal:6380/0" in message and "allow-oom" in message


@pytest.mark.parametrize("version", ["7.0.0", "7.0.15", "7.2.4", "8.0.2", "10.1.0"])
def test_7_and_later_pass(version: str) -> None:
    check_redis_version(version)


def test_a_version_that_is_not_one_is_refused() -> None:
    with pytest.raises(RedisTooOld, match="'unknown'"):
        check_redis_version("unknown")


async def test_schema_problem_names_migrate_and_missing_columns(database_url: str) -> None:
    name = f"analytics_pre_{secrets.token_hex(4)}"
    await _admin(f'CREATE DATABASE "{name}"')
    url = f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    try:
        conn = await asyncpg.connect(url)
        try:
            problem = await schema_problem(conn)
            assert (
                problem is not None and "does not exist" in problem and "analytics-bridge migrate" in problem
            )
            await conn.execute("CREATE TABLE analytics_events (id bigint, event_id uuid)")
            problem = await schema_problem(conn)
            assert problem is not None and "event_type" in problem and "referrer" in problem
        finally:
            await conn.close()
        with pytest.raises(NotMigrated, match="analytics-bridge migrate"):
            await check_postgres(Settings(database_url=url))
    finally:
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    migrated = await asyncpg.connect(database_url)
    try:
        assert await schema_problem(migrated) is None
    finally:
        await migrated.close()


def test_worker_start_up_runs_the_checks_for_this_app_only(caplog: pytest.LogCaptureFixture) -> None:
    """celeryd_after_setup, as a worker sends it after setting up logging and before forking its pool,
    runs the checks against the app's settings (here the environment's defaults: the real Redis, and
    a database named ``analytics`` that may not exist: that is an ERROR, not a refusal)."""
    caplog.set_level(logging.INFO, logger="bridge._preflight")
    other = Celery("someone-else")
    celeryd_after_setup.send(sender="w@host", instance=SimpleNamespace(app=other), conf=other.conf)
    assert not caplog.records, "another app's worker ran our checks"
    celeryd_after_setup.send(sender="w@host", instance=SimpleNamespace(app=app), conf=app.conf)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("start-up check: Redis 7.") for m in messages), messages
    assert any(m.startswith("start-up check: PostgreSQL") for m in messages), messages
