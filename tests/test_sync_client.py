"""SyncAnalyticsClient: threads, fork, legacy signature, lifecycle; against the real Redis."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest
import redis
from helpers import wait_for_sync
from redis.exceptions import ConnectionError as RedisConnectionError
from servers import free_port, start_redis

from analytics_sdk import (
    ClientClosedError,
    PublishError,
    Settings,
    SyncAnalyticsClient,
    ValidationError,
    decode,
)
from analytics_sdk._breaker import PROBE_INTERVAL
from analytics_sdk._queue import QueueKeys
from tests.worker_proc import private_broker

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def sync_client(settings: Settings) -> Iterator[SyncAnalyticsClient]:
    with SyncAnalyticsClient(settings) as client:
        yield client


def queued_ids(sync_redis: redis.Redis, settings: Settings) -> list[str]:
    raws = sync_redis.lrange(QueueKeys(settings.analytics_key_prefix).queue, 0, -1)
    return [decode(raw).event_id for raw in raws]


def run_threads(count: int, work: Callable[[int], list[str]]) -> dict[int, list[str] | BaseException]:
    """Run ``work(index)`` in ``count`` threads released together; each one's result or exception."""
    outcomes: dict[int, list[str] | BaseException] = {}
    start = threading.Barrier(count)

    def worker(index: int) -> None:
        try:
            start.wait(10)
            outcomes[index] = work(index)
        except BaseException as exc:
            outcomes[index] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(thread.is_alive() for thread in threads), "a tracking thread hangs"
    return outcomes


def test_track_from_8_threads(
    sync_client: SyncAnalyticsClient, settings: Settings, sync_redis: redis.Redis
) -> None:
    results: dict[int, list[str]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker(index: int) -> None:
        try:
            start.wait(10)
            results[index] = [
                sync_client.track("threaded", user_id=f"t{index}", entity_id=n) for n in range(100)
            ]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    ids = [event_id for index in range(8) for event_id in results[index]]
    assert len(set(ids)) == 800
    in_redis = queued_ids(sync_redis, settings)
    assert sorted(in_redis) == sorted(ids), "every id once"
    assert sync_client.get_queue_size() == 800


def test_threads_share_multis(tmp_path: Path) -> None:
    """Cross-thread group commit: 8 threads x 200 events, every one acknowledged and queued once,
    in far fewer MULTIs than events (counted on a throwaway server: the shared one's stats are not
    ours)."""
    with start_redis(tmp_path) as server, server.client() as admin:
        settings = Settings(redis_url=server.url, analytics_key_prefix="gc", analytics_backlog_trigger=False)
        with SyncAnalyticsClient(settings) as client:
            client.track("warm-up")  # the loop thread and its connection exist: counts are pushes only
            admin.config_resetstat()
            outcomes = run_threads(8, lambda i: [client.track("t", user_id=f"t{i}") for _ in range(200)])
            stats = {
                name.removeprefix("cmdstat_"): int(row["calls"])
                for name, row in admin.info("commandstats").items()
            }
        per_thread = [outcome for outcome in outcomes.values() if isinstance(outcome, list)]
        assert len(per_thread) == 8, outcomes
        ids = [event_id for outcome in per_thread for event_id in outcome]
        assert len(ids) == len(set(ids)) == 1600
        queued = [decode(raw).event_id for raw in admin.lrange(QueueKeys("gc").queue, 0, -1)]
        assert sorted(queued[1:]) == sorted(ids), "every id once"
        assert stats["evalsha"] == stats["rpush"] == stats["ltrim"]
        assert stats["evalsha"] <= 1600 // 2, (
            f"{stats['evalsha']} pushes for 1600 events from 8 threads: not shared"
        )


