"""The drain against the real Redis and PostgreSQL: fields, idempotency, reclaim, poison, outages."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest
import redis.asyncio as aioredis

from analytics_sdk import AnalyticsClient, Settings
from analytics_sdk._event import validate
from analytics_sdk._queue import QueueKeys, claim, expired_leases, take_over
from bridge._errors import is_connection_error
from bridge.drain import MAX_RECLAIMS, DrainSummary, drain
from bridge.store import insert_events
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parent.parent


async def _fetch(settings: Settings, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(settings.database_url)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def _row_count(settings: Settings) -> int:
    rows = await _fetch(settings, "SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM analytics_events")
    assert rows[0]["n"] == rows[0]["d"], "duplicate event_id rows"
    return int(rows[0]["n"])


async def _dead(redis_client: aioredis.Redis, keys: QueueKeys) -> list[dict[str, Any]]:
    return [json.loads(x) for x in await redis_client.lrange(keys.dead, 0, -1)]


async def _in_flight(redis_client: aioredis.Redis, keys: QueueKeys) -> int:
    return int(await redis_client.zcard(keys.leases))


def _event_bytes(**fields: Any) -> bytes:
    fields.setdefault("event_type", "page_view")
    return validate(fields).encode()


def _raw_event(**fields: Any) -> bytes:
    """Wire bytes that skip client-side validation (an old client, another language)."""
    doc = {"v": 1, "event_id": str(uuid.uuid4()), "event_type": "page_view", **fields}
    return msgspec.json.encode(doc)


async def test_tracked_events_arrive_with_every_field_intact(
    db_settings: Settings, client: AnalyticsClient, redis_client: aioredis.Redis
) -> None:
    ids = []
    for i in range(120):
        ids.append(
            await client.track(
                "purchase" if i % 2 else "page_view",
                user_id=i,  # an int id, kept as text
                session_id=f"s{i % 7}",
                entity_type="article",
                entity_id=str(i),
                event_metadata=f'{{"scroll": 0.8, "tags": ["a", "b"], "i": {i}}}',  # a JSON string
                ip_address="203.0.113.9" if i % 3 else "2001:db8::7",
                user_agent="UA/1.0",
                referrer="https://example.org/",
                created_at="2024-02-03T04:05:06.789+01:00",
            )
        )
    summary = await drain(db_settings)
    assert (summary.claimed, summary.inserted, summary.duplicates, summary.dead_lettered) == (120, 120, 0, 0)
    assert summary.backlog == 0 and not summary.budget_spent
    rows = await _fetch(
        db_settings,
        "SELECT event_id::text AS id, user_id, session_id, event_type, entity_type, entity_id, "
        "event_metadata, pg_typeof(event_metadata)::text AS mt, host(ip_address) AS ip, "
        "pg_typeof(ip_address)::text AS it, user_agent, referrer, created_at, received_at "
        "FROM analytics_events",
    )
    by_id = {r["id"]: r for r in rows}
    assert set(by_id) == set(ids)
    for i, event_id in enumerate(ids):
        row = by_id[event_id]
        assert row["user_id"] == str(i) and row["session_id"] == f"s{i % 7}"
        assert row["event_type"] == ("purchase" if i % 2 else "page_view")
        assert (row["entity_type"], row["entity_id"]) == ("article", str(i))
        assert row["mt"] == "jsonb" and json.loads(row["event_metadata"]) == {
            "scroll": 0.8,
            "tags": ["a", "b"],
            "i": i,
        }
        assert row["it"] == "inet" and row["ip"] == ("203.0.113.9" if i % 3 else "2001:db8::7")
        assert (row["user_agent"], row["referrer"]) == ("UA/1.0", "https://example.org/")
        assert row["created_at"].isoformat() == "2024-02-03T03:05:06.789000+00:00"
        assert row["received_at"] > row["created_at"]
    keys = QueueKeys(db_settings.analytics_key_prefix)
    assert await _in_flight(redis_client, keys) == 0  # I4: nothing left in flight


async def test_stats_hash_and_summary(
    db_settings: Settings, client: AnalyticsClient, redis_client: aioredis.Redis
) -> None:
    await client.track_many([{"event_type": "x"} for _ in range(30)])
    await redis_client.rpush(QueueKeys(db_settings.analytics_key_prefix).queue, b"\x80not json")
    seen: list[DrainSummary] = []
    summary = await drain(db_settings.replace(analytics_batch_size=10), progress=seen.append)
    assert seen and seen[-1].claimed == 31
    stats = await redis_client.hgetall(QueueKeys(db_settings.analytics_key_prefix).stats)
    assert int(stats[b"claimed"]) == 31 and int(stats[b"inserted"]) == 30 and int(stats[b"dead"]) == 1
    assert float(stats[b"last_flush_at"]) > 0
    assert json.loads(stats[b"last_summary"]) == summary.as_dict()
    assert set(summary.as_dict()) >= {
        "claimed",
        "inserted",
        "duplicates",
        "dead_lettered",
        "reclaimed",
        "seconds",
    }


async def test_claims_grouped_into_transactions(db_settings: Settings, client: AnalyticsClient) -> None:
    await client.track_many([{"event_type": "x", "user_id": str(i)} for i in range(95)])
    summary = await drain(db_settings.replace(analytics_batch_size=10, analytics_insert_batch_size=35))
    assert summary.inserted == 95
    assert summary.batches == 10  # ten claims of at most 10, released after their transactions


async def test_empty_queue_does_not_touch_postgresql(settings: Settings) -> None:
    unreachable = settings.replace(database_url="postgresql://postgres@127.0.0.1:1/none")
    summary = await drain(unreachable)
    assert summary == DrainSummary(seconds=summary.seconds)


async def test_same_event_pushed_twice_is_one_row(
    db_settings: Settings, client: AnalyticsClient, redis_client: aioredis.Redis
) -> None:
    payload = _event_bytes(user_id="dup")
    keys = QueueKeys(db_settings.analytics_key_prefix)
    await redis_client.rpush(keys.queue, payload, payload)
    summary = await drain(db_settings)
    assert (summary.inserted, summary.duplicates) == (1, 1)
    await redis_client.rpush(keys.queue, payload)  # and once more, in a later drain
    summary = await drain(db_settings)
    assert (summary.inserted, summary.duplicates) == (0, 1)
    assert await _row_count(db_settings) == 1


async def test_batch_processed_again_after_a_lost_ack_adds_no_row(
    db_settings: Settings, client: AnalyticsClient, redis_client: aioredis.Redis
) -> None:
    keys = QueueKeys(db_settings.analytics_key_prefix)
    await client.track_many([{"event_type": "x", "user_id": str(i)} for i in range(40)])
    # A drain that committed its rows and died before the ack:
    lost = await claim(redis_client, keys, 40, "lost-ack")
    from analytics_sdk._event import decode

    conn = await asyncpg.connect(db_settings.database_url)
    try:
        await insert_events(conn, [decode(raw) for raw in lost.items])
    finally:
        await conn.close()
    fast = db_settings.replace(analytics_visibility_timeout=0.2)
    await wait_for(lambda: expired_leases(redis_client, keys, 0.2), timeout=5)
    summary = await drain(fast)
    assert (summary.reclaimed, summary.inserted, summary.duplicates) == (40, 0, 40)
    assert await _row_count(db_settings) == 40
    assert await _in_flight(redis_client, keys) == 0
    assert not await redis_client.exists(keys.inflight("lost-ack"))


async def test_abandoned_claim_is_reclaimed_after_the_visibility_timeout(
    db_settings: Settings, client: AnalyticsClient, redis_client: aioredis.Redis
) -> None:
    keys = QueueKeys(db_settings.analytics_key_prefix)
    ids = await client.track_many([{"event_type": "x", "user_id": str(i)} for i in range(25)])
    await claim(redis_client, keys, 10, "abandoned")  # claimed, then the drain died
    slow = db_settings.replace(analytics_visibility_timeout=60)
    summary = await drain(slow)  # lease not expired yet: left alone
    assert (summary.reclaimed, summary.inserted) == (0, 15)
    assert await _in_flight(redis_client, keys) == 1
    fast = db_settings.replace(analytics_visibility_timeout=0.3)
    await wait_for(lambda: expired_leases(redis_client, keys, 0.3), timeout=5)
    summary = await drain(fast)
    assert (summary.reclaimed, summary.inserted, summary.duplicates) == (10, 10, 0)
    rows = await _fetch(db_settings, "SELECT event_id::text AS id FROM analytics_events")
    assert sorted(r["id"] for r in rows) == sorted(ids)  # every event exactly once
    assert await _in_flight(redis_client, keys) == 0
    assert await redis_client.hlen(keys.reclaims) == 0


async def test_two_drains_at_once_insert_each_event_once(
    db_settings: Settings, client: AnalyticsClient
) -> None:
    await client.track_many([{"event_type": "x", "user_id": str(i)} for i in range(3000)])
    small = db_settings.replace(analytics_batch_size=50, analytics_insert_batch_size=200)
    first, second = await asyncio.gather(drain(small), drain(small))
    assert first.inserted + second.inserted == 3000
    assert first.duplicates + second.duplicates == 0
    assert await _row_count(db_settings) == 3000


def _pickle_bomb(marker: Path) -> bytes:
    class Bomb:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {marker}",))

    return pickle.dumps(Bomb())


async def test_poison_items_are_dead_lettered_and_good_neighbours_inserted(
    db_settings: Settings, client: AnalyticsClient, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    keys = QueueKeys(db_settings.analytics_key_prefix)
    marker = tmp_path / "unpickled"
    poison = {
        "nul-in-text": (_raw_event(user_id="a\x00b"), "user_id"),
        "nul-in-metadata": (_raw_event(event_metadata={"k": "x\x00y"}), "event_metadata"),
        "bad-ip": (_raw_event(ip_address="127.1"), "ip_address"),
        "not-json": (b"\xff\xfe definitely { not json", "payload"),
        "pickle": (_pickle_bomb(marker), "payload"),
        "oversize-metadata": (_raw_event(event_metadata={"blob": "x" * 40_000}), "event_metadata"),
        "missing-event-type": (msgspec.json.encode({"v": 1, "event_id": str(uuid.uuid4())}), "event_type"),
    }
    good = [_event_bytes(user_id=f"good-{i}") for i in range(70)]
    items: list[bytes] = []
    for i, (payload, _) in enumerate(poison.values()):
        items.extend(good[i * 10 : (i + 1) * 10])
        items.append(payload)
    await redis_client.rpush(keys.queue, *items)

    summary = await drain(db_settings.replace(analytics_batch_size=8))
    assert (summary.claimed, summary.inserted, summary.dead_lettered) == (77, 70, 7)
    assert await _row_count(db_settings) == 70
    assert not marker.exists(), "a payload was unpickled"
    dead = await _dead(redis_client, keys)
    assert len(dead) == 7
    by_payload = {d["payload"]: d for d in dead}
    for name, (payload, field) in poison.items():
        entry = by_payload[payload.decode("utf-8", errors="backslashreplace")]
        assert entry["field"].startswith(field), name
        assert entry["stage"] == "decode" and entry["error"] and entry["failed_at"] > 0, name
    assert await _in_flight(redis_client, keys) == 0


async def test_rows_the_database_rejects_are_bisected_out(
    db_settings: Settings, client: AnalyticsClient, redis_client: aioredis.Redis
) -> None:
    """A data error raised by PostgreSQL itself (here a CHECK constraint, SQLSTATE 23514): the bad
    rows are isolated by bisection and dead-lettered with SQLSTATE and message; the rest commit."""
    keys = QueueKeys(db_settings.analytics_key_prefix)
    conn = await asyncpg.connect(db_settings.database_url)
    await conn.execute(
        "ALTER TABLE analytics_events ADD CONSTRAINT test_reject CHECK (event_type <> 'reject-me')"
    )
    try:
        events = [{"event_type": "ok", "user_id": str(i)} for i in range(500)]
        for position in (0, 137, 499):
            events[position] = {"event_type": "reject-me", "user_id": str(position)}
        await client.track_many(events)
        summary = await drain(db_settings.replace(analytics_batch_size=100, analytics_insert_batch_size=500))
    finally:
        await conn.execute("ALTER TABLE analytics_events DROP CONSTRAINT test_reject")
        await conn.close()
    assert (summary.inserted, summary.dead_lettered) == (497, 3)
    dead = await _dead(redis_client, keys)
    assert sorted(json.loads(d["payload"])["user_id"] for d in dead) == ["0", "137", "499"]
    assert all(
        d["sqlstate"] == "23514" and d["stage"] == "insert" and "test_reject" in d["error"] for d in dead
    )
    assert await _in_flight(redis_client, keys) == 0


async def test_postgresql_unreachable_leaves_events_queued_then_a_later_drain_inserts(
    db_settings: Settings, client: AnalyticsClient, redis_client: aioredis.Redis
) -> None:
    keys = QueueKeys(db_settings.analytics_key_prefix)
    await client.track_many([{"event_type": "x"} for _ in range(50)])
    down = db_settings.replace(database_url="postgresql://postgres@127.0.0.1:1/analytics")
    with pytest.raises(OSError) as info:
        await drain(down)
    assert is_connection_error(info.value)
    assert await redis_client.llen(keys.queue) == 50  # nothing claimed, nothing lost
    assert await _dead(redis_client, keys) == []
    summary = await drain(db_settings)
    assert summary.inserted == 50


def _terminate_drain_backend(database_url: str, database: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            # Patient: on a loaded machine the drain may take seconds to connect. Its session is
            # killed whenever it appears: before the claim or during the fail point's pause after it,
            # the insert then fails on a dead connection either way.
            for _ in range(1500):
                done = await conn.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = $1 AND application_name = 'analytics-drain'",
                    database,
                )
                if done:
                    return
                await asyncio.sleep(0.02)
        finally:
            await conn.close()

    asyncio.run(run())


async def test_connection_lost_mid_drain_leaves_the_batch_in_flight(
    db_settings: Settings,
    client: AnalyticsClient,
    redis_client: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The PostgreSQL session dies between claim and insert: the batch stays in flight, nothing is
    dead-lettered, the failure does not count towards the poison limit, and a later drain inserts it."""
    keys = QueueKeys(db_settings.analytics_key_prefix)
    await client.track_many([{"event_type": "x", "user_id": str(i)} for i in range(30)])
    database = db_settings.database_url.rsplit("/", 1)[1]
    # after_claim blocks the drain's thread for 3 s; meanwhile another thread kills its session.
    monkeypatch.setenv("ANALYTICS_FAILPOINTS", "after_claim=sleep:3")
    killer = threading.Thread(target=_terminate_drain_backend, args=(db_settings.database_url, database))
    killer.start()
    try:
        with pytest.raises(Exception) as info:
            await drain(db_settings)
    finally:
        killer.join(40)
    assert not killer.is_alive()
    monkeypatch.delenv("ANALYTICS_FAILPOINTS")
    import traceback

    assert is_connection_error(info.value), "".join(traceback.format_exception(info.value))
    assert await _in_flight(redis_client, keys) == 1
    assert await redis_client.llen(keys.queue) == 0
    assert await _dead(redis_client, keys) == []
    assert await _row_count(db_settings) == 0
    # Released for the next drain at once: no wait for the visibility timeout.
    assert [score for _, score in await redis_client.zrange(keys.leases, 0, -1, withscores=True)] == [0]
    summary = await drain(db_settings)
    assert (summary.reclaimed, summary.inserted) == (30, 30)
    assert await _in_flight(redis_client, keys) == 0
    assert await redis_client.hlen(keys.reclaims) == 0


