"""PostgreSQL breaks: 5 (stopped for 30 s during a drain), 6 (down longer than all the task's retries).

Both stop the server while a drain's insert is in progress: the drain is held mid-insert behind our
table lock, then the server is shut down under it (``pg_ctl stop -m fast`` disconnects everyone).
"""

from __future__ import annotations

import asyncio
import time

import pytest
import redis
from helpers import wait_for_sync

from analytics_sdk import Settings
from analytics_sdk._queue import QueueKeys

from .conftest import Fleet, base_settings, new_database
from .ledger import collect, quiesce
from .servers import PostgresServer, RedisServer
from .tools import TableLock, backlog, drive_until, in_flight, lock_waiters, rows, seed

pytestmark = pytest.mark.faults

RETRY = r"flush_analytics_events\[[^\]]+\] retry: Retry in"
GAVE_UP = r"flush_analytics_events\[[^\]]+\] raised unexpected"


def _settings(redis_server: RedisServer, pg: PostgresServer, **changes: object) -> Settings:
    values: dict[str, object] = {
        "database_url": new_database(pg),
        "analytics_batch_size": 100,
        "analytics_insert_batch_size": 100,
        "analytics_visibility_timeout": 5.0,
        "analytics_task_time_limit": 4.0,
        "analytics_task_soft_time_limit": 3.0,
    }
    values.update(changes)
    return base_settings(redis_server.url, **values)


def _stop_mid_insert(settings: Settings, pg: PostgresServer, fleet: Fleet) -> None:
    """Send a flush, wait until its insert blocks on our lock, then stop the server under it."""
    with TableLock(settings.database_url):
        fleet.send_flush(settings)
        wait_for_sync(lambda: lock_waiters(settings) >= 1, timeout=30, message="the insert is in progress")
        pg.stop("fast")


@pytest.mark.timeout(150)
def test_05_postgres_stopped_30s_during_a_drain(
    fault_redis: RedisServer, own_pg: PostgresServer, fleet: Fleet
) -> None:
    settings = _settings(fault_redis, own_pg, analytics_flush_interval=2.0)
    ledger = seed(settings, 2_000)
    worker = fleet.worker(settings)
    _stop_mid_insert(settings, own_pg, fleet)
    stopped_at = time.monotonic()
    fleet.beat(settings)  # production's beat keeps sending flushes into the outage
    # The outage lasts 30 s, and in it the task must be retrying (connection errors only).
    wait_for_sync(
        lambda: time.monotonic() - stopped_at >= 30 and worker.count(RETRY) >= 1,
        timeout=60,
        interval=0.5,
        message="30 s of outage with retries",
    )
    assert in_flight(settings) >= settings.analytics_batch_size  # the interrupted batch is kept
    own_pg.start()
    wait_for_sync(
        lambda: backlog(settings) == (0, 0),
        timeout=60,
        interval=0.25,
        message="retries and beat land everything once PostgreSQL is back",
    )
    fleet.close()
    asyncio.run(quiesce(settings))
    outcome = asyncio.run(collect(settings))
    outcome.check(ledger)
    assert outcome.dead == [], "an outage is not the events' fault: nothing may be dead-lettered"
    assert rows(settings) == len(ledger.accepted)


@pytest.mark.timeout(150)
def test_06_postgres_down_longer_than_all_retries(
    fault_redis: RedisServer, own_pg: PostgresServer, fleet: Fleet
) -> None:
    settings = _settings(fault_redis, own_pg)
    ledger = seed(settings, 500)
    worker = fleet.worker(settings)
    _stop_mid_insert(settings, own_pg, fleet)
    # 3 retries with exponential backoff (at most 1 + 2 + 4 s), then the task gives up.
    wait_for_sync(lambda: worker.count(GAVE_UP) >= 1, timeout=60, message="the task exhausts its retries")
    assert worker.count(RETRY) == 3, worker.log()[-3000:]
    # The batch the drain was inserting (and the one it had claimed ahead) are still in flight,
    # whole; nothing was consumed while PostgreSQL was away, nothing dead-lettered.
    queued, leases = backlog(settings)
    assert 1 <= leases <= 2
    assert in_flight(settings) >= settings.analytics_batch_size
    assert queued + in_flight(settings) == len(ledger.accepted)
    with redis.Redis.from_url(settings.redis_dsn) as r:
        assert r.llen(QueueKeys(settings.analytics_key_prefix).dead) == 0
    own_pg.start()
    drive_until(
        lambda: backlog(settings) == (0, 0),
        lambda: fleet.send_flush(settings),
        timeout=60,
        message="a later drain reclaims and lands the stranded batch",
    )
    fleet.close()
    asyncio.run(quiesce(settings))
    outcome = asyncio.run(collect(settings))
    outcome.check(ledger)
    assert outcome.dead == []
    assert rows(settings) == len(ledger.accepted)
