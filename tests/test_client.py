"""AnalyticsClient against the real Redis: track, track_many, queue size, flush task, close, injection."""

from __future__ import annotations

import asyncio
import base64
import inspect
import logging
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis
import redis.asyncio as aioredis
from helpers import wait_for
from servers import free_port

from analytics_sdk import (
    AnalyticsClient,
    AnalyticsError,
    ClientClosedError,
    PublishError,
    Settings,
    SyncAnalyticsClient,
    ValidationError,
    decode,
    validate,
)
from analytics_sdk._queue import QueueKeys
from tests.worker_proc import private_broker

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2024, 5, 17, 12, 0, tzinfo=UTC)


def queued(sync_redis: redis.Redis, settings: Settings) -> list[bytes]:
    return list(sync_redis.lrange(QueueKeys(settings.analytics_key_prefix).queue, 0, -1))


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[tuple[str, redis.Redis]]:
    """A throwaway redis-server as the broker: no worker of another test (test_examples runs one on
    the shared Redis) can take the flush tasks this test reads back."""
    with private_broker(tmp_path) as server, server.client() as client:
        yield server.url, client


def flush_messages(broker_redis: redis.Redis) -> list[tuple[bytes, dict[str, Any]]]:
    return [(raw, msgspec.json.decode(raw)) for raw in broker_redis.lrange("analytics", 0, -1)]


# -- track -----------------------------------------------------------------------------------------------


async def test_track_every_field_lands_in_redis(
    client: AnalyticsClient, settings: Settings, sync_redis: redis.Redis
) -> None:
    fields: dict[str, Any] = {
        "event_id": "0190a0b0-1c2d-7e3f-8a4b-5c6d7e8f9a0b",
        "user_id": 42,
        "session_id": "s-1",
        "entity_type": "article",
        "entity_id": "7",
        "event_metadata": '{"scroll": 0.8}',
        "ip_address": "203.0.113.9",
        "user_agent": "pytest",
        "referrer": "https://example.com/",
        "created_at": datetime(2024, 5, 17, 12, 0, tzinfo=UTC),
    }
    event_id = await client.track("page_view", **fields)
    assert event_id == fields["event_id"]
    (raw,) = queued(sync_redis, settings)
    assert decode(raw) == validate({"event_type": "page_view", **fields})
    assert decode(raw).user_id == "42"
    assert decode(raw).event_metadata == {"scroll": 0.8}


async def test_track_makes_id_and_timestamp(
    client: AnalyticsClient, settings: Settings, sync_redis: redis.Redis
) -> None:
    before = datetime.now(UTC)
    ids = [await client.track("click") for _ in range(3)]
    events = [decode(raw) for raw in queued(sync_redis, settings)]
    assert [e.event_id for e in events] == ids
    assert len(set(ids)) == 3
    for event in events:
        assert before <= event.created_at <= datetime.now(UTC)


async def test_track_event_is_the_legacy_name(
    client: AnalyticsClient, settings: Settings, sync_redis: redis.Redis
) -> None:
    event_id = await client.track_event(event_type="signup", user_id="u1", event_metadata={"plan": "pro"})
    (raw,) = queued(sync_redis, settings)
    assert decode(raw).event_id == event_id
    assert decode(raw).event_metadata == {"plan": "pro"}


LEGACY_PARAMETERS = [
    "event_type",
    "user_id",
    "session_id",
    "entity_type",
    "entity_id",
    "event_metadata",
    "ip_address",
    "user_agent",
    "referrer",
    "created_at",
]


