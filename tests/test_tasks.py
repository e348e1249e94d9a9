"""The Celery layer: app configuration, the flush task as a sync shell, retries, start-up checks.

Plain sync tests, no running event loop: the task calls asyncio.run itself.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest
import redis

from analytics_sdk import Settings
from analytics_sdk._event import validate
from analytics_sdk._queue import QueueKeys
from bridge._errors import CONNECTION_ERRORS
from bridge.celery_app import app, check_time_limits
from bridge.tasks import flush_analytics_events
from tests.conftest import run_blocking
from tests.worker_proc import LOOP_ERRORS, ROOT, private_broker

SUMMARY_KEYS = {"claimed", "inserted", "duplicates", "dead_lettered", "reclaimed", "seconds"}


@pytest.fixture
def task_env(db_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The task reads Settings.from_env() per run: point the environment at this test's prefix/DB."""
    monkeypatch.setenv("ANALYTICS_REDIS_URL", db_settings.redis_dsn)
    monkeypatch.setenv("ANALYTICS_KEY_PREFIX", db_settings.analytics_key_prefix)
    monkeypatch.setenv("ANALYTICS_DATABASE_URL", db_settings.database_url)
    monkeypatch.delenv("ANALYTICS_FAILPOINTS", raising=False)
    return db_settings


def _push(settings: Settings, sync_redis: redis.Redis, count: int, **fields: object) -> list[str]:
    events = [validate({"event_type": "task_test", "user_id": str(i), **fields}) for i in range(count)]
    if events:
        sync_redis.rpush(QueueKeys(settings.analytics_key_prefix).queue, *(e.encode() for e in events))
    return [e.event_id for e in events]


def _rows(settings: Settings) -> int:
    async def count() -> int:
        conn = await asyncpg.connect(settings.database_url)
        try:
            return int(await conn.fetchval("SELECT count(DISTINCT event_id) FROM analytics_events"))
        finally:
            await conn.close()

    return run_blocking(count())


def test_app_configuration() -> None:
    conf = app.conf
    assert conf.task_serializer == "json" and conf.result_serializer == "json"
    assert list(conf.accept_content) == ["json"]
    assert conf.task_default_queue == "analytics"
    # the route bridge.install adds: the queue, and JSON for a message sent by name
    assert conf.task_routes == {
        "flush_analytics_events": {"queue": "analytics", "serializer": "json"},
        "analytics.maintain_partitions": {"queue": "analytics", "serializer": "json"},
    }
    assert conf.worker_prefetch_multiplier == 1 and conf.task_acks_late is True
    settings = Settings.from_env()
    assert conf.task_time_limit == settings.analytics_task_time_limit
    assert conf.task_soft_time_limit == settings.analytics_task_soft_time_limit
    entry = conf.beat_schedule["flush-analytics-events"]
    assert set(conf.beat_schedule) == {"flush-analytics-events", "maintain-analytics-partitions"}
    assert entry["task"] == "flush_analytics_events"
    assert entry["schedule"] == timedelta(seconds=settings.analytics_flush_interval)
    assert entry["options"]["queue"] == "analytics" and entry["options"]["expires"] > 0


def test_task_registration_and_retry_policy() -> None:
    task = app.tasks["flush_analytics_events"]
    assert task.name == flush_analytics_events.name == "flush_analytics_events"
    assert app.amqp.router.route({}, task.name)["queue"].name == "analytics"
    assert task.acks_late is True and task.reject_on_worker_lost is False
    assert task.serializer == "json" and task.ignore_result is True
    settings = Settings.from_env()
    assert task.time_limit == settings.analytics_task_time_limit
    assert task.soft_time_limit == settings.analytics_task_soft_time_limit
    assert task.max_retries == 3 and task.retry_backoff and task.retry_jitter
    assert tuple(task.autoretry_for) == CONNECTION_ERRORS
    # data errors are never retried: none of them is a connection-class type
    for data_error in (
        asyncpg.DataError,
        asyncpg.IntegrityConstraintViolationError,
        asyncpg.exceptions._base.DataError,
    ):
        assert not issubclass(data_error, CONNECTION_ERRORS), data_error


