"""ANALYTICS_ENABLED=false (validate, return ids, never connect; said once per process) and ping()."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from analytics_sdk import (
    AnalyticsClient,
    ClientClosedError,
    ConfigurationError,
    Settings,
    SyncAnalyticsClient,
    ValidationError,
    _disabled,
)
from analytics_sdk._queue import QueueKeys
from tests.hung_server import HungServer
from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def hung() -> Iterator[HungServer]:
    """Accepts connections and never answers: whatever connects to it is seen in ``.accepted``."""
    with HungServer() as server:
        yield server


@pytest.fixture
def fresh_announcement() -> Iterator[None]:
    """Forget that this process already said analytics is off (other tests may have)."""
    _disabled._announced[0] = False
    yield
    _disabled._announced[0] = False


def nowhere(hung: HungServer) -> Settings:
    return Settings(redis_url=hung.url, broker_url=hung.url, analytics_publish_timeout=0.5)


# -- disabled mode --------------------------------------------------------------------------------


async def test_the_environment_switch_disables_a_client_made_with_explicit_settings(
    hung: HungServer,
    monkeypatch: pytest.MonkeyPatch,
    fresh_announcement: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The global switch is read by every new client, even one given Settings(analytics_enabled=True)
    (PostHog's bug was a new instance ignoring it): ids come back, nothing connects."""
    monkeypatch.setenv("ANALYTICS_ENABLED", "false")
    caplog.set_level(logging.WARNING)
    async with AnalyticsClient(nowhere(hung).replace(analytics_enabled=True)) as client:
        event_id = await client.track("page_view", user_id=42)
        legacy = await client.track_event("signup", "7", entity_type="plan", entity_id=3)
        many = await client.track_many(
            [{"event_type": "a"}, {"event_type": "b", "event_id": str(uuid.uuid4())}]
        )
        assert await client.track_many([]) == []
        with pytest.raises(ValidationError, match="ip_address"):  # validation as ever
            await client.track("x", ip_address="127.1")
        assert await client.get_queue_size() == 0
        assert await client.flush_events_now() is None  # no task sent: None, not a made-up id
        assert await client.ping() is True  # ready to take events
    for value in (event_id, legacy, *many):
        assert uuid.UUID(value)
    assert hung.accepted == [], "a disabled client connected to Redis or the broker"
    disabled = [r for r in caplog.records if r.name == "analytics_sdk._disabled"]
    assert (
        len(disabled) == 1 and "ANALYTICS_ENABLED=false, set in the environment" in disabled[0].getMessage()
    )
    with pytest.raises(ClientClosedError):
        await client.track("after close")


def test_the_sync_client_disabled_starts_nothing(
    hung: HungServer, monkeypatch: pytest.MonkeyPatch, fresh_announcement: None
) -> None:
    monkeypatch.setenv("ANALYTICS_ENABLED", "0")
    threads = set(threading.enumerate())
    with SyncAnalyticsClient(nowhere(hung)) as client:
        assert uuid.UUID(client.track("page_view", user_id=1))
        assert uuid.UUID(client.track_event("legacy", user_id=2))
        assert len(client.track_many([{"event_type": "a"}] * 3)) == 3
        with pytest.raises(ValidationError, match="event_type"):
            client.track("")
        assert client.get_queue_size() == 0
        assert client.flush_events_now() is None
        assert client.ping() is True
        assert set(threading.enumerate()) <= threads, "no loop thread for a disabled client"
    assert hung.accepted == []
    for call in (lambda: client.track("x"), client.get_queue_size, client.flush_events_now, client.ping):
        with pytest.raises(ClientClosedError):
            call()