async def test_missing_table_keeps_the_batch_in_flight_until_migrated(
    settings: Settings, client: AnalyticsClient, redis_client: aioredis.Redis
) -> None:
    """An unmigrated database is the operator's to fix, not the events' fault: nothing is
    dead-lettered, the outage never counts towards the poison limit, and once ``migrate`` ran the
    next drain lands every event."""
    from bridge.schema import migrate
    from tests.conftest import PG_ADMIN_URL

    name = f"analytics_unmigrated_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(PG_ADMIN_URL)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        target = settings.replace(database_url=f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}")
        keys = QueueKeys(settings.analytics_key_prefix)
        await client.track_many([{"event_type": "x", "user_id": str(i)} for i in range(20)])
        for _ in range(MAX_RECLAIMS + 2):  # more often than the poison limit allows
            with pytest.raises(asyncpg.UndefinedTableError):
                await drain(target)
        assert await _dead(redis_client, keys) == []
        assert await redis_client.hlen(keys.reclaims) == 0
        assert await _in_flight(redis_client, keys) == 1
        await migrate(target.database_url)
        summary = await drain(target)
        assert (summary.reclaimed, summary.inserted, summary.dead_lettered) == (20, 20, 0)
        assert await _in_flight(redis_client, keys) == 0
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_time_budget_stops_the_drain_and_reports_the_backlog(
    db_settings: Settings, client: AnalyticsClient
) -> None:
    await client.track_many([{"event_type": "x"} for _ in range(250)])
    small = db_settings.replace(analytics_batch_size=50, analytics_insert_batch_size=100)
    summary = await drain(small, time_budget=0)
    assert summary.budget_spent and summary.inserted == 100 and summary.backlog == 150
    summary = await drain(small)
    assert not summary.budget_spent and summary.inserted == 150 and summary.backlog == 0