def test_bridge_package_exposes_app_lazily() -> None:
    import bridge

    assert bridge.app is app
    with pytest.raises(AttributeError):
        _ = bridge.nothing_here  # type: ignore[attr-defined]


def test_task_drains_and_returns_a_json_summary(task_env: Settings, sync_redis: redis.Redis) -> None:
    _push(task_env, sync_redis, 250)
    result = flush_analytics_events.apply()
    summary = result.get()
    assert set(summary) >= SUMMARY_KEYS
    assert (summary["claimed"], summary["inserted"], summary["dead_lettered"]) == (250, 250, 0)
    json.dumps(summary)  # JSON-serialisable as is
    assert _rows(task_env) == 250


def test_fifty_tasks_in_a_row_in_one_process(
    task_env: Settings, sync_redis: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for _ in range(50):
        _push(task_env, sync_redis, 7)
        assert flush_analytics_events.apply().get()["inserted"] == 7
    assert _rows(task_env) == 350
    for message in LOOP_ERRORS:
        assert message not in caplog.text


def test_bad_events_are_dead_lettered_not_retried(task_env: Settings, sync_redis: redis.Redis) -> None:
    keys = QueueKeys(task_env.analytics_key_prefix)
    _push(task_env, sync_redis, 5)
    sync_redis.rpush(keys.queue, b"not json at all")
    result = flush_analytics_events.apply()
    assert result.successful()
    assert result.get()["dead_lettered"] == 1 and result.get()["inserted"] == 5
    assert sync_redis.llen(keys.dead) == 1


def test_postgresql_unreachable_is_retried_then_fails_keeping_the_events(
    task_env: Settings,
    sync_redis: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    keys = QueueKeys(task_env.analytics_key_prefix)
    _push(task_env, sync_redis, 20)
    monkeypatch.setenv("ANALYTICS_DATABASE_URL", "postgresql://postgres@127.0.0.1:1/analytics")
    caplog.set_level(logging.INFO, logger="celery.app.trace")
    result = flush_analytics_events.apply()  # eager: the retries run at once, countdown ignored
    assert result.failed()
    assert isinstance(result.result, OSError)
    assert caplog.text.count("retry: Retry in") == 3  # three retries, then the failure
    assert sync_redis.llen(keys.queue) == 20 and sync_redis.llen(keys.dead) == 0
    monkeypatch.setenv("ANALYTICS_DATABASE_URL", task_env.database_url)
    assert flush_analytics_events.apply().get()["inserted"] == 20


def test_unmigrated_database_is_one_error_line_not_retried_events_kept(
    task_env: Settings,
    sync_redis: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A worker started before migrate: each drain logs one ERROR naming migrate (Celery logs the task
    at INFO without a traceback), is not retried, and keeps the events for the drain after migrate."""
    from bridge._errors import HeldByEnvironment
    from bridge.schema import migrate
    from tests.conftest import PG_ADMIN_URL, _admin

    keys = QueueKeys(task_env.analytics_key_prefix)
    name = f"analytics_task_bare_{secrets.token_hex(4)}"
    run_blocking(_admin(f'CREATE DATABASE "{name}"'))
    url = f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    try:
        monkeypatch.setenv("ANALYTICS_DATABASE_URL", url)
        _push(task_env, sync_redis, 20)
        caplog.set_level(logging.INFO)
        for _ in range(2):
            result = flush_analytics_events.apply()
            assert result.failed() and isinstance(result.result, HeldByEnvironment)
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 2, [r.getMessage() for r in errors]  # one line per drain
        assert all("42P01" in r.getMessage() and "analytics-bridge migrate" in r.getMessage() for r in errors)
        assert all(r.exc_info is None for r in caplog.records), "a traceback was logged"
        assert "Retry in" not in caplog.text
        assert sync_redis.llen(keys.dead) == 0 and sync_redis.hlen(keys.reclaims) == 0
        run_blocking(migrate(url))
        assert flush_analytics_events.apply().get()["inserted"] == 20
    finally:
        run_blocking(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def test_redis_unreachable_is_a_retried_error(task_env: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANALYTICS_REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("ANALYTICS_REDIS_TIMEOUT", "1")
    result = flush_analytics_events.apply()
    assert result.failed()
    assert isinstance(result.result, CONNECTION_ERRORS)


def _python(code: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("ANALYTICS_")}
    full.update({"PYTHONPATH": str(ROOT), **env})
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        # the heartbeat renews every visibility/4, and a renewal may take a Redis timeout to fail
        ({"ANALYTICS_VISIBILITY_TIMEOUT": "9.9"}, "ANALYTICS_VISIBILITY_TIMEOUT"),
        (
            {"ANALYTICS_VISIBILITY_TIMEOUT": "60", "ANALYTICS_REDIS_TIMEOUT": "30.5"},
            "ANALYTICS_VISIBILITY_TIMEOUT",
        ),
        (
            {"ANALYTICS_TASK_SOFT_TIME_LIMIT": "60", "ANALYTICS_TASK_TIME_LIMIT": "60"},
            "ANALYTICS_TASK_SOFT_TIME_LIMIT",
        ),
    ],
)
def test_misconfigured_time_limits_refuse_to_start(env: dict[str, str], variable: str) -> None:
    done = _python("import bridge.celery_app", env)
    assert done.returncode != 0
    assert "ConfigurationError" in done.stderr and variable in done.stderr
    with pytest.raises(ValueError, match=variable):
        check_time_limits(Settings.from_env(env))


def test_misconfigured_worker_exits_at_once(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANALYTICS_")}
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "ANALYTICS_VISIBILITY_TIMEOUT": "9",
            "ANALYTICS_BROKER_URL": "redis://127.0.0.1:1/0",
        }
    )
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "bridge", "worker", "-Q", "analytics"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "ANALYTICS_VISIBILITY_TIMEOUT" in done.stdout + done.stderr


def test_import_opens_no_connection() -> None:
    # Broker, Redis and PostgreSQL all unreachable: importing must still be instant and silent,
    # since the prefork pool forks right after it.
    env = {
        "ANALYTICS_BROKER_URL": "redis://127.0.0.1:1/0",
        "ANALYTICS_REDIS_URL": "redis://127.0.0.1:1/0",
        "ANALYTICS_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/x",
    }
    done = _python(
        "import bridge.tasks, bridge.drain, bridge.store, bridge.schema; print('ok')", env, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_backlog_left_by_the_time_budget_sends_the_task_again(
    db_settings: Settings, sync_redis: redis.Redis, tmp_path: Path
) -> None:
    """Run outside eager mode (as a worker would) in a subprocess whose broker is a throwaway Redis,
    with a zero time budget: one transaction, then the task re-sends itself to queue "analytics"."""
    _push(db_settings, sync_redis, 300)
    with private_broker(tmp_path) as broker:
        env = {
            "ANALYTICS_BROKER_URL": broker.url,
            "ANALYTICS_REDIS_URL": db_settings.redis_dsn,
            "ANALYTICS_KEY_PREFIX": db_settings.analytics_key_prefix,
            "ANALYTICS_DATABASE_URL": db_settings.database_url,
            "ANALYTICS_BATCH_SIZE": "50",
            "ANALYTICS_INSERT_BATCH_SIZE": "100",
        }
        code = (
            "import json; from bridge.tasks import flush_analytics_events as t; "
            "print(json.dumps(t(time_budget=0)))"
        )
        done = _python(code, env)
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        assert summary["inserted"] == 100 and summary["backlog"] == 200 and summary["budget_spent"]
        with broker.client() as client:
            messages = client.lrange("analytics", 0, -1)
        assert len(messages) == 1
        message = json.loads(messages[0])
        assert message["headers"]["task"] == "flush_analytics_events"
        assert message["content-type"] == "application/json"
        assert message["properties"]["delivery_info"]["routing_key"] == "analytics"
        _args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        assert kwargs == {"time_budget": 0}
        assert message["headers"]["expires"]