async def test_settings_disable_one_client_and_the_switch_is_said_once(
    hung: HungServer,
    monkeypatch: pytest.MonkeyPatch,
    fresh_announcement: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.delenv("ANALYTICS_ENABLED", raising=False)
    caplog.set_level(logging.WARNING)
    off = nowhere(hung).replace(analytics_enabled=False)
    for _ in range(3):
        async with AnalyticsClient(off) as client:
            await client.track("x")
        with SyncAnalyticsClient(off) as sync:
            sync.track("x")
    assert hung.accepted == []
    messages = [r.getMessage() for r in caplog.records if r.name == "analytics_sdk._disabled"]
    assert len(messages) == 1 and "set in its Settings" in messages[0], messages


def test_from_env_reads_the_switch_and_a_bad_value_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings.from_env({"ANALYTICS_ENABLED": "off"}).analytics_enabled is False
    assert Settings().analytics_enabled is True
    monkeypatch.setenv("ANALYTICS_ENABLED", "maybe")
    with pytest.raises(ConfigurationError, match="ANALYTICS_ENABLED='maybe'"):
        AnalyticsClient(Settings())
    with pytest.raises(ConfigurationError, match="ANALYTICS_ENABLED='maybe'"):
        SyncAnalyticsClient(Settings())


async def test_enabled_is_the_default_and_events_land(
    settings: Settings, sync_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANALYTICS_ENABLED", "true")
    async with AnalyticsClient(settings) as client:
        await client.track("x")
    assert sync_redis.llen(QueueKeys(settings.analytics_key_prefix).queue) == 1


def test_once_per_process_in_a_real_process(tmp_path: Path) -> None:
    script = (
        "import asyncio\n"
        "from analytics_sdk import AnalyticsClient, SyncAnalyticsClient\n"
        "async def main():\n"
        "    for _ in range(3):\n"
        "        async with AnalyticsClient.from_env() as client:\n"
        "            print(await client.track('x'))\n"
        "asyncio.run(main())\n"
        "with SyncAnalyticsClient.from_env() as sync:\n"
        "    print(sync.track('y'))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANALYTICS_")}
    env.update(
        PYTHONPATH=str(ROOT),
        ANALYTICS_ENABLED="false",
        ANALYTICS_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
    )
    done = subprocess.run(
        [sys.executable, "-c", script], check=False, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.split()) == 4
    assert done.stderr.count("analytics is disabled") == 1, done.stderr


# -- ping -----------------------------------------------------------------------------------------


async def test_ping_true_when_redis_answers(settings: Settings) -> None:
    async with AnalyticsClient(settings) as client:
        assert await client.ping() is True
    with pytest.raises(ClientClosedError):
        await client.ping()
    with SyncAnalyticsClient(settings) as sync:
        assert sync.ping() is True


async def test_ping_false_on_a_closed_port_without_raising(settings: Settings) -> None:
    closed = settings.replace(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    async with AnalyticsClient(closed) as client:
        started = time.monotonic()
        assert await client.ping() is False
        assert time.monotonic() - started < closed.analytics_publish_timeout + 0.5
    with SyncAnalyticsClient(closed) as sync:
        assert sync.ping() is False


async def test_ping_on_a_hung_server_waits_the_deadline_once_then_answers_at_once(
    settings: Settings, hung: HungServer
) -> None:
    """A Redis that never answers: the first ping gives up at the publish deadline (False, no raise) and
    opens the breaker; while it is open, ping() and track() answer at once."""
    stuck = settings.replace(redis_url=hung.url, analytics_publish_timeout=1.0)
    async with AnalyticsClient(stuck) as client:
        started = time.monotonic()
        assert await client.ping() is False
        first = time.monotonic() - started
        assert 0.9 < first < 1.75, first
        started = time.monotonic()
        assert await client.ping() is False
        assert time.monotonic() - started < 0.05, "an open breaker answers without waiting"
        with pytest.raises(Exception, match="not answering"):
            await client.track("x")  # the breaker ping opened is the one track() obeys
    with SyncAnalyticsClient(stuck) as sync:
        started = time.monotonic()
        assert sync.ping() is False
        assert time.monotonic() - started < 1.75


async def test_ping_false_when_redis_refuses_the_password(settings: Settings) -> None:
    # A user that does not exist: Redis answers WRONGPASS, an answer and not an outage.
    wrong = settings.replace(redis_url=settings.redis_dsn.replace("redis://", "redis://no-such-user:pw@"))
    async with AnalyticsClient(wrong) as client:
        assert await client.ping() is False