async def test_lease_over_the_reclaim_limit_is_split_event_by_event(
    db_settings: Settings, client: AnalyticsClient, redis_client: aioredis.Redis
) -> None:
    """Without killing anything: a lease already taken over MAX_RECLAIMS times is split, its events
    tried one lease each; all good ones land and nothing is dead-lettered."""
    keys = QueueKeys(db_settings.analytics_key_prefix)
    await client.track_many([{"event_type": "x", "user_id": str(i)} for i in range(12)])
    await claim(redis_client, keys, 12, "poisoned")
    for _ in range(MAX_RECLAIMS):
        [(batch_id, score)] = await expired_leases(redis_client, keys, 0)
        assert await take_over(redis_client, keys, batch_id, score) is not None
    await wait_for(lambda: expired_leases(redis_client, keys, 0.05), timeout=5)
    summary = await drain(db_settings.replace(analytics_visibility_timeout=0.05))
    assert (summary.reclaimed, summary.inserted, summary.dead_lettered) == (12, 12, 0)
    assert summary.batches == 12
    assert await _in_flight(redis_client, keys) == 0
    assert await redis_client.hlen(keys.reclaims) == 0


_DRAIN_SCRIPT = (
    "import asyncio; from analytics_sdk import Settings; from bridge.drain import drain; "
    "asyncio.run(drain(Settings.from_env()))"
)


