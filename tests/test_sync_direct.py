"""SyncAnalyticsClient's direct lane: a thread alone pushes its own events (analytics_sdk._direct).

It must keep every rule of the loop's group commit: one token per push across its retries, the
after-push callback on the loop, the breaker. Counted on throwaway servers (tests/servers.py).
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from helpers import wait_for_sync
from lossy_proxy import LossyProxy
from servers import RedisServer, start_redis

from analytics_sdk import PublishError, Settings, SyncAnalyticsClient, decode
from analytics_sdk._queue import QueueKeys

KEYS = QueueKeys("direct")


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[RedisServer, redis.Redis]]:
    """A throwaway server (its command counts and pauses are ours alone) and an admin client."""
    with start_redis(tmp_path) as server, server.client() as admin:
        yield server, admin


def settings_for(url: str, **changes: object) -> Settings:
    return Settings(
        redis_url=url,
        analytics_key_prefix=KEYS.prefix,
        analytics_backlog_trigger=False,
        **changes,  # type: ignore[arg-type]
    )


def queued_ids(admin: redis.Redis) -> list[str]:
    return [decode(raw).event_id for raw in admin.lrange(KEYS.queue, 0, -1)]


def test_a_lone_thread_pushes_from_its_own_thread(pair: tuple[RedisServer, redis.Redis]) -> None:
    """With the loop thread held up, a lone thread's track() still returns: it did not go through the
    loop (before the direct lane, each event cost two thread wake-ups and a hop through the loop)."""
    server, admin = pair
    with SyncAnalyticsClient(settings_for(server.url)) as client:
        client.track("warm-up")
        runtime = client._runtime
        assert runtime is not None
        release = threading.Event()
        loop_held = threading.Event()

        def hold_the_loop() -> None:
            loop_held.set()
            release.wait(20)

        runtime.batcher._call_soon_threadsafe(hold_the_loop)
        assert loop_held.wait(10)
        outcome: list[str] = []
        worker = threading.Thread(target=lambda: outcome.extend(client.track("direct") for _ in range(3)))
        try:
            worker.start()
            worker.join(10)
            assert not worker.is_alive(), "track() waited for the loop thread"
        finally:
            release.set()
            worker.join(10)
        assert queued_ids(admin)[1:] == outcome


def test_threads_share_pushes_while_one_pushes_alone(pair: tuple[RedisServer, redis.Redis]) -> None:
    """Threads that find the lane taken go to the loop's group commit: every event once, few pushes."""
    server, admin = pair
    with SyncAnalyticsClient(settings_for(server.url)) as client:
        client.track("warm-up")
        admin.config_resetstat()
        ids: list[str] = []
        barrier = threading.Barrier(8)

        def work() -> None:
            barrier.wait(10)
            ids.extend(client.track("t") for _ in range(100))

        threads = [threading.Thread(target=work) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not any(thread.is_alive() for thread in threads)
        pushes = int(admin.info("commandstats")["cmdstat_evalsha"]["calls"])
    assert len(ids) == len(set(ids)) == 800
    assert sorted(queued_ids(admin)[1:]) == sorted(ids)
    assert pushes <= 800 // 2, f"{pushes} pushes for 800 events from 8 threads: not shared"


def test_a_lone_threads_timed_out_push_is_retried_under_one_token(
    pair: tuple[RedisServer, redis.Redis],
) -> None:
    server, admin = pair
    settings = settings_for(server.url, analytics_redis_timeout=0.2, analytics_publish_retries=20)
    with SyncAnalyticsClient(settings) as client:
        client.track("warm-up")
        admin.execute_command("CLIENT", "PAUSE", 700, "WRITE")
        event_id = client.track("slow")
    ids = queued_ids(admin)
    assert ids.count(event_id) == 1
    assert len(ids) == 2


async def test_a_lone_threads_lost_reply_is_queued_and_counted_once(
    pair: tuple[RedisServer, redis.Redis],
) -> None:
    """Redis ran the push, the reply was lost: the retry (same token) queues nothing twice and the
    first run's trim stays counted. The client runs in a thread, the proxy on this loop."""
    server, admin = pair
    async with LossyProxy(server.port) as proxy:
        settings = settings_for(proxy.url, analytics_redis_timeout=0.3, analytics_max_queue_size=3)

        def work() -> str:
            with SyncAnalyticsClient(settings) as client:
                for _ in range(3):
                    client.track("filler")
                proxy.lose_replies = 1
                return client.track("lost-reply")

        event_id = await asyncio.wait_for(asyncio.to_thread(work), 30)
        assert proxy.lost == 1
    ids = queued_ids(admin)
    assert ids.count(event_id) == 1
    assert len(ids) == 3
    assert admin.get(KEYS.dropped) == b"1"


def test_a_lone_threads_drops_are_reported_by_the_loop(
    pair: tuple[RedisServer, redis.Redis], caplog: pytest.LogCaptureFixture
) -> None:
    """The after-push callback (drop warnings, backlog trigger) runs on the loop for direct pushes too:
    the warnings add up to the exact count in Redis."""
    server, admin = pair
    caplog.set_level(logging.WARNING, "analytics_sdk._client")
    with SyncAnalyticsClient(settings_for(server.url, analytics_max_queue_size=2)) as client:
        for _ in range(7):
            client.track("over")
    assert admin.get(KEYS.dropped) == b"5"
    logged = [re.search(r"dropped the (\d+) oldest", r.getMessage()) for r in caplog.records]
    assert sum(int(m.group(1)) for m in logged if m) == 5


def test_the_loop_pushes_after_a_direct_push_under_way(pair: tuple[RedisServer, redis.Redis]) -> None:
    """Hand-over order holds across both ways in: an event handed to the loop while a thread pushes
    alone is pushed only once that push has ended. (The WSGI middleware tracks once the response is
    sent, so the next request's track() can overlap the last one's; their events stay in order.)"""
    server, admin = pair
    with SyncAnalyticsClient(settings_for(server.url)) as client:
        client.track("warm-up")
        runtime = client._runtime
        assert runtime is not None
        lane = runtime.direct
        assert lane._lock.acquire(timeout=5)  # what a thread holds while its own push is out
        outcome: list[str] = []
        later = threading.Thread(target=lambda: outcome.append(client.track("handed-to-the-loop")))
        try:
            later.start()
            wait_for_sync(runtime.batcher.busy, timeout=5, message="the event went to the loop")
            held_until = time.monotonic() + 0.5
            while time.monotonic() < held_until:  # polled: nothing may be pushed meanwhile
                assert admin.llen(KEYS.queue) == 1, "the loop pushed ahead of the direct push"
                time.sleep(0.02)
        finally:
            lane._release()  # the direct push has ended: the loop goes on
            later.join(10)
        assert not later.is_alive()
        assert queued_ids(admin)[1:] == outcome


def test_a_lone_threads_wrong_password_is_not_retried(
    pair: tuple[RedisServer, redis.Redis], caplog: pytest.LogCaptureFixture
) -> None:
    server, admin = pair
    admin.config_set("requirepass", "right")
    url = server.url.replace("redis://", "redis://:wrong@")
    caplog.set_level(logging.WARNING, "analytics_sdk._direct")
    client = SyncAnalyticsClient(settings_for(url, analytics_publish_retries=5))
    try:
        with pytest.raises(PublishError, match="credentials") as info:
            client.track("denied")
    finally:
        client.close()
        admin.config_set("requirepass", "")  # the admin connection was authenticated before
    assert isinstance(info.value.__cause__, redis.AuthenticationError)
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]
    assert "wrong" not in str(info.value)
