"""The upgrade while the previous release keeps working: its drain writes during the migration (up to
the newest created_at it accepts) and loses nothing; a long transaction holding the table makes the
migration wait in bounded steps and retry, never queue an exclusive lock behind it indefinitely."""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from bridge.migrations import HEAD
from bridge.schema import migrate
from tests.helpers import wait_for
from tests.legacy import fetch, make_legacy, scratch_database

# What the previous release's drain runs, one row at a time here.
_OLD_INSERT = (
    "INSERT INTO analytics_events (event_id, event_type, created_at) VALUES ($1, 'old_drain', $2) "
    "ON CONFLICT (event_id) DO NOTHING"
)


async def _old_drain(url: str, written: list[str], started: asyncio.Event) -> BaseException:
    """Insert until the swap; returns the error that stopped it (the old release holds its events)."""
    conn = await asyncpg.connect(url)
    try:
        while True:
            event_id = str(uuid.uuid4())
            # the newest created_at the drain accepts: a day ahead (and, alternately, now)
            ahead = timedelta(hours=23, minutes=59) if len(written) % 2 else timedelta(0)
            try:
                await conn.execute(_OLD_INSERT, uuid.UUID(event_id), datetime.now(UTC) + ahead)
            except asyncpg.PostgresError as exc:
                return exc
            written.append(event_id)
            started.set()
            await asyncio.sleep(0.001)
    finally:
        await conn.close()


async def test_an_old_drain_writing_during_the_upgrade_loses_nothing_and_is_refused_only_by_the_swap() -> (
    None
):
    async with scratch_database("analytics_upgrade_writes") as url:
        await make_legacy(url, 20_000)
        written: list[str] = []
        started = asyncio.Event()
        writer = asyncio.create_task(_old_drain(url, written, started))
        await asyncio.wait_for(started.wait(), 30)
        await migrate(url)
        stopped = await asyncio.wait_for(writer, 30)
        # never a CHECK violation (that the old release would dead-letter): only the swap's 42P10
        assert isinstance(stopped, asyncpg.PostgresError) and stopped.sqlstate == "42P10", stopped
        assert written
        stored = await fetch(
            url,
            "SELECT count(*) AS n FROM analytics_events WHERE event_id = ANY($1::uuid[])",
            written,
        )
        assert stored[0]["n"] == len(written)  # every row the old drain committed is kept
        (total,) = await fetch(url, "SELECT count(*) AS n FROM analytics_events")
        assert total["n"] == 20_000 + len(written)


async def test_a_long_transaction_on_the_table_makes_migrate_retry_not_block_writers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A reader's open transaction holds ACCESS SHARE: the upgrade's ACCESS EXCLUSIVE request gives up
    after its lock_timeout (instead of queueing every insert behind it), and migrate runs again once
    the reader is done."""
    caplog.set_level(logging.INFO)
    async with scratch_database("analytics_upgrade_wait") as url:
        await make_legacy(url, 1_000)
        reader = await asyncpg.connect(url)
        try:
            transaction = reader.transaction()
            await transaction.start()
            await reader.fetchval("SELECT count(*) FROM analytics_events")
            upgrade = asyncio.create_task(migrate(url))

            def retried() -> bool:
                return any("waited too long for a lock" in r.getMessage() for r in caplog.records)

            await wait_for(retried, timeout=60, message="migrate gave up its lock wait and retries")
            # meanwhile writers were never queued behind a pending exclusive request
            writer = await asyncpg.connect(url)
            try:
                await asyncio.wait_for(
                    writer.execute(_OLD_INSERT, uuid.uuid4(), datetime.now(UTC)), timeout=10
                )
            finally:
                await writer.close()
            await transaction.rollback()
            await asyncio.wait_for(upgrade, 60)
        finally:
            await reader.close()
        (row,) = await fetch(url, "SELECT version_num FROM analytics_alembic_version")
        assert row["version_num"] == HEAD
        assert (await fetch(url, "SELECT count(*) AS n FROM analytics_events"))[0]["n"] == 1_001
