"""insert_events: COPY -> staging -> INSERT ... ON CONFLICT, against the real PostgreSQL."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest
import redis

from analytics_sdk import Settings
from analytics_sdk._event import Event, new_event_id, validate
from bridge._errors import CONNECTION_ERRORS, ConnectionLostError, is_transient_conflict
from bridge.store import InsertResult, insert_events, is_connection_error, is_data_error


@pytest.fixture
async def conn(db_settings: Settings) -> AsyncIterator[asyncpg.Connection[Any]]:
    connection = await asyncpg.connect(db_settings.database_url)
    yield connection
    await connection.close()


def _event(**fields: Any) -> Event:
    fields.setdefault("event_type", "page_view")
    return validate(fields)


def _raw(**fields: Any) -> Event:
    """An Event that skipped validation, as a buggy or hostile producer could make one."""
    base = _event()._asdict()
    base.update(fields)
    return Event(**base)


async def _count(conn: asyncpg.Connection[Any]) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM analytics_events"))


async def test_every_field_arrives_with_its_type(conn: asyncpg.Connection[Any]) -> None:
    created = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=timezone(timedelta(hours=2)))
    event = _event(
        event_type="purchase",
        user_id="u1",
        session_id="s1",
        entity_type="order",
        entity_id="o-9",
        event_metadata='{"total": 12.5, "items": [1, 2], "nested": {"ok": true}, "text": "caf\\u00e9"}',
        ip_address="2001:db8::1",
        user_agent="Mozilla/5.0",
        referrer="https://example.com/?q=1",
        created_at=created,
    )
    before = await conn.fetchval("SELECT now()")
    assert await insert_events(conn, [event]) == InsertResult(1, 0)
    row = await conn.fetchrow(
        "SELECT *, pg_typeof(event_metadata)::text AS mt, pg_typeof(ip_address)::text AS it "
        "FROM analytics_events"
    )
    assert str(row["event_id"]) == event.event_id
    assert (row["event_type"], row["user_id"], row["session_id"]) == ("purchase", "u1", "s1")
    assert (row["entity_type"], row["entity_id"]) == ("order", "o-9")
    assert (row["user_agent"], row["referrer"]) == ("Mozilla/5.0", "https://example.com/?q=1")
    assert row["mt"] == "jsonb" and row["it"] == "inet"
    assert json.loads(row["event_metadata"]) == {
        "total": 12.5,
        "items": [1, 2],
        "nested": {"ok": True},
        "text": "café",
    }
    assert row["ip_address"] == ipaddress.ip_address("2001:db8::1")
    assert row["created_at"] == created and row["created_at"].tzinfo is not None
    assert row["received_at"] >= before  # set by the server's default, not by the client
    # jsonb, not a JSON string: operators work on it
    assert await conn.fetchval("SELECT event_metadata->'nested'->>'ok' FROM analytics_events") == "true"


async def test_duplicates_are_skipped_and_counted(conn: asyncpg.Connection[Any]) -> None:
    first = [_event(user_id=str(i)) for i in range(50)]
    assert await insert_events(conn, first) == InsertResult(50, 0)
    again = [*first[:10], _event(), _event()]
    assert await insert_events(conn, again) == InsertResult(2, 10)
    # the same event twice in one call: one row
    twin = _event()
    assert await insert_events(conn, [twin, twin]) == InsertResult(1, 1)
    assert await _count(conn) == 53


async def test_empty_input_does_nothing(conn: asyncpg.Connection[Any]) -> None:
    assert await insert_events(conn, []) == InsertResult(0, 0)


async def test_large_batch_in_one_call(conn: asyncpg.Connection[Any]) -> None:
    events = [_event(user_id=str(i), event_metadata={"i": i}) for i in range(5000)]
    assert await insert_events(conn, events) == InsertResult(5000, 0)
    assert await _count(conn) == 5000


@pytest.mark.parametrize(
    ("bad", "sqlstate"),
    [
        ({"user_id": "nul\x00here"}, "22021"),  # text cannot hold NUL
        ({"event_metadata": {"k": "a\x00b"}}, "22P05"),  # jsonb rejects \u0000
        ({"ip_address": "127.1"}, "22P02"),  # inet rejects what inet_aton accepts
        ({"ip_address": "fe80::1%eth0"}, "22P02"),
    ],
)
async def test_data_errors_roll_back_and_are_classified(
    conn: asyncpg.Connection[Any], bad: dict[str, Any], sqlstate: str
) -> None:
    good = [_event() for _ in range(3)]
    with pytest.raises(asyncpg.PostgresError) as info:
        await insert_events(conn, [*good, _raw(**bad)])
    assert info.value.sqlstate == sqlstate
    assert is_data_error(info.value)
    assert not is_connection_error(info.value)
    assert await _count(conn) == 0  # all or nothing: the drain bisects
    # the connection is still usable afterwards, staging table included
    assert await insert_events(conn, good) == InsertResult(3, 0)


async def test_joins_the_callers_transaction(conn: asyncpg.Connection[Any]) -> None:
    events = [_event() for _ in range(4)]
    async with conn.transaction():
        assert await insert_events(conn, events[:2]) == InsertResult(2, 0)
        # a second call in the same transaction must not re-insert the first call's staged rows
        assert await insert_events(conn, events[1:]) == InsertResult(2, 1)
        assert await _count(conn) == 4
    assert await _count(conn) == 4

    class Abort(Exception):
        pass

    with pytest.raises(Abort):
        async with conn.transaction():
            await insert_events(conn, [_event()])
            raise Abort
    assert await _count(conn) == 4  # the caller's rollback undoes it


async def test_before_commit_runs_inside_the_transaction(conn: asyncpg.Connection[Any]) -> None:
    seen: list[bool] = []

    def hook() -> None:
        seen.append(conn.is_in_transaction())
        raise RuntimeError("abort before commit")

    with pytest.raises(RuntimeError):
        await insert_events(conn, [_event()], before_commit=hook)
    assert seen == [True]
    assert await _count(conn) == 0


async def test_staging_table_survives_a_discard_all(conn: asyncpg.Connection[Any]) -> None:
    assert await insert_events(conn, [_event()]) == InsertResult(1, 0)
    await conn.execute("DISCARD ALL")  # what a pool's reset does: drops temporary tables
    assert await insert_events(conn, [_event()]) == InsertResult(1, 0)


async def test_concurrent_connections_inserting_overlapping_events(db_settings: Settings) -> None:
    events = [_event(user_id=str(i)) for i in range(2000)]

    async def one(chunk: list[Event]) -> InsertResult:
        connection = await asyncpg.connect(db_settings.database_url)
        try:
            for attempt in range(5):
                try:
                    return await insert_events(connection, chunk)
                except asyncpg.PostgresError as exc:
                    if not is_transient_conflict(exc) or attempt == 4:
                        raise
            raise AssertionError
        finally:
            await connection.close()

    results = await asyncio.gather(one(events), one(events[::-1]), one(events[500:1500]))
    assert sum(r.inserted for r in results) == 2000
    assert sum(r.inserted + r.duplicates for r in results) == 5000


def test_connection_errors_are_classified() -> None:
    assert is_connection_error(ConnectionRefusedError(111, "refused"))
    assert is_connection_error(TimeoutError())
    assert is_connection_error(redis.ConnectionError("down"))
    assert is_connection_error(redis.TimeoutError("slow"))
    assert is_connection_error(asyncpg.ConnectionDoesNotExistError("closed mid-operation"))
    assert is_connection_error(asyncpg.ConnectionFailureError("08006"))
    assert is_connection_error(asyncpg.AdminShutdownError("terminating connection"))
    assert is_connection_error(asyncpg.CannotConnectNowError("starting up"))
    assert is_connection_error(asyncpg.InterfaceError("connection is closed"))
    assert is_connection_error(ConnectionLostError("x"))
    assert isinstance(ConnectionLostError("x"), CONNECTION_ERRORS)
    for not_connection in (
        asyncpg.UniqueViolationError("dup"),
        asyncpg.InvalidTextRepresentationError("bad inet"),
        asyncpg.UndefinedTableError("no table"),
        asyncpg.InterfaceError("cannot perform operation: another operation is in progress"),
        ValueError("x"),
    ):
        assert not is_connection_error(not_connection), not_connection


def test_data_errors_are_classified() -> None:
    assert is_data_error(asyncpg.UniqueViolationError("23505"))
    assert is_data_error(asyncpg.CheckViolationError("23514"))
    assert is_data_error(asyncpg.CharacterNotInRepertoireError("22021"))
    assert is_data_error(asyncpg.InvalidTextRepresentationError("22P02"))
    assert is_data_error(asyncpg.exceptions._base.DataError("invalid input for query argument"))
    for not_data in (
        asyncpg.ConnectionDoesNotExistError("gone"),
        asyncpg.UndefinedTableError("42P01"),
        asyncpg.DeadlockDetectedError("40P01"),
        OSError(),
        redis.ConnectionError(),
    ):
        assert not is_data_error(not_data), not_data
    assert is_transient_conflict(asyncpg.DeadlockDetectedError("40P01"))
    assert is_transient_conflict(asyncpg.SerializationError("40001"))


async def test_naive_and_aware_times_land_as_the_same_utc_instant(conn: asyncpg.Connection[Any]) -> None:
    """A naive created_at is taken as UTC (as the old service's utcnow()); an aware one keeps its
    instant: both are stored as that instant, read back from the table, not from the helper."""
    naive = _event(created_at=datetime(2024, 1, 1, 12, 0))
    aware = _event(created_at=datetime(2024, 1, 1, 14, 0, tzinfo=timezone(timedelta(hours=2))))
    assert await insert_events(conn, [naive, aware]) == InsertResult(2, 0)
    stored = await conn.fetch(
        "SELECT event_id::text AS id, created_at FROM analytics_events WHERE event_id = ANY($1::uuid[])",
        [naive.event_id, aware.event_id],
    )
    assert len(stored) == 2 and len(new_event_id()) == 36
    assert {r["created_at"] for r in stored} == {datetime(2024, 1, 1, 12, 0, tzinfo=UTC)}
