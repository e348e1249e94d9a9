"""Redis breaks: 7 (restarted under producers and a draining worker), 8 (maxmemory + noeviction)."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import redis
from helpers import wait_for_sync

from analytics_sdk import AnalyticsClient, PublishError, Settings
from analytics_sdk._event import new_event_id
from analytics_sdk._queue import QueueKeys

from .conftest import Fleet, base_settings, new_database
from .ledger import Ledger, collect, quiesce
from .producer import Production, run_in_subprocess_args
from .servers import PostgresServer, RedisServer, start_redis
from .workers import REPO_ROOT, settings_env

pytestmark = pytest.mark.faults


def _rows(settings: Settings) -> int:
    async def count() -> int:
        conn = await asyncpg.connect(settings.database_url)
        try:
            return int(await conn.fetchval("SELECT count(*) FROM analytics_events"))
        finally:
            await conn.close()

    return asyncio.run(count())


def _backlog(settings: Settings) -> tuple[int, int]:
    keys = QueueKeys(settings.analytics_key_prefix)
    with redis.Redis.from_url(settings.redis_dsn, socket_timeout=5) as r:
        return int(r.llen(keys.queue)), int(r.zcard(keys.leases))


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[RedisServer]:
    # A queue that promises "track() returned => survives" needs a Redis that persists what it
    # acknowledged: AOF, fsync before the reply. (--save '' --appendonly no would lose everything.)
    server = start_redis(tmp_path, "--appendonly", "yes", "--appendfsync", "always")
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.timeout(180)
def test_07_redis_restarted_under_producers_and_worker(
    durable_redis: RedisServer, pg_cluster: PostgresServer, fleet: Fleet, tmp_path: Path
) -> None:
    settings = base_settings(
        durable_redis.url,
        database_url=new_database(pg_cluster),
        analytics_redis_timeout=1.0,
        analytics_publish_retries=2,
        analytics_flush_interval=1.0,
        analytics_batch_size=200,
        analytics_visibility_timeout=6.0,
        analytics_task_time_limit=5.0,
        analytics_task_soft_time_limit=4.0,
        analytics_drain_time_budget=2.0,
    )
    # The longest a track() may take: a wait behind the batch in flight, then its own push, each at
    # worst (retries + 1) socket timeouts plus the backoff (<= 1.5 x 0.05 x 2^n per retry).
    per_push = (settings.analytics_publish_retries + 1) * settings.analytics_redis_timeout + 0.5
    hang_after = 2 * per_push + 1.0

    worker = fleet.worker(settings)
    fleet.beat(settings)
    producers, outputs = [], []
    env = settings_env(settings)
    env["PYTHONPATH"] = f"{REPO_ROOT}:{REPO_ROOT / 'tests'}"
    start_at = time.time() + 1.0
    for n in range(2):
        out = tmp_path / f"producer-{n}.json"
        args = run_in_subprocess_args(
            settings, str(out), start_at, coroutines=50, duration=10.0, hang_after=hang_after, tag=f"p{n}"
        )
        producers.append(subprocess.Popen(args, cwd=REPO_ROOT, env=env))
        outputs.append(out)
    try:
        wait_for_sync(lambda: _rows(settings) > 0, timeout=30, message="the worker drains before the fault")
        rows_before = _rows(settings)
        lost_marker = worker.count(r"Connection to broker lost|Cannot connect to redis")
        durable_redis.kill()  # a crash: SIGKILL, no shutdown
        killed_at = time.monotonic()
        # Down long enough to outlast a push's retries (~0.3 s), and until the worker noticed too.
        wait_for_sync(
            lambda: (
                time.monotonic() - killed_at >= 2.0
                and worker.count(r"Connection to broker lost|Cannot connect to redis") > lost_marker
            ),
            timeout=30,
            message="the worker notices Redis is gone",
        )
        durable_redis.start()  # same port, same folder: the AOF brings back what was acknowledged
        for child in producers:
            assert child.wait(60) == 0
    finally:
        for child in producers:
            if child.poll() is None:
                child.kill()
                child.wait(10)

    ledger = Ledger()
    for out in outputs:
        result = Production.from_json(out.read_bytes())
        assert not result.errors, result.errors[:5]
        assert not result.hung, f"{len(result.hung)} track() calls hung past {hang_after}s"
        assert result.max_latency < hang_after
        ledger.accept(result.accepted)
        ledger.refuse(result.refused)
    assert ledger.refused, "no producer saw Redis down: the fault did not hit them"
    assert ledger.accepted

    # The same worker (with beat) reconnects and drains what was queued, without our help.
    wait_for_sync(
        lambda: _backlog(settings) == (0, 0) and _rows(settings) > rows_before,
        timeout=60,
        message="the worker drains after the restart",
    )
    fleet.close()
    asyncio.run(quiesce(settings))
    outcome = asyncio.run(collect(settings))
    outcome.check(ledger)
    assert outcome.dead == []


@pytest.fixture
def full_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = start_redis(tmp_path, "--maxmemory", "4mb", "--maxmemory-policy", "noeviction")
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.timeout(120)
def test_08_redis_at_maxmemory_noeviction(full_redis: RedisServer, pg_cluster: PostgresServer) -> None:
    from bridge.drain import drain

    settings = base_settings(
        full_redis.url, database_url=new_database(pg_cluster), analytics_publish_retries=3
    )
    padding = "x" * 400

    async def fill_until_refused() -> tuple[Ledger, float, str]:
        ledger = Ledger()
        async with AnalyticsClient(settings) as client:

            async def loop(number: int) -> None:
                for i in range(100_000):
                    try:
                        event_id = await client.track(
                            "fill", user_id=str(number), event_metadata={"i": i, "pad": padding}
                        )
                    except PublishError:
                        return
                    ledger.accept(event_id)

            await asyncio.wait_for(asyncio.gather(*(loop(n) for n in range(50))), 60)
            # A refused group commit also counted its own request buffer: fill up event by event
            # until even one event is refused.
            await asyncio.wait_for(loop(50), 60)
            # Redis is full now: every track() must be refused at once (not retried: OOM is final)
            started = time.monotonic()
            for _ in range(3):
                with pytest.raises(PublishError) as refused:
                    await client.track("one-more", event_metadata={"pad": padding})
            elapsed = (time.monotonic() - started) / 3
        return ledger, elapsed, str(refused.value)

    ledger, elapsed, message = asyncio.run(fill_until_refused())
    assert len(ledger.accepted) > 1_000
    assert elapsed < 0.5, f"refusal took {elapsed:.2f}s: retried an OOM?"
    assert "OOM" in message or "maxmemory" in message, message

    # The drain must make progress at maxmemory: claim and ack may not need memory they cannot get.
    summary = asyncio.run(asyncio.wait_for(drain(settings, time_budget=5.0), 60))
    assert summary.claimed > 0 and summary.inserted > 0, summary

    # ...and once it has, producers are accepted again.
    async def one_more() -> str:
        async with AnalyticsClient(settings) as client:
            return await client.track("after", event_metadata={"pad": padding})

    ledger.accept(asyncio.run(one_more()))

    # Harder: producers keep Redis at its limit while drains run; every drain must finish its work
    # and return (its acks and its bookkeeping may not need memory the producers just took).
    async def drain_under_pressure() -> tuple[list[int], int]:
        stop = asyncio.Event()
        refusals = 0
        async with AnalyticsClient(settings) as client:

            async def pressure() -> None:
                nonlocal refusals
                while not stop.is_set():
                    event_id = new_event_id()
                    try:
                        await client.track("pressure", event_id=event_id, event_metadata={"pad": padding})
                        ledger.accept(event_id)
                    except PublishError:
                        ledger.refuse(event_id)
                        refusals += 1
                        await asyncio.sleep(0.005)

            tasks = [asyncio.create_task(pressure()) for _ in range(20)]
            try:

                async def full() -> None:
                    while refusals == 0:
                        await asyncio.sleep(0.01)

                await asyncio.wait_for(full(), 30)  # Redis at its limit again
                claimed = []
                for _ in range(3):
                    summary = await asyncio.wait_for(drain(settings, time_budget=1.0), 30)
                    claimed.append(summary.claimed)
            finally:
                stop.set()
                await asyncio.gather(*tasks)
        return claimed, refusals

    claimed, refusals = asyncio.run(drain_under_pressure())
    assert refusals > 0, "Redis never got full again: the pressure phase did not test anything"
    assert all(c > 0 for c in claimed), claimed
    asyncio.run(quiesce(settings))
    outcome = asyncio.run(collect(settings))
    outcome.check(ledger)
    assert outcome.dead == []
