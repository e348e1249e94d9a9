"""`analytics-bridge status --check`: exit 1 when the queue is stuck, 0 when it moves, 2 when a service
is unreachable; against the real Redis and PostgreSQL (sync tests: the CLI runs asyncio.run itself)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import redis
from click.testing import CliRunner, Result

from analytics_sdk import AnalyticsClient, Settings
from analytics_sdk._queue import QueueKeys, claim, dead_letter_entry
from bridge.cli import main
from bridge.cli._status import redis_client
from tests.conftest import run_blocking
from tests.servers import free_port


def check(settings: Settings, *args: str, **extra_env: str) -> Result:
    env = {
        "ANALYTICS_REDIS_URL": settings.redis_dsn,
        "ANALYTICS_KEY_PREFIX": settings.analytics_key_prefix,
        "ANALYTICS_DATABASE_URL": settings.database_url,
        "ANALYTICS_BACKLOG_TRIGGER": "0",
        **extra_env,
    }
    return CliRunner().invoke(main, ["status", "--check", *args], env=env, catch_exceptions=False)


def track_old(settings: Settings, count: int) -> None:
    """Events created 10 minutes ago: `status` judges staleness by the drains, and an event created
    that long ago no longer silences the alarm."""

    async def go() -> None:
        async with AnalyticsClient(settings) as client:
            created = datetime.now(UTC) - timedelta(minutes=10)
            await client.track_many([{"event_type": "check", "created_at": created}] * count)

    run_blocking(go())


def lease_aged(settings: Settings, seconds: float, batch_id: str = "check-batch") -> None:
    """Claim the queued events as a drain would, then age the lease by ``seconds`` on Redis's clock
    (as if its drain had died that long ago and nothing renewed it)."""
    keys = QueueKeys(settings.analytics_key_prefix)

    async def go() -> None:
        client = redis_client(settings)
        try:
            await claim(client, keys, 100, batch_id)
            now_s, now_us = await client.time()
            await client.zadd(keys.leases, {batch_id: (int(now_s) + int(now_us) / 1e6 - seconds) * 1000})
        finally:
            await client.aclose()

    run_blocking(go())


def test_check_exits_0_on_a_fresh_deployment_with_dead_letters_and_drops(
    db_settings: Settings, sync_redis: redis.Redis
) -> None:
    """Nothing waits: not stuck, although `status` warns (no flush yet, a dead letter, drops), which
    need a person rather than a restart."""
    keys = QueueKeys(db_settings.analytics_key_prefix)
    sync_redis.rpush(keys.dead, dead_letter_entry(b'{"v": 1}', "a bad row"))
    sync_redis.set(keys.dropped, 3)
    result = check(db_settings, "--json")
    assert result.exit_code == 0, result.output
    data: dict[str, Any] = msgspec.json.decode(result.stdout)
    assert data["stuck"] == []
    assert "no flush recorded yet for this key prefix" in data["warnings"]
    assert any("dead letter" in w for w in data["warnings"])


def test_check_exits_1_while_events_wait_and_no_drain_runs_then_0_after_a_flush(
    db_settings: Settings,
) -> None:
    track_old(db_settings, 3)
    stuck = check(db_settings, ANALYTICS_FLUSH_INTERVAL="1")
    assert stuck.exit_code == 1, stuck.output
    assert "STUCK: 3 event(s) queued and no drain has ever finished" in stuck.output
    # without --check the same state is a warning only
    plain = CliRunner().invoke(
        main,
        ["status"],
        env={
            "ANALYTICS_REDIS_URL": db_settings.redis_dsn,
            "ANALYTICS_KEY_PREFIX": db_settings.analytics_key_prefix,
            "ANALYTICS_DATABASE_URL": db_settings.database_url,
            "ANALYTICS_FLUSH_INTERVAL": "1",
        },
        catch_exceptions=False,
    )
    assert plain.exit_code == 0, plain.output
    assert "STUCK" not in plain.output and "WARNING: 3 event(s) queued" in plain.output

    flushed = CliRunner().invoke(
        main,
        ["flush", "--json"],
        env={
            "ANALYTICS_REDIS_URL": db_settings.redis_dsn,
            "ANALYTICS_KEY_PREFIX": db_settings.analytics_key_prefix,
            "ANALYTICS_DATABASE_URL": db_settings.database_url,
        },
        catch_exceptions=False,
    )
    assert flushed.exit_code == 0, flushed.output
    moving = check(db_settings, "--json", ANALYTICS_FLUSH_INTERVAL="60")
    assert moving.exit_code == 0, moving.output
    assert msgspec.json.decode(moving.stdout)["stuck"] == []


def test_check_exits_1_for_a_lease_nobody_took_over_and_0_while_a_take_over_is_still_due(
    db_settings: Settings,
) -> None:
    """Visibility timeout 10 s and flush interval 10 s: a dead drain's lease is due for take-over after
    10 s, and stuck once 3 intervals more (40 s in all) passed without any drain taking it."""
    env = {"ANALYTICS_VISIBILITY_TIMEOUT": "10", "ANALYTICS_FLUSH_INTERVAL": "10"}
    track_old(db_settings, 2)
    lease_aged(db_settings, 15)  # expired (status warns), but the next beat tick takes it over
    due = check(db_settings, "--json", **env)
    assert due.exit_code == 0, due.output
    data = msgspec.json.decode(due.stdout)
    assert data["stuck"] == [] and data["queue"]["depth"] == 0 and data["in_flight"]["batches"] == 1
    assert any("past the visibility timeout" in w for w in data["warnings"])

    lease_aged(db_settings, 100)  # the same batch, now unrenewed for 100 s > 10 + 3 x 10
    stuck = check(db_settings, **env)
    assert stuck.exit_code == 1, stuck.output
    assert "STUCK: 1 in-flight batch(es) unrenewed for more than the visibility timeout" in stuck.output


def test_check_exits_1_for_a_released_batch_when_no_drain_runs(
    db_settings: Settings, sync_redis: redis.Redis
) -> None:
    keys = QueueKeys(db_settings.analytics_key_prefix)
    track_old(db_settings, 2)
    lease_aged(db_settings, 0)
    sync_redis.zadd(keys.leases, {"check-batch": 0})  # score 0: released by its drain (an outage)
    result = check(db_settings, "--json", ANALYTICS_FLUSH_INTERVAL="1")
    assert result.exit_code == 1, result.output
    assert msgspec.json.decode(result.stdout)["stuck"] == [
        "1 released in-flight batch(es) wait and no drain finished within 3 flush intervals (3s):"
        " is a worker (and beat) running?"
    ]


def test_check_keeps_exit_2_when_redis_is_unreachable(db_settings: Settings) -> None:
    result = check(db_settings, ANALYTICS_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    assert result.exit_code == 2, result.output
    assert "STUCK" not in result.output