async def test_async_track_event_takes_the_legacy_signature(
    client: AnalyticsClient, settings: Settings, sync_redis: redis.Redis
) -> None:
    """The old service's track_event took positional arguments; the async one was keyword-only."""
    assert list(inspect.signature(client.track_event).parameters) == LEGACY_PARAMETERS
    assert list(inspect.signature(SyncAnalyticsClient.track_event).parameters)[1:] == LEGACY_PARAMETERS
    positional = await client.track_event(
        "purchase", 7, "s", "product", 99, '{"price": 9.5}', "198.51.100.1", "legacy", "https://e.x", NOW
    )
    keywords = await client.track_event(event_type="signup", user_id="u1", created_at=NOW)
    first, second = (decode(raw) for raw in queued(sync_redis, settings))
    assert first.event_id == positional
    assert (first.user_id, first.session_id, first.entity_type, first.entity_id) == (
        "7",
        "s",
        "product",
        "99",
    )
    assert (first.event_metadata, first.ip_address, first.user_agent) == (
        {"price": 9.5},
        "198.51.100.1",
        "legacy",
    )
    assert (first.referrer, first.created_at) == ("https://e.x", NOW)
    assert (second.event_id, second.user_id, second.created_at) == (keywords, "u1", NOW)


async def test_track_validation_error_pushes_nothing(
    client: AnalyticsClient, settings: Settings, sync_redis: redis.Redis
) -> None:
    with pytest.raises(ValidationError) as info:
        await client.track("click", ip_address="127.1")
    assert info.value.field == "ip_address"
    with pytest.raises(ValidationError):
        await client.track("", user_id="u")
    with pytest.raises(ValidationError):
        await client.track(None)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        await client.track("click", colour="red")
    assert queued(sync_redis, settings) == []


async def test_track_many_validates_all_before_pushing_any(
    client: AnalyticsClient, settings: Settings, sync_redis: redis.Redis
) -> None:
    batch: list[dict[str, Any]] = [{"event_type": "ok", "entity_id": i} for i in range(50)]
    batch.insert(37, {"event_type": "bad", "event_metadata": {"x": float("nan")}})
    with pytest.raises(ValidationError) as info:
        await client.track_many(batch)
    assert info.value.field == "event_metadata.x"
    assert queued(sync_redis, settings) == [], "one bad event: none pushed"
    assert not sync_redis.exists(QueueKeys(settings.analytics_key_prefix).queue)


async def test_track_many_pushes_in_order_and_accepts_events(
    client: AnalyticsClient, settings: Settings, sync_redis: redis.Redis
) -> None:
    prepared = validate({"event_type": "prepared"})
    ids = await client.track_many([{"event_type": "a"}, prepared, {"event_type": "b", "user_id": "u"}])
    assert ids[1] == prepared.event_id
    assert [decode(raw).event_id for raw in queued(sync_redis, settings)] == ids
    assert await client.track_many([]) == []
    assert await client.track_many(iter([{"event_type": "gen"}])) != []
    assert await client.get_queue_size() == 4


async def test_get_queue_size(client: AnalyticsClient) -> None:
    assert await client.get_queue_size() == 0
    await client.track_many([{"event_type": "x"}] * 7)
    assert await client.get_queue_size() == 7


async def test_cap_counts_dropped(settings: Settings, sync_redis: redis.Redis) -> None:
    async with AnalyticsClient(settings.replace(analytics_max_queue_size=10)) as client:
        ids = await asyncio.gather(*(client.track("burst", entity_id=i) for i in range(25)))
        await client.track_many([{"event_type": "bulk"}] * 5)
        assert await client.get_queue_size() == 10
    keys = QueueKeys(settings.analytics_key_prefix)
    assert int(sync_redis.get(keys.dropped)) == 20
    survivors = [decode(raw).event_id for raw in queued(sync_redis, settings)]
    assert survivors[:5] == ids[-5:], "the newest survive"


