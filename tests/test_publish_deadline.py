"""A Redis that accepts connections and never answers (issue 11 §10), and concurrent reads (§6).

§10: every track() has a total deadline, ANALYTICS_PUBLISH_TIMEOUT (2 s by default), across all its
retries; once Redis is known down the breaker fails calls at once, and its probe closes it again as
soon as Redis answers. The hung server is a plain socket (tests/hung_server.py); "Redis is back" is a
real redis-server started on the very port the client was configured with.

§6: redis-py 8's pool (100 connections, MaxConnectionsError at once) failed 300 concurrent
get_queue_size() calls; reads now coalesce into one LLEN at a time and the pool blocks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from helpers import wait_for, wait_for_sync
from hung_server import HungServer
from servers import RedisServer, start_redis

from analytics_sdk import AnalyticsClient, PublishError, Settings, SyncAnalyticsClient, decode
from analytics_sdk._breaker import PROBE_INTERVAL
from analytics_sdk._client import MAX_CONNECTIONS
from analytics_sdk._queue import QueueKeys

KEYS = QueueKeys("deadline")
DEFAULT_DEADLINE = 2.0  # the documented default of ANALYTICS_PUBLISH_TIMEOUT
SLACK = 0.75  # scheduling on a loaded 2-core machine; the bound is the deadline, not the deadline x 4


def hung_settings(url: str, **changes: object) -> Settings:
    """Defaults everywhere (the deadline, redis_timeout 5 s, 3 retries): what a new user runs."""
    return Settings(
        redis_url=url, analytics_key_prefix=KEYS.prefix, analytics_backlog_trigger=False, **changes
    )  # type: ignore[arg-type]


@pytest.fixture
def hung() -> Iterator[HungServer]:
    with HungServer() as server:
        yield server


def revive(hung: HungServer, tmp_path: Path) -> RedisServer:
    """Replace the hung server by a real redis-server on the same port."""
    hung.stop()
    server = RedisServer(tmp_path / "revived", hung.port, ())
    server.start()
    return server


def test_defaults_bound_a_track_to_a_couple_of_seconds() -> None:
    settings = Settings()
    assert settings.analytics_publish_timeout == DEFAULT_DEADLINE
    assert settings.analytics_publish_timeout < settings.analytics_redis_timeout * (
        settings.analytics_publish_retries + 1
    ), "the deadline, not the socket timeout times the tries, is the worst case"


async def test_hung_redis_fails_within_the_deadline_then_at_once_then_recovers(
    hung: HungServer, tmp_path: Path
) -> None:
    async with AnalyticsClient(hung_settings(hung.url)) as client:
        # 1. The first calls wait out the deadline, not 5 s x 4 tries; concurrent callers too.
        started = time.monotonic()
        results = await asyncio.gather(
            *(client.track("hung", entity_id=i) for i in range(20)), return_exceptions=True
        )
        elapsed = time.monotonic() - started
        assert all(isinstance(r, PublishError) for r in results), results
        assert DEFAULT_DEADLINE - 0.1 <= elapsed <= DEFAULT_DEADLINE + SLACK, elapsed
        assert "ANALYTICS_PUBLISH_TIMEOUT" in str(results[0])
        assert isinstance(results[0], PublishError) and isinstance(results[0].__cause__, TimeoutError)
        # 2. Known down: every call fails at once, for as long as the server does not answer.
        for _ in range(20):
            started = time.monotonic()
            with pytest.raises(PublishError, match="not answering") as info:
                await client.track("while-open")
            assert time.monotonic() - started < 0.2  # at once, against a 2 s deadline
            assert info.value.__cause__ is not None
        started = time.monotonic()
        with pytest.raises(PublishError, match="not answering"):
            await client.get_queue_size()
        assert time.monotonic() - started < 0.2  # at once, against a 2 s deadline
        await asyncio.sleep(3 * PROBE_INTERVAL)  # the probe keeps failing against the hung server
        assert client._breaker.is_open
        # 3. Redis answers on that port again: the probe closes the breaker, track() succeeds.
        server = revive(hung, tmp_path)
        try:
            await wait_for(
                lambda: not client._breaker.is_open,
                timeout=PROBE_INTERVAL + DEFAULT_DEADLINE + 5,
                message="breaker closed by the probe",
            )
            event_id = await client.track("back")
            assert await client.get_queue_size() == 1
            with server.client() as check:
                assert [decode(raw).event_id for raw in check.lrange(KEYS.queue, 0, -1)] == [event_id]
        finally:
            server.stop()


async def test_a_shorter_deadline_is_honoured(hung: HungServer) -> None:
    async with AnalyticsClient(hung_settings(hung.url, analytics_publish_timeout=0.5)) as client:
        started = time.monotonic()
        with pytest.raises(PublishError):
            await client.get_queue_size()  # reads have the same deadline (and open the breaker)
        assert time.monotonic() - started <= 0.5 + SLACK
        with pytest.raises(PublishError, match="not answering"):
            await client.track("at-once")


def test_sync_client_against_a_hung_redis(hung: HungServer, tmp_path: Path) -> None:
    with SyncAnalyticsClient(hung_settings(hung.url)) as client:
        started = time.monotonic()
        with pytest.raises(PublishError, match="ANALYTICS_PUBLISH_TIMEOUT"):
            client.track("hung")
        assert time.monotonic() - started <= DEFAULT_DEADLINE + SLACK
        for _ in range(10):
            started = time.monotonic()
            with pytest.raises(PublishError, match="not answering"):
                client.track("while-open")
            assert time.monotonic() - started < 0.2  # at once, against a 2 s deadline
        server = revive(hung, tmp_path)
        try:
            runtime = client._runtime
            assert runtime is not None
            wait_for_sync(
                lambda: not runtime.client._breaker.is_open, timeout=PROBE_INTERVAL + DEFAULT_DEADLINE + 5
            )
            event_id = client.track("back")
            with server.client() as check:
                assert [decode(raw).event_id for raw in check.lrange(KEYS.queue, 0, -1)] == [event_id]
        finally:
            server.stop()


# -- §6: concurrent reads -------------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with start_redis(tmp_path) as srv:
        yield srv


def llen_calls(admin: redis.Redis) -> int:
    return int(admin.info("commandstats").get("cmdstat_llen", {}).get("calls", 0))


async def test_300_concurrent_queue_size_reads(server: RedisServer) -> None:
    with server.client() as admin:
        async with AnalyticsClient(hung_settings(server.url)) as client:
            await client.track_many([{"event_type": "x"}] * 7)
            admin.config_resetstat()
            sizes = await asyncio.gather(*(client.get_queue_size() for _ in range(300)))
            assert sizes == [7] * 300
            assert llen_calls(admin) <= 10, "concurrent reads share LLENs"
            clients = admin.client_list()
            ours = [c for c in clients if c["cmd"] != "client|list"]
            assert len(ours) <= MAX_CONNECTIONS


async def test_1000_concurrent_reads_and_writes(server: RedisServer) -> None:
    """500 track() and 500 get_queue_size() at once, on one client; and a read never predates an
    event its own caller saw acknowledged (it is answered by an LLEN sent after the call began)."""
    acknowledged = 0

    async def write(i: int) -> str:
        nonlocal acknowledged
        event_id = await client.track("mixed", entity_id=i)
        acknowledged += 1
        return event_id

    async def read() -> tuple[int, int]:
        floor = acknowledged  # acknowledged before this call: the answer must count them all
        return floor, await client.get_queue_size()

    with server.client() as admin:
        async with AnalyticsClient(hung_settings(server.url)) as client:
            calls = [write(i) if i % 2 else read() for i in range(1000)]
            results = await asyncio.gather(*calls)
            ids = [r for r in results if isinstance(r, str)]
            reads = [r for r in results if isinstance(r, tuple)]
            assert len(ids) == len(set(ids)) == 500 and len(reads) == 500
            for floor, size in reads:
                assert floor <= size <= 500, (floor, size)
            assert await client.get_queue_size() == 500
            assert sorted(decode(raw).event_id for raw in admin.lrange(KEYS.queue, 0, -1)) == sorted(ids)
            assert len([c for c in admin.client_list() if c["cmd"] != "client|list"]) <= MAX_CONNECTIONS


async def test_a_cancelled_reader_does_not_cancel_the_others(server: RedisServer) -> None:
    with server.client() as admin:
        async with AnalyticsClient(hung_settings(server.url)) as client:
            await client.track("one")
            admin.execute_command("CLIENT", "PAUSE", 300, "ALL")
            readers = [asyncio.create_task(client.get_queue_size()) for _ in range(10)]
            await asyncio.sleep(0.05)
            readers[0].cancel()
            results = await asyncio.gather(*readers, return_exceptions=True)
            assert isinstance(results[0], asyncio.CancelledError)
            assert results[1:] == [1] * 9