def test_publish_error_reaches_every_waiting_thread(tmp_path: Path) -> None:
    with start_redis(tmp_path) as server:
        settings = Settings(
            redis_url=server.url,
            analytics_key_prefix="gc",
            analytics_backlog_trigger=False,
            analytics_publish_retries=1,
            analytics_redis_timeout=1.0,
        )
        with SyncAnalyticsClient(settings) as client:
            client.track("warm-up")
            server.stop()
            started = time.monotonic()
            outcomes = run_threads(8, lambda i: [client.track("lost", entity_id=i)])
            assert time.monotonic() - started < 30
            for outcome in outcomes.values():
                assert isinstance(outcome, PublishError), outcome
                assert isinstance(outcome.__cause__, RedisConnectionError | OSError), repr(outcome.__cause__)
            started = time.monotonic()
            with pytest.raises(PublishError, match="not answering"):  # known down: at once
                client.track("while-down")
            assert time.monotonic() - started < 0.2  # at once, not after retries
            server.start()
            runtime = client._runtime
            assert runtime is not None
            # The same client works again once Redis is back: its probe sees it within about one interval.
            wait_for_sync(lambda: not runtime.client._breaker.is_open, timeout=PROBE_INTERVAL + 5)
            assert client.track("back")


def test_events_handed_over_after_the_loop_ended_fail_at_once(settings: Settings) -> None:
    """A thread that got past the closed check just before close() finished is told, not left waiting."""
    client = SyncAnalyticsClient(settings)
    client.track("x")
    runtime = client._runtime
    assert runtime is not None
    client.close()
    assert not runtime.thread.is_alive()
    future = runtime.batcher.submit_threadsafe([b"{}"])
    with pytest.raises(ClientClosedError):
        future.result(timeout=5)


def test_after_fork_child_uses_its_own_connections(
    sync_client: SyncAnalyticsClient, settings: Settings, sync_redis: redis.Redis
) -> None:
    parent_id = sync_client.track("before-fork")
    parent_runtime = sync_client._runtime
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        status = 1
        try:
            os.close(read)
            child_ids = [sync_client.track("in-child", user_id="child") for _ in range(3)]
            runtime = sync_client._runtime
            status = 2
            if runtime is not None and runtime is not parent_runtime and runtime.pid == os.getpid():
                status = 3
                if sync_client.get_queue_size() >= 4:
                    os.write(write, msgspec.json.encode(child_ids))
                    status = 0
            sync_client.close()
        except BaseException:
            status = 4
        finally:
            os._exit(status)
    os.close(write)
    _, wait_status = os.waitpid(pid, 0)
    with os.fdopen(read, "rb") as pipe:
        reported = pipe.read()
    assert os.waitstatus_to_exitcode(wait_status) == 0
    child_ids = msgspec.json.decode(reported)
    # The parent's client is untouched by the child's use and close, and keeps working.
    assert sync_client._runtime is parent_runtime
    after_id = sync_client.track("after-fork")
    ids = queued_ids(sync_redis, settings)
    assert ids[0] == parent_id
    assert set(child_ids) <= set(ids)
    assert ids[-1] == after_id
    assert len(ids) == 5


def test_fork_before_first_use(settings: Settings, sync_redis: redis.Redis) -> None:
    client = SyncAnalyticsClient(settings)
    pid = os.fork()
    if pid == 0:
        try:
            client.track("child-first")
            client.close()
            status = 0
        except BaseException:
            status = 1
        os._exit(status)
    _, wait_status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wait_status) == 0
    with client:
        client.track("parent")
    assert len(queued_ids(sync_redis, settings)) == 2