async def test_every_drop_is_reported_by_close(
    settings: Settings, sync_redis: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """The drop warning is rate-limited (one per 10 s); a short-lived process used to report only the
    first push's drops ("1" where 15 were dropped): the rest is reported when the client closes."""
    caplog.set_level(logging.WARNING, "analytics_sdk._client")
    async with AnalyticsClient(settings.replace(analytics_max_queue_size=5)) as client:
        for i in range(20):
            await client.track("over-cap", entity_id=i)  # 20 pushes, one at a time: 15 drops
    dropped = int(sync_redis.get(QueueKeys(settings.analytics_key_prefix).dropped))
    assert dropped == 15
    counts = [
        int(re.search(r"dropped the (\d+) oldest", r.getMessage()).group(1))  # type: ignore[union-attr]
        for r in caplog.records
        if "at its cap" in r.getMessage()
    ]
    assert sum(counts) == 15, counts
    assert counts == [1, 14], "one warning at the first drop, the rest at close"


# -- lifecycle -------------------------------------------------------------------------------------------


async def test_use_after_close(settings: Settings) -> None:
    client = AnalyticsClient(settings)
    await client.track("before")
    await client.aclose()
    assert client.closed
    calls = [
        client.track("after"),
        client.track_event("after"),
        client.track_many([{"event_type": "after"}]),
        client.track_many([]),
        client.get_queue_size(),
        client.flush_events_now(),
    ]
    for call in calls:
        with pytest.raises(ClientClosedError, match="closed"):
            await call
    assert isinstance(ClientClosedError("x"), RuntimeError)
    with pytest.raises(ClientClosedError):
        async with client:
            pass
    await client.aclose()  # idempotent
    await client.aclose()
    assert "closed" in repr(client)


async def test_aclose_of_unused_client_and_context_manager(settings: Settings) -> None:
    await AnalyticsClient(settings).aclose()
    async with AnalyticsClient(settings) as client:
        assert "open" in repr(client)
        await client.track("x")
    assert client.closed


async def test_injected_redis_is_used_and_not_closed(
    settings: Settings, redis_client: aioredis.Redis, sync_redis: redis.Redis
) -> None:
    async with AnalyticsClient(settings, redis=redis_client) as client:
        event_id = await client.track("injected")
        assert client._redis is redis_client
    assert await redis_client.ping()
    assert [decode(raw).event_id for raw in queued(sync_redis, settings)] == [event_id]


def test_client_belongs_to_one_event_loop(settings: Settings) -> None:
    client = AnalyticsClient(settings)

    async def first() -> None:
        await client.track("loop-1")

    async def second() -> None:
        with pytest.raises(AnalyticsError, match="another event loop"):
            await client.track("loop-2")

    asyncio.run(first())
    asyncio.run(second())


def test_aclose_after_use_from_a_second_loop_is_clean(settings: Settings, sync_redis: redis.Redis) -> None:
    """Used under one asyncio.run, touched and closed under another: aclose() used to await the dead
    loop's connections and raise a bare "RuntimeError: Event loop is closed"."""
    client = AnalyticsClient(settings)

    async def first() -> str:
        event_id = await client.track("loop-1")
        await client.get_queue_size()
        return event_id

    async def second() -> None:
        with pytest.raises(AnalyticsError, match="another event loop"):
            await client.track("loop-2")
        await client.aclose()  # the first loop is closed: nothing of it is awaited
        assert client.closed
        with pytest.raises(ClientClosedError):
            await client.track("after-close")
        await client.aclose()  # idempotent

    event_id = asyncio.run(first())
    asyncio.run(second())
    assert [decode(raw).event_id for raw in queued(sync_redis, settings)] == [event_id]


async def test_aclose_from_another_live_loop_says_where_to_close(settings: Settings) -> None:
    """The client's own loop is still alive (in another thread): closing from here is refused clearly,
    and the client stays usable where it belongs."""
    client = AnalyticsClient(settings)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(client.track("home"), loop).result(10)
        with pytest.raises(AnalyticsError, match="close it there"):
            await client.aclose()
        assert not client.closed
        asyncio.run_coroutine_threadsafe(client.aclose(), loop).result(10)
        assert client.closed
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_from_env(settings: Settings) -> None:
    environ = {"ANALYTICS_REDIS_URL": settings.redis_dsn, "ANALYTICS_KEY_PREFIX": "from-env"}
    client = AnalyticsClient.from_env(environ, analytics_batch_size=7)
    assert client.settings.analytics_key_prefix == "from-env"
    assert client.settings.analytics_batch_size == 7
    assert client.keys.queue == "from-env:events:batch"


# -- the flush task --------------------------------------------------------------------------------------


async def test_flush_events_now_sends_the_celery_task(
    settings: Settings, broker: tuple[str, redis.Redis]
) -> None:
    url, broker_redis = broker
    async with AnalyticsClient(settings.replace(broker_url=url)) as client:
        task_id = await client.flush_events_now()
    mine = [(raw, msg) for raw, msg in flush_messages(broker_redis) if msg["headers"]["id"] == task_id]
    try:
        assert len(mine) == 1
        raw, message = mine[0]
        assert message["headers"]["task"] == "flush_analytics_events"
        assert message["properties"]["delivery_info"]["routing_key"] == "analytics"
        assert message["content-type"] == "application/json", "JSON, never pickle"
        assert message["properties"]["body_encoding"] == "base64"
        args, kwargs, _embed = msgspec.json.decode(base64.b64decode(message["body"]))
        assert (args, kwargs) == ([], {})
        assert message["headers"]["expires"], "a stale request expires instead of piling up"
    finally:
        for raw, _ in mine:
            broker_redis.lrem("analytics", 1, raw)


def test_flush_events_now_never_imports_bridge(broker: tuple[str, redis.Redis], key_prefix: str) -> None:
    url, broker_redis = broker
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from analytics_sdk import AnalyticsClient, Settings

        async def main():
            settings = Settings(broker_url={url!r}, analytics_key_prefix={key_prefix!r})
            async with AnalyticsClient(settings) as client:
                print(await client.flush_events_now())

        asyncio.run(main())
        loaded = sorted(m for m in sys.modules if m == "bridge" or m.startswith("bridge."))
        print("bridge modules:", loaded)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    task_id, modules = done.stdout.strip().splitlines()
    assert modules == "bridge modules: []"
    for raw, message in flush_messages(broker_redis):
        if message["headers"]["id"] == task_id:
            broker_redis.lrem("analytics", 1, raw)
            break
    else:
        pytest.fail(f"task {task_id} not found on the broker")


async def test_flush_events_now_unreachable_broker(settings: Settings) -> None:
    async with AnalyticsClient(settings.replace(broker_url=f"redis://127.0.0.1:{free_port()}/0")) as client:
        started = time.monotonic()
        with pytest.raises(PublishError) as info:
            await client.flush_events_now()
        assert time.monotonic() - started < 30
        assert info.value.__cause__ is not None
        # The loop was not blocked meanwhile: tracking still works.
        assert await client.track("still-fine")


async def test_backlog_triggers_one_flush_per_cooldown(
    settings: Settings, broker: tuple[str, redis.Redis], sync_redis: redis.Redis
) -> None:
    url, broker_redis = broker
    triggered = settings.replace(
        broker_url=url,
        analytics_backlog_trigger=True,
        analytics_batch_size=5,
        analytics_backlog_trigger_cooldown=30,
        analytics_max_delay=0.0,  # the trigger alone: no flush for the max delay
    )
    origin = f"gen{os.getpid()}@"
    before = {raw for raw, _ in flush_messages(broker_redis)}

    def sent() -> list[bytes]:
        return [
            raw
            for raw, msg in flush_messages(broker_redis)
            if raw not in before and msg["headers"].get("origin", "").startswith(origin)
        ]

    try:
        async with AnalyticsClient(triggered) as first, AnalyticsClient(triggered) as second:
            await first.track_many([{"event_type": "x"}] * 4)
            await asyncio.sleep(0.2)
            assert sent() == [], "below the batch size: no flush"
            await first.track("fifth")
            await wait_for(lambda: len(sent()) == 1, timeout=15, message="backlog flush sent")
            cooldown = sync_redis.pttl(QueueKeys(settings.analytics_key_prefix).flush_cooldown)
            assert 0 < cooldown <= 30_000
            for client in (first, second, first):
                await client.track_many([{"event_type": "more"}] * 5)
            await asyncio.sleep(0.5)
        # One now, and the triggers inside the cooldown deferred to exactly one at its end.
        ours = set(sent())
        messages = [msg for raw, msg in flush_messages(broker_redis) if raw in ours]
        deferred = sorted(msg["headers"].get("eta") is not None for msg in messages)
        assert deferred == [False, True], "one flush now, one at the cooldown's end, across clients"
    finally:
        for raw in sent():
            broker_redis.lrem("analytics", 1, raw)
