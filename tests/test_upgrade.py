"""Upgrading the previous release's heap with rows to the partitioned table, and the drain around it:
every row kept, ids continue, drains keep working, a redelivered event stays one row, and a drain
refuses (holds, never dead-letters) a schema older than its code until `migrate` ran."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
import redis.asyncio as aioredis

from analytics_sdk import Settings
from analytics_sdk._event import validate
from analytics_sdk._queue import QueueKeys
from bridge._errors import NotMigrated
from bridge.drain import MAX_RECLAIMS, drain
from bridge.migrations import HEAD
from bridge.schema import migrate
from tests.legacy import fetch, make_legacy, scratch_database, upgrade_to

_ROWS = (
    "SELECT id, event_id, event_type, user_id, created_at, event_metadata FROM analytics_events ORDER BY 1"
)


def _payload(**fields: object) -> bytes:
    fields.setdefault("event_type", "after_upgrade")
    return validate(fields).encode()


async def _dead(redis_client: aioredis.Redis, keys: QueueKeys) -> list[dict[str, object]]:
    return [json.loads(x) for x in await redis_client.lrange(keys.dead, 0, -1)]


async def test_upgrading_a_previous_release_database_keeps_every_row_and_drains_keep_working(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    async with scratch_database("analytics_upgrade") as url:
        await make_legacy(url, 10_000)
        before = await fetch(url, _ROWS)
        newest = max(r["created_at"] for r in before)
        # an event the old release already stored, redelivered after the upgrade (same created_at)
        stored = before[-1]
        redelivered = _payload(
            event_id=str(stored["event_id"]),
            event_type=stored["event_type"],
            created_at=stored["created_at"].isoformat(),
        )

        made = await migrate(url)

        after = await fetch(url, _ROWS)
        assert [tuple(r) for r in after] == [tuple(r) for r in before]  # every row, every value
        (legacy,) = await fetch(
            url,
            "SELECT pg_get_expr(relpartbound, oid) AS bound FROM pg_class WHERE relname = $1",
            "analytics_events_legacy",
        )
        assert legacy["bound"].startswith("FOR VALUES FROM (MINVALUE) TO (")
        # the cut-over leaves room for every stored row and for a week of an old drain's writes
        cut = datetime.fromisoformat(legacy["bound"].split("TO ('")[1].rstrip("')"))
        assert newest < cut and datetime.now(UTC) + timedelta(days=7) < cut
        assert all(name.startswith("analytics_events_p") for name in made)

        target = settings.replace(database_url=url)
        keys = QueueKeys(settings.analytics_key_prefix)
        fresh = [_payload(user_id=str(i)) for i in range(50)]
        await redis_client.rpush(keys.queue, *fresh, redelivered)
        summary = await drain(target)
        assert (summary.inserted, summary.duplicates, summary.dead_lettered) == (50, 1, 0), summary
        assert await _dead(redis_client, keys) == []
        (row,) = await fetch(
            url,
            "SELECT count(*) AS n, count(DISTINCT event_id) AS d, min(id) FILTER "
            "(WHERE event_type = 'after_upgrade') AS first_new FROM analytics_events",
        )
        assert (row["n"], row["d"]) == (10_050, 10_050)  # the redelivered event is still one row
        assert row["first_new"] > max(r["id"] for r in before)  # ids continue: none reused


async def test_the_drain_holds_events_on_an_old_schema_and_lands_them_after_migrate(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    """A worker deployed before `migrate` ran: its drains refuse the revision-1 table (not one dead
    letter, not one take-over counted towards the poison limit), one ERROR names migrate, and the first
    drain after `migrate` lands everything, with no restart."""
    async with scratch_database("analytics_held_old") as url:
        await upgrade_to(url, "0001")
        target = settings.replace(database_url=url)
        keys = QueueKeys(settings.analytics_key_prefix)
        await redis_client.rpush(keys.queue, *[_payload(user_id=str(i)) for i in range(40)])
        for _ in range(MAX_RECLAIMS + 2):  # more often than the poison limit allows
            with pytest.raises(NotMigrated, match=r"revision 0001.*needs revision 0002.*bridge migrate"):
                await drain(target)
        assert await _dead(redis_client, keys) == []
        assert await redis_client.hlen(keys.reclaims) == 0
        assert (await fetch(url, "SELECT count(*) AS n FROM analytics_events"))[0]["n"] == 0
        await migrate(url)
        summary = await drain(target)
        assert (summary.inserted, summary.dead_lettered) == (40, 0), summary
        assert await redis_client.zcard(keys.leases) == 0


async def test_an_old_release_drain_after_the_swap_holds_its_events(settings: Settings) -> None:
    """The previous release's INSERT ... ON CONFLICT (event_id) against the partitioned table fails with
    42P10, a class-42 error the old code holds as the environment's: the swap costs it no dead letter."""
    async with scratch_database("analytics_old_drain") as url:
        await make_legacy(url, 10)
        await migrate(url)
        conn = await asyncpg.connect(url)
        try:
            with pytest.raises(asyncpg.InvalidColumnReferenceError) as info:
                await conn.execute(
                    "INSERT INTO analytics_events (event_id, event_type, created_at) "
                    "VALUES ($1, 'old', now()) ON CONFLICT (event_id) DO NOTHING",
                    uuid.uuid4(),
                )
            assert info.value.sqlstate == "42P10"
        finally:
            await conn.close()


async def test_a_version_table_row_unknown_to_this_code_is_taken_as_newer(settings: Settings) -> None:
    from bridge.schema import revision_problem

    async with scratch_database("analytics_newer") as url:
        await migrate(url)
        conn = await asyncpg.connect(url)
        try:
            assert await revision_problem(conn) is None
            await conn.execute("UPDATE analytics_alembic_version SET version_num = '0099'")
            assert await revision_problem(conn) is None  # a newer release migrated: not behind
            await conn.execute(f"UPDATE analytics_alembic_version SET version_num = '{HEAD}'")
        finally:
            await conn.close()


async def test_flush_exits_2_on_an_old_schema_naming_migrate_and_claims_nothing(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    from click.testing import CliRunner

    from bridge.cli import main

    async with scratch_database("analytics_flush_old") as url:
        await upgrade_to(url, "0001")
        keys = QueueKeys(settings.analytics_key_prefix)
        await redis_client.rpush(keys.queue, _payload(user_id="waits"))
        env = {
            "ANALYTICS_REDIS_URL": settings.redis_dsn,
            "ANALYTICS_KEY_PREFIX": settings.analytics_key_prefix,
            "ANALYTICS_DATABASE_URL": url,
            "ANALYTICS_BACKLOG_TRIGGER": "0",
        }
        result = await asyncio.to_thread(CliRunner().invoke, main, ["flush"], env=env, catch_exceptions=False)
        assert result.exit_code == 2, result.output
        assert "revision 0001" in result.output and "analytics-bridge migrate" in result.output
        assert await redis_client.llen(keys.queue) == 1  # not even claimed
