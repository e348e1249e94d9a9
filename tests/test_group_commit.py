"""Group commit and Redis failures, on throwaway redis-servers (exact command counts, stop, pause, OOM).

The machine's Redis is shared with concurrent test runs, so its INFO commandstats cannot be read as
ours: every test here that counts commands or breaks the server starts its own (tests/servers.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
from helpers import wait_for
from lossy_proxy import LossyProxy
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from servers import RedisServer, start_redis

from analytics_sdk import AnalyticsClient, PublishError, Settings, decode
from analytics_sdk._batcher import MAX_BATCH_BYTES, MAX_BATCH_EVENTS
from analytics_sdk._breaker import PROBE_INTERVAL
from analytics_sdk._queue import QueueKeys

KEYS = QueueKeys("gc")
CLIENT_LOG = "analytics_sdk._breaker"  # push_with_retry logs its retries there


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with start_redis(tmp_path) as srv:
        yield srv


@pytest.fixture
def admin(server: RedisServer) -> Iterator[redis.Redis]:
    with server.client() as client:
        yield client


def settings_for(server: RedisServer, **changes: object) -> Settings:
    return Settings(
        redis_url=server.url,
        analytics_key_prefix=KEYS.prefix,
        analytics_backlog_trigger=False,
        **changes,  # type: ignore[arg-type]
    )


@pytest.fixture
async def client(server: RedisServer) -> AsyncIterator[AnalyticsClient]:
    async with AnalyticsClient(settings_for(server)) as c:
        await c.track("warm-up")  # the connection exists: the counts below are the pushes alone
        yield c


def counts(admin: redis.Redis) -> dict[str, int]:
    stats = admin.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(row["calls"]) for name, row in stats.items()}


def pushes(admin: redis.Redis) -> int:
    """Pushes run: one EVALSHA each (the client's warm-up call loaded the script), or from
    MULTI_FROM_BYTES of payloads on, one MULTI/EXEC each (the RPUSH, then a short script)."""
    stats = counts(admin)
    return stats.get("evalsha", 0) + stats.get("exec", 0)


def queued_ids(admin: redis.Redis) -> list[str]:
    return [decode(raw).event_id for raw in admin.lrange(KEYS.queue, 0, -1)]


def pause(admin: redis.Redis) -> None:
    """Hold every write on the server until the test says CLIENT UNPAUSE (or 20 s pass)."""
    admin.execute_command("CLIENT", "PAUSE", 20_000, "WRITE")


async def until_in_flight(client: AnalyticsClient) -> None:
    """Wait until the client's push loop has taken every waiting event into its pipeline."""
    batcher = client._batcher
    await wait_for(lambda: batcher._flusher is not None and not batcher._waiting, timeout=5)


# -- coalescing ----------------------------------------------------------------------------------------


async def test_500_concurrent_tracks_share_a_few_execs(client: AnalyticsClient, admin: redis.Redis) -> None:
    admin.config_resetstat()
    ids = await asyncio.gather(*(client.track("click", user_id=str(i)) for i in range(500)))
    stats = counts(admin)
    assert len(set(ids)) == 500
    assert set(ids) <= set(queued_ids(admin))
    made = pushes(admin)
    assert made <= 5, f"{made} pushes for 500 calls: not coalesced"
    # the commands inside the scripts are counted too: one RPUSH and one LTRIM per push, nothing else
    assert made == stats["rpush"] == stats["ltrim"]
    assert stats.get("multi", 0) == stats.get("exec", 0) == stats.get("eval", 0), "a script per MULTI"


async def test_lone_caller_pays_one_round_trip(client: AnalyticsClient, admin: redis.Redis) -> None:
    admin.config_resetstat()
    event_id = await client.track("lone")
    stats = counts(admin)
    stats.pop("config|resetstat", None)
    stats.pop("info", None)
    # one EVALSHA; inside it the retry guard's GET and SET, the RPUSH and the LTRIM
    assert stats == {"evalsha": 1, "get": 1, "rpush": 1, "ltrim": 1, "set": 1}
    assert queued_ids(admin)[-1] == event_id
    # No timer, no batching of sequential calls: each awaited call is its own round trip.
    for _ in range(5):
        await client.track("sequential")
    assert pushes(admin) == 6


async def test_batches_are_bounded_in_events_and_bytes(client: AnalyticsClient, admin: redis.Redis) -> None:
    admin.config_resetstat()
    n = MAX_BATCH_EVENTS * 2 + 500
    ids = await asyncio.gather(*(client.track("many") for _ in range(n)))
    assert pushes(admin) >= 3
    assert set(ids) <= set(queued_ids(admin))
    # 30 KB of metadata each: 1 MiB holds about 34 of them.
    admin.config_resetstat()
    big = {"blob": "x" * 30_000}
    ids = await asyncio.gather(*(client.track("big", event_metadata=big) for _ in range(100)))
    assert pushes(admin) >= 100 * 30_000 // MAX_BATCH_BYTES + 1
    assert set(ids) <= set(queued_ids(admin))


async def test_track_many_is_one_multi(client: AnalyticsClient, admin: redis.Redis) -> None:
    admin.config_resetstat()
    ids = await client.track_many([{"event_type": "bulk", "entity_id": i} for i in range(3000)])
    assert pushes(admin) == 1, "one atomic push, even past the group-commit bound"
    assert queued_ids(admin)[-3000:] == ids


async def test_callers_return_only_after_redis_acknowledged(
    client: AnalyticsClient, admin: redis.Redis
) -> None:
    pause(admin)
    tasks = [asyncio.create_task(client.track("paused")) for _ in range(20)]
    await until_in_flight(client)
    await asyncio.sleep(0.2)
    assert not any(task.done() for task in tasks), "returned before Redis had written the event"
    admin.execute_command("CLIENT", "UNPAUSE")
    ids = await asyncio.gather(*tasks)
    assert set(ids) <= set(queued_ids(admin))


# -- failures ------------------------------------------------------------------------------------------


async def test_failed_pipeline_reaches_every_waiter(client: AnalyticsClient, admin: redis.Redis) -> None:
    admin.delete(KEYS.queue)
    admin.set(KEYS.queue, b"not a list")  # RPUSH fails with WRONGTYPE inside the push script
    admin.config_resetstat()
    results = await asyncio.gather(*(client.track("doomed") for _ in range(50)), return_exceptions=True)
    assert len(results) == 50
    for result in results:
        assert isinstance(result, PublishError), result
        assert isinstance(result.__cause__, ResponseError)
        assert "WRONGTYPE" in str(result.__cause__)
    assert pushes(admin) <= 5, "a refusal is not retried"
    assert admin.get(KEYS.queue) == b"not a list", "nothing written: the script stopped at the RPUSH"
    admin.delete(KEYS.queue)
    event_id = await client.track("recovered")
    assert queued_ids(admin) == [event_id]


async def test_oom_raises_publish_error_at_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with start_redis(tmp_path, "--maxmemory-policy", "noeviction") as srv:
        with srv.client() as admin:
            for i in range(20):
                admin.set(f"filler:{i}", b"x" * 100_000)
            # Far above the limit, so freed client buffers cannot bring it back under.
            admin.config_set("maxmemory", int(admin.info("memory")["used_memory"]) // 2)
            with pytest.raises(OutOfMemoryError):
                admin.set("probe", b"x")
        async with AnalyticsClient(settings_for(srv, analytics_publish_retries=5)) as client:
            caplog.set_level(logging.WARNING, CLIENT_LOG)
            started = time.monotonic()
            results = await asyncio.gather(*(client.track("full") for _ in range(10)), return_exceptions=True)
            elapsed = time.monotonic() - started
        for result in results:
            assert isinstance(result, PublishError), result
            assert isinstance(result.__cause__, OutOfMemoryError)
        assert elapsed < 2.0
        assert not [r for r in caplog.records if "retrying" in r.getMessage()], "OOM is not retried"


async def test_stopped_server_raises_after_bounded_retries(
    server: RedisServer, client: AnalyticsClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, CLIENT_LOG)
    retries = client.settings.analytics_publish_retries
    server.stop()
    started = time.monotonic()
    results = await asyncio.gather(*(client.track("lost") for _ in range(20)), return_exceptions=True)
    elapsed = time.monotonic() - started
    for result in results:
        assert isinstance(result, PublishError), result
        assert isinstance(result.__cause__, RedisConnectionError | OSError), repr(result.__cause__)
    retried = [r for r in caplog.records if "retrying" in r.getMessage()]
    batches = len(retried) // retries
    assert len(retried) == batches * retries and batches >= 1, "each batch tried exactly retries + 1 times"
    assert elapsed < 10, f"gave up after {elapsed:.1f}s"
    # Redis is known down now: the next call fails at once, without a single retry.
    started = time.monotonic()
    with pytest.raises(PublishError, match="not answering") as info:
        await client.track("while-down")
    assert time.monotonic() - started < 0.2  # at once, not after retries
    assert isinstance(info.value.__cause__, RedisConnectionError | OSError)
    assert len([r for r in caplog.records if "retrying" in r.getMessage()]) == len(retried)
    # The same client works again once Redis is back: its probe sees it within about one interval.
    server.start()
    await wait_for(lambda: not client._breaker.is_open, timeout=PROBE_INTERVAL + 5, message="probe")
    event_id = await client.track("back")
    with server.client() as check:
        assert [decode(r).event_id for r in check.lrange(KEYS.queue, 0, -1)] == [event_id]


async def test_connection_refused_is_retried_until_redis_is_back(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, CLIENT_LOG)
    async with AnalyticsClient(settings_for(server, analytics_publish_retries=30)) as client:
        await client.track("warm-up")
        server.stop()
        task = asyncio.create_task(client.track("patient"))
        await wait_for(lambda: any("retrying" in r.getMessage() for r in caplog.records), timeout=10)
        assert not task.done()
        server.start()
        event_id = await asyncio.wait_for(task, 30)
    with server.client() as check:
        assert [decode(r).event_id for r in check.lrange(KEYS.queue, 0, -1)] == [event_id]


async def test_timeout_is_retried(server: RedisServer, admin: redis.Redis) -> None:
    """A push that times out is sent again under the same token: queued once, however many ran."""
    settings = settings_for(server, analytics_redis_timeout=0.2, analytics_publish_retries=20)
    async with AnalyticsClient(settings) as client:
        await client.track("warm-up")
        admin.execute_command("CLIENT", "PAUSE", 700, "WRITE")
        event_id = await asyncio.wait_for(client.track("slow"), 30)
    ids = queued_ids(admin)
    assert ids.count(event_id) == 1
    assert len(ids) == 2


async def test_a_push_whose_reply_was_lost_is_queued_and_counted_once_at_the_cap(
    server: RedisServer, admin: redis.Redis
) -> None:
    """Redis ran the push but its reply was lost on the way (a proxy drops it): the client times out
    and retries. The retry must neither queue a second copy nor lose the first run's trim from the
    dropped counter: accepted = queued + dropped, exactly."""
    async with LossyProxy(server.port) as proxy:
        settings = settings_for(server, analytics_redis_timeout=0.3, analytics_max_queue_size=3).replace(
            redis_url=proxy.url
        )
        async with AnalyticsClient(settings) as client:
            for _ in range(3):
                await client.track("filler")
            proxy.lose_replies = 1
            event_id = await asyncio.wait_for(client.track("lost-reply"), 30)
        assert proxy.lost == 1
    ids = queued_ids(admin)
    assert ids.count(event_id) == 1
    assert len(ids) == 3
    assert admin.get(KEYS.dropped) == b"1", "exactly the one filler trimmed off the head"


async def test_timeout_gives_up_after_bounded_retries(server: RedisServer, admin: redis.Redis) -> None:
    settings = settings_for(server, analytics_redis_timeout=0.1, analytics_publish_retries=2)
    async with AnalyticsClient(settings) as client:
        await client.track("warm-up")
        admin.execute_command("CLIENT", "PAUSE", 5000, "WRITE")
        try:
            started = time.monotonic()
            with pytest.raises(PublishError) as info:
                await client.track("slow")
            assert time.monotonic() - started < 3
            assert isinstance(info.value.__cause__, RedisTimeoutError)
        finally:
            admin.execute_command("CLIENT", "UNPAUSE")


# -- cancellation and shutdown ---------------------------------------------------------------------------


async def test_cancelled_waiters_do_not_break_others(client: AnalyticsClient, admin: redis.Redis) -> None:
    pause(admin)
    in_flight = asyncio.create_task(client.track("in-flight"))
    await until_in_flight(client)
    waiting = [asyncio.create_task(client.track("waiting", entity_id=i)) for i in range(10)]
    await asyncio.sleep(0)  # they validated and queued behind the pipeline in flight
    assert len(client._batcher._waiting) == 10
    for index in (0, 4, 9):
        waiting[index].cancel()
    in_flight.cancel()
    admin.execute_command("CLIENT", "UNPAUSE")
    done = await asyncio.gather(*waiting, in_flight, return_exceptions=True)
    survivors = [r for i, r in enumerate(done[:10]) if i not in (0, 4, 9)]
    assert all(isinstance(r, str) for r in survivors), survivors
    assert all(isinstance(done[i], asyncio.CancelledError) for i in (0, 4, 9, 10))
    queued = queued_ids(admin)
    assert set(survivors) <= set(queued)
    cancelled_entities = {"0", "4", "9"}
    assert not [
        raw for raw in admin.lrange(KEYS.queue, 0, -1) if decode(raw).entity_id in cancelled_entities
    ], "a caller cancelled before its event was sent is not pushed"
    assert await client.track("after") in queued_ids(admin)


async def test_stopped_push_loop_fails_its_waiters(client: AnalyticsClient, admin: redis.Redis) -> None:
    pause(admin)
    in_flight = [asyncio.create_task(client.track("in-flight")) for _ in range(5)]
    await until_in_flight(client)
    queued = [asyncio.create_task(client.track("queued")) for _ in range(5)]
    await asyncio.sleep(0)
    assert client._batcher._flusher is not None
    client._batcher._flusher.cancel()
    results = await asyncio.wait_for(asyncio.gather(*in_flight, *queued, return_exceptions=True), 10)
    assert all(isinstance(r, PublishError) for r in results), results
    admin.execute_command("CLIENT", "UNPAUSE")
    assert await client.track("next") in queued_ids(admin), "a new push loop starts"


async def test_aclose_waits_for_events_already_handed_over(server: RedisServer, admin: redis.Redis) -> None:
    client = AnalyticsClient(settings_for(server))
    await client.track("warm-up")
    pause(admin)
    tasks = [asyncio.create_task(client.track("closing")) for _ in range(30)]
    await asyncio.sleep(0)
    closing = asyncio.create_task(client.aclose())
    await asyncio.sleep(0.1)
    assert not closing.done(), "aclose() waits for the events it was handed"
    admin.execute_command("CLIENT", "UNPAUSE")
    await closing
    ids = await asyncio.gather(*tasks)
    assert set(ids) <= set(queued_ids(admin))
    assert client.closed


async def test_wrong_password_is_not_retried(server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    """redis-py's AuthenticationError is a ConnectionError subclass, but no retry can fix it."""
    with server.client() as admin:
        admin.config_set("requirepass", "right")
    settings = settings_for(server, analytics_publish_retries=5).replace(
        redis_url=server.url.replace("redis://", "redis://:wrong@")
    )
    caplog.set_level(logging.WARNING, CLIENT_LOG)
    async with AnalyticsClient(settings) as client:
        with pytest.raises(PublishError, match="credentials") as info:
            await client.track("denied")
    assert isinstance(info.value.__cause__, redis.AuthenticationError)
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]
    assert "wrong" not in str(info.value)
