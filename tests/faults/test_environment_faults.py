"""The database refuses for reasons that are its own, not the events': nothing may be dead-lettered.

- 25: read-only (a failover to a replica, a managed database at its storage limit) for longer than
  five drains, each after the leases' visibility timeout: zero dead letters, then one flush lands all;
- 26: the identity sequence behind restored rows (ids 1..300 inserted explicitly): held with an ERROR
  naming setval, zero dead letters; after the setval every event lands;
- 27: a CHECK added mid-run that every new row violates: held; a CHECK one row violates: that row
  alone is dead-lettered, its neighbours commit;
- 28: a worker started before `migrate`: one start-up ERROR naming migrate, one line per drain, no
  traceback, and the first drain after migrate lands everything.

Drains are run in-process (bridge.drain.drain) so the leases' take-overs are deterministic: a short
visibility timeout and a wait past it between drains are what beat ticks do after a release.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from click.testing import CliRunner
from helpers import wait_for_sync

from analytics_sdk import Settings
from bridge.cli import main
from bridge.drain import MAX_RECLAIMS, drain

from .conftest import Fleet, base_settings
from .ledger import Ledger, collect, quick, quiesce
from .servers import PostgresServer, RedisServer
from .tools import backlog, drive_until, in_flight, rows, seed

pytestmark = pytest.mark.faults

VISIBILITY = 0.5
DRAINS = MAX_RECLAIMS + 3  # more take-overs than the poison limit allows: "longer than five drains"
SETVAL = (
    "SELECT setval(pg_get_serial_sequence('analytics_events','id'), (SELECT max(id) FROM analytics_events))"
)


def _settings(fault_settings: Settings) -> Settings:
    return quick(
        fault_settings.replace(analytics_batch_size=100, analytics_insert_batch_size=100), VISIBILITY
    )


def _sql(database_url: str, *statements: str, args: tuple[Any, ...] = ()) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(database_url, timeout=10)
        try:
            for statement in statements:
                await conn.execute(statement, *args)
        finally:
            await conn.close()

    asyncio.run(run())


def _admin(settings: Settings, statement: str) -> None:
    """A statement about this scenario's database, from the cluster's maintenance database."""
    _sql(settings.database_url.rsplit("/", 1)[0] + "/postgres", statement)


def _db_name(settings: Settings) -> str:
    return settings.database_url.rsplit("/", 1)[1]


def _drain_refused(settings: Settings) -> BaseException | None:
    """One drain, once the leases a previous drain left (or released) are past the visibility
    timeout; returns what it raised, or None."""
    time.sleep(VISIBILITY * 1.5)  # the visibility timeout must pass for take-overs: not a poll
    try:
        asyncio.run(drain(settings))
    except Exception as exc:
        return exc
    return None


def _held_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and r.name == "bridge._writer"
    ]


def _cli_flush(settings: Settings) -> Any:
    env = {
        "ANALYTICS_REDIS_URL": settings.redis_dsn,
        "ANALYTICS_KEY_PREFIX": settings.analytics_key_prefix,
        "ANALYTICS_DATABASE_URL": settings.database_url,
        "ANALYTICS_VISIBILITY_TIMEOUT": str(settings.analytics_visibility_timeout),
        "ANALYTICS_TASK_TIME_LIMIT": str(settings.analytics_task_time_limit),
        "ANALYTICS_TASK_SOFT_TIME_LIMIT": str(settings.analytics_task_soft_time_limit),
        "ANALYTICS_BACKLOG_TRIGGER": "0",
    }
    return CliRunner().invoke(main, ["flush"], env=env, catch_exceptions=False)


@pytest.mark.timeout(120)
def test_25_read_only_database_for_longer_than_five_drains(
    fault_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(fault_settings)
    ledger = seed(settings, 300)
    _admin(settings, f'ALTER DATABASE "{_db_name(settings)}" SET default_transaction_read_only = on')
    caplog.set_level(logging.INFO)
    for _ in range(DRAINS):
        refused = _drain_refused(settings)
        assert isinstance(refused, asyncpg.ReadOnlySQLTransactionError), refused
    outcome = asyncio.run(collect(settings))
    assert outcome.dead == [], "a read-only database dead-lettered events"
    assert outcome.reclaims == {}, "a release counted towards the poison limit"
    queued, _ = backlog(settings)
    assert outcome.row_count == 0 and queued + in_flight(settings) == 300  # all waiting, none lost
    errors = _held_errors(caplog)
    assert errors and all("25006" in e and "primary" in e for e in errors), errors
    # The CLI gives the same advice, not "has migrate run", and exits 1: the operation failed.
    time.sleep(VISIBILITY * 1.5)
    result = _cli_flush(settings)
    assert result.exit_code == 1, result.output
    assert "25006" in result.output and "primary" in result.output and "migrate" not in result.output
    _admin(settings, f'ALTER DATABASE "{_db_name(settings)}" RESET default_transaction_read_only')
    time.sleep(VISIBILITY * 1.5)
    summary = asyncio.run(drain(settings))  # one flush lands everything once it is writable
    assert (summary.inserted, summary.dead_lettered) == (300, 0), summary
    asyncio.run(quiesce(settings, visibility_timeout=VISIBILITY))
    final = asyncio.run(collect(settings))
    final.check(ledger)
    assert final.dead == [] and rows(settings) == 300


@pytest.mark.timeout(120)
def test_26_identity_sequence_behind_restored_rows(
    fault_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(fault_settings)
    ledger = Ledger()
    restored = [str(uuid.uuid4()) for _ in range(300)]
    for event_id in restored:
        ledger.inject(event_id, "row")
    # The key is (id, created_at) on the partitioned table: the restored rows and the new events share
    # a created_at, so an id the sequence hands out again collides (it would not at another instant).
    when = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
    _sql(
        settings.database_url,
        "INSERT INTO analytics_events (id, event_id, event_type, created_at) OVERRIDING SYSTEM VALUE "
        "SELECT n, ($1::uuid[])[n], 'restored', $2 FROM generate_series(1, 300) AS n",
        args=(restored, when),
    )
    ledger.merge(seed(settings, 200, created_at=when))
    caplog.set_level(logging.INFO)
    for _ in range(3):
        refused = _drain_refused(settings)
        assert refused is not None and "setval" in str(refused), refused
    outcome = asyncio.run(collect(settings))
    assert outcome.dead == [], f"{len(outcome.dead)} good events dead-lettered for a sequence behind"
    assert outcome.row_count == 300
    errors = _held_errors(caplog)
    assert errors and all("analytics_events_pkey" in e and "setval(" in e for e in errors), errors
    _sql(settings.database_url, SETVAL)
    asyncio.run(quiesce(settings, visibility_timeout=VISIBILITY))
    final = asyncio.run(collect(settings))
    final.check(ledger)
    assert final.dead == [] and final.row_count == 500


@pytest.mark.timeout(120)
def test_27_constraint_added_mid_run_every_row_violates_then_one_row(
    fault_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(fault_settings)
    ledger = seed(settings, 100, event_type="early")
    assert asyncio.run(drain(settings)).inserted == 100
    # A migration adds a CHECK the stored rows pass and every new row violates.
    _sql(
        settings.database_url,
        "ALTER TABLE analytics_events ADD CONSTRAINT no_seed CHECK (event_type <> 'seed')",
    )
    ledger.merge(seed(settings, 250))
    caplog.set_level(logging.INFO)
    for _ in range(DRAINS):
        refused = _drain_refused(settings)
        assert refused is not None and "no_seed" in str(refused), refused
    outcome = asyncio.run(collect(settings))
    assert outcome.dead == [], "a constraint every row violates dead-lettered events"
    assert outcome.reclaims == {} and outcome.row_count == 100
    errors = _held_errors(caplog)
    assert errors and all("no_seed" in e and "23514" in e for e in errors), errors

    # Now a constraint one row violates: that row alone is dead-lettered, the rest commit.
    _sql(
        settings.database_url,
        "ALTER TABLE analytics_events DROP CONSTRAINT no_seed",
        # NOT VALID: a stored 'early' row has user_id 7 too; the newest stored row (99) passes it.
        "ALTER TABLE analytics_events ADD CONSTRAINT no_seven CHECK (user_id <> '7') NOT VALID",
    )
    asyncio.run(quiesce(settings, visibility_timeout=VISIBILITY))
    final = asyncio.run(collect(settings))
    final.check(ledger)
    assert [d["sqlstate"] for d in final.dead] == ["23514"], final.dead
    assert '"user_id":"7"' in final.dead[0]["payload"].replace(" ", "")
    assert "no_seven" in final.dead[0]["error"]
    assert final.row_count == 349


@pytest.mark.timeout(150)
def test_28_worker_started_before_migrate(
    fault_redis: RedisServer, pg_cluster: PostgresServer, fleet: Fleet
) -> None:
    name = f"faults_unmigrated_{uuid.uuid4().hex[:8]}"
    _sql(pg_cluster.url(), f'CREATE DATABASE "{name}"')
    settings = base_settings(fault_redis.url, database_url=pg_cluster.url(name))
    worker = fleet.worker(settings)
    startup = r"ERROR/MainProcess\] start-up check: PostgreSQL .*analytics-bridge migrate"
    wait_for_sync(lambda: worker.count(startup) == 1, timeout=30, message="one start-up ERROR naming migrate")
    assert worker.count(r"start-up check: Redis 7\.") == 1, worker.log()[-2000:]
    ledger = seed(settings, 150)
    fleet.send_flush(settings, times=3)
    held = r"ERROR/ForkPoolWorker-\d+\] .*held.* none dead-lettered: .*42P01.*analytics-bridge migrate"
    wait_for_sync(lambda: worker.count(r"raised expected") == 3, timeout=60, message="three drains held")
    log = worker.log()
    assert worker.count(held) == 3, log[-3000:]
    assert worker.count(r"ERROR/ForkPoolWorker") == 3, "one ERROR line per drain"
    assert "Traceback" not in log, log[-3000:]
    assert not re.search(r"retry: Retry in", log), "an unmigrated database was retried like an outage"
    from bridge.schema import migrate

    asyncio.run(migrate(settings.database_url))
    drive_until(
        lambda: backlog(settings) == (0, 0),
        lambda: fleet.send_flush(settings),
        timeout=60,
        message="the first drains after migrate land everything",
    )
    fleet.close()
    asyncio.run(quiesce(settings))
    outcome = asyncio.run(collect(settings))
    outcome.check(ledger)
    assert outcome.dead == [] and rows(settings) == 150
