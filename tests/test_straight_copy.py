"""The drain's fast path (bridge._straight): fresh events COPYed straight into the table make exactly
the rows the staging path makes, and anything PostgreSQL refuses rolls the COPY back whole so the
staging path decides as before (duplicates counted, bad rows bisected out)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest

from analytics_sdk import Settings
from analytics_sdk._event import Event, validate
from bridge._failpoints import FailPointError
from bridge._straight import copy_straight
from bridge.store import InsertResult, insert_events

_ROW = """
SELECT event_id::text, event_type, user_id, session_id, entity_type, entity_id, event_metadata::text,
       host(ip_address) AS ip, family(ip_address) AS family, masklen(ip_address) AS bits, user_agent,
       referrer, created_at
FROM analytics_events ORDER BY entity_id
"""


@pytest.fixture
async def conn(db_settings: Settings) -> AsyncIterator[asyncpg.Connection[Any]]:
    connection = await asyncpg.connect(db_settings.database_url)
    yield connection
    await connection.close()


def _events(tag: str) -> list[Event]:
    created = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=timezone(timedelta(hours=2)))
    addresses = ["203.0.113.9", "2001:db8::1", "::ffff:192.0.2.1", None, "0.0.0.0", "::"]
    return [
        validate(
            {
                "event_type": "page_view",
                "user_id": f"u{i}",
                "session_id": None if i % 2 else "s",
                "entity_type": "article",
                "entity_id": f"{tag}-{i}",
                "event_metadata": {"n": i, "text": "café \u2603", "nested": {"ok": True, "list": [1, 2.5]}},
                "ip_address": address,
                "user_agent": "Mozilla/5.0",
                "referrer": None if i % 3 else "https://example.com/?q=1",
                "created_at": created + timedelta(seconds=i),
            }
        )
        for i, address in enumerate(addresses)
    ]


def _comparable(rows: list[asyncpg.Record]) -> list[tuple[Any, ...]]:
    # event_id and entity_id differ between the two batches by construction; everything else must not
    return [tuple(v for k, v in row.items() if k not in ("event_id", "entity_id")) for row in rows]


async def test_straight_copy_makes_the_rows_the_staging_path_makes(conn: asyncpg.Connection[Any]) -> None:
    assert await insert_events(conn, _events("staged")) == InsertResult(6, 0)
    staged = await conn.fetch(_ROW)
    await conn.execute("TRUNCATE analytics_events")
    assert await copy_straight(conn, _events("straight")) == InsertResult(6, 0)
    straight = await conn.fetch(_ROW)
    assert _comparable(straight) == _comparable(staged)
    assert [r["ip"] for r in straight] == [
        "203.0.113.9",
        "2001:db8::1",
        "::ffff:192.0.2.1",
        None,
        "0.0.0.0",
        "::",
    ]
    assert [r["family"] for r in straight][:3] == [4, 6, 6]  # the mapped address stays IPv6, as inet keeps it
    assert all(r["created_at"].tzinfo is not None for r in straight)
    assert straight[0]["created_at"] == datetime(2024, 5, 6, 5, 8, 9, 123456, tzinfo=UTC)


async def test_an_event_already_stored_rolls_the_copy_back_whole(conn: asyncpg.Connection[Any]) -> None:
    events = _events("dup")
    assert await copy_straight(conn, events[:1]) == InsertResult(1, 0)
    assert await copy_straight(conn, events) is None  # the first is in the table: nothing written
    assert await conn.fetchval("SELECT count(*) FROM analytics_events") == 1
    assert not conn.is_in_transaction()
    assert await insert_events(conn, events) == InsertResult(5, 1)  # the staging path decides


async def test_a_row_postgresql_refuses_rolls_the_copy_back_whole(conn: asyncpg.Connection[Any]) -> None:
    events = _events("bad")
    bad = events[2]._replace(event_metadata={"nul": "\x00"})  # jsonb refuses NUL: as if unvalidated
    assert await copy_straight(conn, [*events[:2], bad, *events[3:]]) is None
    assert await conn.fetchval("SELECT count(*) FROM analytics_events") == 0
    assert not conn.is_in_transaction()


async def test_what_before_commit_raises_propagates_and_nothing_is_written(
    conn: asyncpg.Connection[Any],
) -> None:
    def fail() -> None:
        raise FailPointError("fail point before_commit armed")

    with pytest.raises(FailPointError):
        await copy_straight(conn, _events("fp"), before_commit=fail)
    assert await conn.fetchval("SELECT count(*) FROM analytics_events") == 0
    assert not conn.is_in_transaction()


async def test_inside_a_callers_transaction_it_steps_aside(conn: asyncpg.Connection[Any]) -> None:
    async with conn.transaction():
        assert await copy_straight(conn, _events("txn")) is None
    assert await conn.fetchval("SELECT count(*) FROM analytics_events") == 0
