"""The queue protocol under faults: 18 (a drain paused past its lease while another takes over:
fencing), 19 (every script run twice, as by a client retrying after a lost reply: idempotence),
20 (push replies lost at the queue's cap: an exact dropped count)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis
import redis.asyncio as aioredis

from analytics_sdk import AnalyticsClient, Settings
from analytics_sdk._event import new_event_id
from analytics_sdk._queue import QueueKeys, expired_leases, push

from .ledger import Ledger, collect, event_id_of, quick, quiesce
from .proxy import ReplyLosingProxy
from .servers import RedisServer
from .tools import backlog, rows, seed, stats
from .workers import REPO_ROOT, settings_env

pytestmark = pytest.mark.faults


def _poison(event_id: str) -> bytes:
    """Decodes as JSON with an event_id, but fails validation (empty event_type): dead-lettered by
    whichever drain decodes it, every time."""
    return msgspec.json.encode({"v": 1, "event_id": event_id, "event_type": ""})


def _seed_with_poison(settings: Settings, good: int) -> tuple[Ledger, str]:
    ledger = seed(settings, good)
    poison_id = new_event_id()
    asyncio.run(_push_raw(settings, [_poison(poison_id)]))
    ledger.inject(poison_id, "dead")
    return ledger, poison_id


async def _push_raw(settings: Settings, payloads: list[bytes]) -> None:
    client = aioredis.Redis.from_url(settings.redis_dsn)
    try:
        await push(client, QueueKeys(settings.analytics_key_prefix), payloads, cap=1_000_000)
    finally:
        await client.aclose()


def _cli_flush(settings: Settings, log: Path, **env: str) -> subprocess.Popen[bytes]:
    """``python -m bridge flush --json`` in its own session: the CLI's drain has no time limit."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "bridge", "flush", "--json"],
            cwd=REPO_ROOT,
            env=settings_env(settings, **env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@pytest.fixture
def cli_processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait(10)


def _summary_of(log: Path) -> dict[str, Any]:
    text = log.read_text(errors="replace")
    start = text.rindex("\n{\n") + 1  # the --json summary; log lines and a stderr note around it
    summary: dict[str, Any] = msgspec.json.decode(text[start : text.index("\n}", start) + 2])
    return summary


@pytest.mark.timeout(90)
def test_18_drain_paused_past_its_lease_is_fenced(
    fault_settings: Settings, tmp_path: Path, cli_processes: list[subprocess.Popen[bytes]]
) -> None:
    """One poison event and nine good ones. Drain A (the CLI's flush: no time limit, like a solo or
    threads pool) claims them and is paused for 8 s right after its claim (a VM or container pause:
    the fail point blocks its event loop, heartbeat included). Its 2 s lease expires; drain B takes
    the batch over and finishes it. A wakes, inserts (duplicates) and acks: its ack must do nothing.
    Exactly one dead letter, and the `dead` counter says 1."""
    settings = quick(fault_settings, 2.0)
    ledger, poison_id = _seed_with_poison(settings, 9)
    keys = QueueKeys(settings.analytics_key_prefix)

    log = tmp_path / "paused-drain.log"
    paused = _cli_flush(settings, log, ANALYTICS_FAILPOINTS="after_claim=sleep:8")
    cli_processes.append(paused)
    claimed_at = time.monotonic()
    deadline = claimed_at + 20
    while backlog(settings) != (0, 1):  # A holds the one lease, nothing is queued
        assert paused.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"A never claimed: {log.read_text()}"
        time.sleep(0.05)
    claimed_at = time.monotonic()

    async def take_over_when_expired() -> dict[str, Any]:
        from bridge.drain import drain

        client = aioredis.Redis.from_url(settings.redis_dsn)
        try:
            while not await expired_leases(client, keys, settings.analytics_visibility_timeout):
                assert time.monotonic() - claimed_at < 6, "A's lease did not expire by Redis's clock"
                await asyncio.sleep(0.05)
        finally:
            await client.aclose()
        return (await drain(settings)).as_dict()

    second = asyncio.run(take_over_when_expired())
    assert paused.poll() is None, "A must still be paused when B finishes: the scenario needs it"
    assert time.monotonic() - claimed_at < 8
    assert second["reclaimed"] == 10, second
    assert second["inserted"] == 9 and second["dead_lettered"] == 1, second
    assert stats(settings)["dead"] == "1"

    assert paused.wait(30) == 0, log.read_text()
    final = stats(settings)
    assert final["dead"] == "1", f"the stale drain's ack counted again: {final}"
    assert final["claimed"] == "10", final
    first = _summary_of(log)
    output = log.read_text()
    assert "no longer this drain's when it acked them: another drain took them over" in output, output
    assert first["dead_lettered"] == 0 and first["batches"] == 0, first
    assert first["inserted"] == 0, "its rows were in already: B committed them"
    asyncio.run(quiesce(settings))
    outcome = asyncio.run(collect(settings))
    outcome.check(ledger)
    assert [event_id_of(d["payload"]) for d in outcome.dead] == [poison_id]
    assert rows(settings) == 9


@pytest.mark.timeout(120)
def test_19_every_script_runs_twice(fault_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that retries after a lost reply sends a script again that already ran (redis-py does
    it on its own with ``retry_on_timeout``, or by default in ``Redis()`` since 8.0). Here every
    EVAL/EVALSHA the drains send runs twice on the server: claims, take-overs, acks, renewals and
    releases. Nothing may be lost, no dead letter doubled, no counter counted twice."""
    settings = quick(fault_settings, 1.0).replace(analytics_batch_size=50, analytics_insert_batch_size=100)
    ledger, poison_id = _seed_with_poison(settings, 600)
    # A lease left by a dead drain, so that take-over runs twice as well.
    with redis.Redis.from_url(settings.redis_dsn) as r:
        keys = QueueKeys(settings.analytics_key_prefix)
        r.rpush(keys.inflight("orphan"), *r.lpop(keys.queue, 30))
        r.zadd(keys.leases, {"orphan": 1})

    original = aioredis.Redis.execute_command
    runs: dict[str, int] = {}

    async def twice(self: aioredis.Redis, *args: Any, **options: Any) -> Any:
        name = str(args[0]).upper()
        if name in ("EVAL", "EVALSHA"):
            runs[name] = runs.get(name, 0) + 1
            await original(self, *args, **options)  # its reply is "lost": the client sends it again
        return await original(self, *args, **options)

    from bridge.drain import drain

    monkeypatch.setattr(aioredis.Redis, "execute_command", twice)
    summaries = []
    for _ in range(10):
        summaries.append(asyncio.run(drain(settings)).as_dict())
        if backlog(settings) == (0, 0):
            break
    monkeypatch.undo()
    assert sum(runs.values()) >= 8, f"the drains ran too few scripts for the scenario to mean much: {runs}"
    assert backlog(settings) == (0, 0), summaries

    total = len(ledger.accepted) + 1
    final = stats(settings)
    assert int(final["claimed"]) == total, final
    assert int(final["inserted"]) == total - 1, final
    assert final["dead"] == "1", final
    assert sum(s["reclaimed"] for s in summaries) == 30, summaries
    outcome = asyncio.run(collect(settings))
    outcome.check(ledger)
    assert [event_id_of(d["payload"]) for d in outcome.dead] == [poison_id]
    assert rows(settings) == total - 1


@pytest.mark.timeout(90)
def test_20_lost_push_replies_at_the_cap(fault_settings: Settings, fault_redis: RedisServer) -> None:
    """Producers push through a link that loses the reply to every third push: the push ran, the
    client hears nothing and tries again. The queue is at its cap. The retry must queue nothing twice
    and count no drop twice: accepted = rows + dead + dropped, exactly."""
    cap = 50
    with ReplyLosingProxy(fault_redis.port) as proxy:
        through = fault_settings.replace(
            redis_url=f"redis://127.0.0.1:{proxy.port}/0",
            analytics_max_queue_size=cap,
            analytics_redis_timeout=2.0,
            analytics_publish_retries=2,
        )
        keys = QueueKeys(through.analytics_key_prefix)
        events = [
            {"event_type": "capped", "event_id": new_event_id(), "event_metadata": {"n": n}}
            for n in range(200)
        ]

        async def produce() -> list[str]:
            accepted: list[str] = []
            async with AnalyticsClient(through) as client:
                for start in range(0, len(events), 10):
                    if start % 30 == 10:  # every third push loses its reply once
                        proxy.lose_replies(keys.queue.encode(), 1)
                    accepted += await client.track_many(events[start : start + 10])
            return accepted

        accepted = asyncio.run(produce())
        assert proxy.lost == 7, "the link lost fewer replies than the scenario needs"
    assert accepted == [e["event_id"] for e in events]
    with redis.Redis.from_url(fault_settings.redis_dsn) as r:
        queued = [msgspec.json.decode(raw)["event_id"] for raw in r.lrange(keys.queue, 0, -1)]
        dropped = int(r.get(keys.dropped) or 0)
    assert queued == accepted[-cap:], "the newest 50, once each, in order"
    assert dropped == len(events) - cap, "each trim counted once, the retries' included in none"

    ledger = Ledger()
    ledger.accept(accepted)
    settings = fault_settings.replace(analytics_max_queue_size=cap)
    asyncio.run(quiesce(settings))
    outcome = asyncio.run(collect(settings))
    outcome.check(ledger)
    assert outcome.row_count + len(outcome.dead) + outcome.dropped == len(accepted)