def test_legacy_track_event_signature(
    sync_client: SyncAnalyticsClient, settings: Settings, sync_redis: redis.Redis
) -> None:
    names = list(inspect.signature(sync_client.track_event).parameters)
    assert names == [
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
    event_id = sync_client.track_event(
        event_type="purchase",
        user_id=7,
        session_id="s",
        entity_type="product",
        entity_id=99,
        event_metadata='{"price": 9.5}',
        ip_address="198.51.100.1",
        user_agent="legacy",
        referrer="https://example.com",
        created_at="2024-05-17T12:00:00Z",
    )
    (raw,) = sync_redis.lrange(QueueKeys(settings.analytics_key_prefix).queue, 0, -1)
    event = decode(raw)
    assert event.event_id == event_id
    assert (event.user_id, event.entity_id, event.event_metadata) == ("7", "99", {"price": 9.5})
    positional = sync_client.track_event("positional", "u1", "s1")
    last = decode(sync_redis.lrange(QueueKeys(settings.analytics_key_prefix).queue, -1, -1)[0])
    assert (last.event_id, last.user_id, last.session_id) == (positional, "u1", "s1")


def test_validation_runs_in_the_calling_thread(settings: Settings) -> None:
    client = SyncAnalyticsClient(settings)
    with pytest.raises(ValidationError) as info:
        client.track("x", ip_address="not-an-ip")
    assert info.value.field == "ip_address"
    with pytest.raises(ValidationError):
        client.track_many([{"event_type": "ok"}, {"event_type": ""}])
    assert client._runtime is None, "a bad event never starts the loop thread"
    client.close()


def test_track_many_and_queue_size(
    sync_client: SyncAnalyticsClient, settings: Settings, sync_redis: redis.Redis
) -> None:
    with pytest.raises(ValidationError):
        sync_client.track_many([{"event_type": "a"}, {"event_type": "b", "user_id": "\x00"}])
    assert sync_client.get_queue_size() == 0
    ids = sync_client.track_many([{"event_type": "a"}, {"event_type": "b"}])
    assert queued_ids(sync_redis, settings) == ids
    assert sync_client.track_many([]) == []
    assert sync_client.get_queue_size() == 2


def test_use_after_close(settings: Settings) -> None:
    client = SyncAnalyticsClient(settings)
    client.track("x")
    client.close()
    client.close()  # idempotent
    assert client.closed
    assert "closed" in repr(client)
    for call in (
        lambda: client.track("y"),
        lambda: client.track_event("y"),
        lambda: client.track_many([{"event_type": "y"}]),
        client.get_queue_size,
        client.flush_events_now,
    ):
        with pytest.raises(ClientClosedError):
            call()
    assert not [t for t in threading.enumerate() if t.name == "analytics-sdk" and t.is_alive()]


def test_close_while_other_threads_track(settings: Settings) -> None:
    """Each thread tracks until it is told the client is closed: every one of them must end with
    ClientClosedError (not a PublishError, a hang or silence), after tracking successfully before."""
    client = SyncAnalyticsClient(settings)
    client.track("start")
    outcomes: dict[int, str] = {}
    tracked = [0] * 4
    give_up = time.monotonic() + 30

    def worker(index: int) -> None:
        while time.monotonic() < give_up:
            try:
                client.track("busy")
            except ClientClosedError:
                outcomes[index] = "closed"
                return
            except BaseException as exc:
                outcomes[index] = repr(exc)
                return
            tracked[index] += 1
        outcomes[index] = "never told the client was closed"

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    wait_for_sync(lambda: all(tracked), timeout=10, message="every thread tracking")
    client.close()
    for thread in threads:
        thread.join(35)
    assert all(not thread.is_alive() for thread in threads)
    assert outcomes == {i: "closed" for i in range(4)}, outcomes


def test_publish_error_reaches_the_thread(settings: Settings) -> None:
    unreachable = settings.replace(
        redis_url=f"redis://127.0.0.1:{free_port()}/0", analytics_publish_retries=1
    )
    with SyncAnalyticsClient(unreachable) as client, pytest.raises(PublishError):
        client.track("nowhere")


def test_flush_events_now(settings: Settings, tmp_path: Path) -> None:
    # A throwaway broker: no worker of another test can take the task before it is read back.
    with private_broker(tmp_path) as server:
        with SyncAnalyticsClient(settings.replace(broker_url=server.url)) as client:
            task_id = client.flush_events_now()
        with server.client() as broker:
            messages = [msgspec.json.decode(raw) for raw in broker.lrange("analytics", 0, -1)]
    assert [m["headers"]["id"] for m in messages] == [task_id]
    assert messages[0]["headers"]["task"] == "flush_analytics_events"


def test_unclosed_client_does_not_hang_interpreter_exit(settings: Settings) -> None:
    script = textwrap.dedent(
        f"""
        from analytics_sdk import Settings, SyncAnalyticsClient
        client = SyncAnalyticsClient(Settings(redis_url={settings.redis_dsn!r},
                                              analytics_key_prefix={settings.analytics_key_prefix!r},
                                              analytics_backlog_trigger=False))
        print(client.track("forgot-to-close"))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
