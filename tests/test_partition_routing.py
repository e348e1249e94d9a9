"""Rows find their partition: across a month boundary, a backfill two years back, a partition dropped
under a drain's connection, a drain not allowed to create one. Never a dead letter, never a DEFAULT."""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from analytics_sdk import Settings
from analytics_sdk._event import decode, validate
from analytics_sdk._queue import QueueKeys
from bridge._errors import advice, is_data_error, is_environment_error, is_missing_partition
from bridge.drain import drain
from bridge.partitions import bounds, partition_name
from bridge.schema import migrate
from bridge.store import InsertResult, close, connect, insert_events
from tests.conftest import _admin
from tests.legacy import fetch, scratch_database


def _payload(created_at: datetime, **fields: object) -> bytes:
    fields.setdefault("event_type", "routed")
    return validate({**fields, "created_at": created_at.isoformat()}).encode()


async def _dead(redis_client: aioredis.Redis, keys: QueueKeys) -> list[dict[str, Any]]:
    return [json.loads(x) for x in await redis_client.lrange(keys.dead, 0, -1)]


async def _where(url: str) -> dict[str, str]:
    """event_id -> the partition its row is in."""
    rows = await fetch(url, "SELECT event_id::text AS e, tableoid::regclass::text AS p FROM analytics_events")
    return {r["e"]: r["p"] for r in rows}