@pytest.mark.timeout(120)
async def test_event_that_kills_every_drain_is_isolated_and_dead_lettered(
    db_settings: Settings, client: AnalyticsClient, redis_client: aioredis.Redis
) -> None:
    """crash_on_event SIGKILLs any drain whose batch holds the poison event. Drains run as separate
    processes, one after another; after MAX_RECLAIMS take-overs the batch is split, the next crash
    incriminates the poison alone, and it is dead-lettered while its 99 neighbours land."""
    keys = QueueKeys(db_settings.analytics_key_prefix)
    ids = await client.track_many([{"event_type": "x", "user_id": str(i)} for i in range(100)])
    poison = ids[37]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "ANALYTICS_REDIS_URL": db_settings.redis_dsn,
        "ANALYTICS_KEY_PREFIX": keys.prefix,
        "ANALYTICS_DATABASE_URL": db_settings.database_url,
        "ANALYTICS_VISIBILITY_TIMEOUT": "0.3",
        "ANALYTICS_BATCH_SIZE": "20",
        "ANALYTICS_FAILPOINTS": f"crash_on_event={poison}",
    }
    codes = []
    for _ in range(12):
        done = subprocess.run(
            [sys.executable, "-c", _DRAIN_SCRIPT], env=env, cwd=ROOT, timeout=60, check=False
        )
        codes.append(done.returncode)
        if (
            done.returncode == 0
            and not await redis_client.zcard(keys.leases)
            and not await redis_client.llen(keys.queue)
        ):
            break
        await wait_for(lambda: expired_leases(redis_client, keys, 0.3), timeout=5)
    kills = codes.count(-9)
    assert codes[-1] == 0, codes
    assert kills == MAX_RECLAIMS + 2, codes  # first try, MAX_RECLAIMS take-overs, the split's try
    rows = await _fetch(db_settings, "SELECT event_id::text AS id FROM analytics_events")
    assert sorted(r["id"] for r in rows) == sorted(set(ids) - {poison})
    dead = await _dead(redis_client, keys)
    assert len(dead) == 1 and json.loads(dead[0]["payload"])["event_id"] == poison
    assert dead[0]["stage"] == "reclaim" and "poison" in dead[0]["error"]
    assert await redis_client.hlen(keys.reclaims) == 0