async def test_a_month_boundary_and_a_backfill_two_years_back_all_land(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    async with scratch_database("analytics_routing") as url:
        await migrate(url)
        now = datetime.now(UTC)
        boundary = bounds(now, "month")[0]  # this month began here; migrate made no partition before
        moments = [
            boundary - timedelta(microseconds=1),
            boundary,
            now - timedelta(days=730),  # a backfill: no partition for it yet
            now - timedelta(days=731, hours=5),
        ]
        ids = [str(uuid.uuid4()) for _ in moments]
        keys = QueueKeys(settings.analytics_key_prefix)
        await redis_client.rpush(
            keys.queue, *[_payload(m, event_id=i) for m, i in zip(moments, ids, strict=True)]
        )
        target = settings.replace(database_url=url)
        summary = await drain(target, time_budget=30)
        assert (summary.inserted, summary.dead_lettered) == (4, 0), summary
        assert await _dead(redis_client, keys) == []
        where = await _where(url)
        for moment, event_id in zip(moments, ids, strict=True):
            assert where[event_id] == partition_name(bounds(moment, "month")[0]), moment
        defaults = await fetch(
            url,
            "SELECT 1 FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT'",
        )
        assert defaults == []


async def test_the_interval_setting_shapes_the_partitions_made_on_the_spot(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    async with scratch_database("analytics_routing_day") as url:
        await migrate(url, interval="day")
        backfill = datetime.now(UTC) - timedelta(days=400)
        keys = QueueKeys(settings.analytics_key_prefix)
        event_id = str(uuid.uuid4())
        await redis_client.rpush(keys.queue, _payload(backfill, event_id=event_id))
        daily = settings.replace(database_url=url, analytics_partition_interval="day")
        assert (await drain(daily)).inserted == 1
        assert (await _where(url))[event_id] == partition_name(bounds(backfill, "day")[0])


async def test_a_partition_dropped_under_a_connection_is_made_again(settings: Settings) -> None:
    """The connection knows the partitions; retention drops one behind its back; the next insert into
    that range finds no partition, makes it again and lands (23514 is never the row's fault)."""
    async with scratch_database("analytics_routing_drop") as url:
        await migrate(url)
        target = settings.replace(database_url=url)
        old = datetime.now(UTC) - timedelta(days=500)
        conn = await connect(target)
        try:
            first = decode(_payload(old))
            assert await insert_events(conn, [first]) == InsertResult(1, 0)
            name = partition_name(bounds(old, "month")[0])
            await _drop(url, name)
            second = decode(_payload(old + timedelta(seconds=1)))
            assert await insert_events(conn, [second]) == InsertResult(1, 0)
            assert (await _where(url))[second.event_id] == name
        finally:
            await close(conn)


async def _drop(url: str, name: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f"ALTER TABLE analytics_events DETACH PARTITION {name}; DROP TABLE {name}")
    finally:
        await conn.close()


async def test_no_partition_for_a_row_is_the_environment_not_the_data() -> None:
    async with scratch_database("analytics_routing_err") as url:
        await migrate(url)
        conn = await asyncpg.connect(url)
        try:
            with pytest.raises(asyncpg.CheckViolationError) as info:
                await conn.execute(
                    "INSERT INTO analytics_events (event_id, event_type, created_at) "
                    "VALUES (gen_random_uuid(), 'x', '2090-01-01')"
                )
        finally:
            await conn.close()
    error = info.value
    assert error.sqlstate == "23514" and is_missing_partition(error)
    assert not is_data_error(error) and is_environment_error(error)
    assert "analytics-bridge migrate" in advice(error) and "GRANT CREATE" in advice(error)
    # a CHECK constraint's 23514 is still the row's
    check = asyncpg.CheckViolationError("new row violates check constraint")
    assert is_data_error(check) and not is_missing_partition(check)


async def test_a_drain_that_may_not_create_a_partition_holds_the_events(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    """A drain user without CREATE on the schema: the backfill is held in flight (no dead letter, no
    poison count) with advice, and lands once a partition exists."""
    role = f"analytics_drain_{secrets.token_hex(3)}"
    async with scratch_database("analytics_routing_grant") as url:
        await migrate(url)
        await _admin(f"CREATE ROLE {role} LOGIN")
        try:
            conn = await asyncpg.connect(url)
            try:
                await conn.execute(
                    f"REVOKE CREATE ON SCHEMA public FROM PUBLIC; "
                    f"GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA public TO {role}; "
                    f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}; "
                    f"GRANT TEMPORARY ON DATABASE {url.rsplit('/', 1)[1]} TO {role}"
                )
            finally:
                await conn.close()
            limited = settings.replace(database_url=url.replace("://postgres@", f"://{role}@"))
            keys = QueueKeys(settings.analytics_key_prefix)
            backfill = datetime.now(UTC) - timedelta(days=800)
            await redis_client.rpush(keys.queue, _payload(backfill), _payload(datetime.now(UTC)))
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await drain(limited)
            assert await _dead(redis_client, keys) == []
            assert await redis_client.hlen(keys.reclaims) == 0
            made = await _ensure(url, backfill)
            await _grant_all(url, role)
            summary = await drain(limited)
            assert (summary.inserted, summary.dead_lettered) == (2, 0), (summary, made)
        finally:
            await _admin(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
            await _admin(f"DROP ROLE IF EXISTS {role}")


async def _ensure(url: str, moment: datetime) -> list[str]:
    from bridge.partitions import ensure_partitions

    conn = await asyncpg.connect(url)
    try:
        return await ensure_partitions(conn, "month", [moment])
    finally:
        await conn.close()


async def _grant_all(url: str, role: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f"GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA public TO {role}")
    finally:
        await conn.close()


async def test_making_a_partition_waits_for_no_running_report_query(settings: Settings) -> None:
    """A report query holds the table for minutes; a backfill's partition is made meanwhile without
    waiting for it (ATTACH takes SHARE UPDATE EXCLUSIVE on the parent, not ACCESS EXCLUSIVE)."""
    async with scratch_database("analytics_routing_reader") as url:
        await migrate(url)
        reader = await asyncpg.connect(url)
        conn = await connect(settings.replace(database_url=url))
        try:
            report = reader.transaction()
            await report.start()
            await reader.fetchval("SELECT count(*) FROM analytics_events")  # ACCESS SHARE until rollback
            backfill = decode(_payload(datetime.now(UTC) - timedelta(days=900)))
            assert await asyncio.wait_for(insert_events(conn, [backfill]), 15) == InsertResult(1, 0)
            await report.rollback()
        finally:
            await close(conn)
            await reader.close()
        assert (await _where(url))[backfill.event_id].startswith("analytics_events_p")


async def test_a_partition_dropped_after_the_snapshot_is_no_range_of_ours() -> None:
    """The retention drops a partition while a drain reads the partitions: PostgreSQL's pg_get_expr
    answers NULL for a relation dropped after the reader's snapshot. That partition takes no rows any
    more; the drain must go on (it once failed with AttributeError on the NULL bound)."""
    from bridge.partitions import ensure_partitions
    from tests.partitioned import partitioned_database

    old, current = datetime(2024, 3, 10, tzinfo=UTC), datetime.now(UTC)
    with partitioned_database() as url:
        reader, dropper = await asyncpg.connect(url), await asyncpg.connect(url)
        try:
            await ensure_partitions(reader, "month", [old, current])
            snapshot = reader.transaction(isolation="repeatable_read")
            await snapshot.start()
            try:
                await reader.fetchval("SELECT 1")  # the snapshot is taken here
                doomed = partition_name(bounds(old, "month")[0])
                await dropper.execute(f'ALTER TABLE analytics_events DETACH PARTITION "{doomed}"')
                await dropper.execute(f'DROP TABLE "{doomed}"')
                # the current month is covered: nothing to make, and no error on the dropped one
                assert await ensure_partitions(reader, "month", [current]) == []
            finally:
                await snapshot.rollback()
        finally:
            await reader.close()
            await dropper.close()
