"""The events table (DESIGN §4) and migrate(): types, defaults, indexes, partitioning, the revisions
shipped in the package, idempotence, database creation."""

from __future__ import annotations

import asyncio
import secrets

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.ext.asyncio import create_async_engine

from bridge.migrations import HEAD, REVISIONS, VERSION_TABLE
from bridge.migrations._run import _config
from bridge.schema import (
    EVENT_KEY,
    TABLE_NAME,
    asyncpg_dsn,
    events_table,
    metadata,
    migrate,
    sqlalchemy_url,
)
from tests.conftest import PG_ADMIN_URL, _admin
from tests.legacy import LEGACY_DDL, catalog, scratch_database, upgrade_to

EXPECTED_COLUMNS = {
    # name: (type, nullable, default contains)
    "id": ("bigint", "NO", None),
    "event_id": ("uuid", "NO", None),
    "user_id": ("text", "YES", None),
    "session_id": ("text", "YES", None),
    "event_type": ("text", "NO", None),
    "entity_type": ("text", "YES", None),
    "entity_id": ("text", "YES", None),
    "event_metadata": ("jsonb", "NO", "'{}'::jsonb"),
    "ip_address": ("inet", "YES", None),
    "user_agent": ("text", "YES", None),
    "referrer": ("text", "YES", None),
    "created_at": ("timestamp with time zone", "NO", None),
    "received_at": ("timestamp with time zone", "NO", "now()"),
}


def test_metadata_defines_the_table() -> None:
    assert metadata.tables[TABLE_NAME] is events_table
    assert [c.name for c in events_table.columns] == list(EXPECTED_COLUMNS)
    # partitioned by created_at: every key includes it
    assert [c.name for c in events_table.primary_key.columns] == ["id", "created_at"]
    assert events_table.dialect_options["postgresql"]["partition_by"] == "RANGE (created_at)"


def test_the_revisions_shipped_are_the_ones_the_drain_knows() -> None:
    script = ScriptDirectory.from_config(_config("month"))
    assert script.get_current_head() == HEAD
    assert [r.revision for r in reversed(list(script.walk_revisions()))] == list(REVISIONS)


@pytest.mark.parametrize(
    ("url", "sa", "pg"),
    [
        (
            "postgresql://u:p@h:5432/db",
            "postgresql+asyncpg://u:p@h:5432/db",
            "postgresql://u:p@h:5432/db",
        ),
        ("postgres://h/db", "postgresql+asyncpg://h/db", "postgresql://h/db"),
        (
            "postgresql+asyncpg://h/db?ssl=require",
            "postgresql+asyncpg://h/db?ssl=require",
            "postgresql://h/db?ssl=require",
        ),
    ],
)
def test_url_converters(url: str, sa: str, pg: str) -> None:
    assert sqlalchemy_url(url) == sa
    assert asyncpg_dsn(url) == pg


def test_url_converters_reject_other_schemes_without_leaking_the_password() -> None:
    with pytest.raises(ValueError, match="not a PostgreSQL URL") as info:
        sqlalchemy_url("mysql://user:hunter2@h/db")
    assert "hunter2" not in str(info.value)
    with pytest.raises(ValueError):
        asyncpg_dsn("redis://h/0")


async def test_migrated_table_has_the_designed_columns_and_indexes(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT column_name, data_type, is_nullable, column_default, is_identity "
            "FROM information_schema.columns WHERE table_name = $1",
            TABLE_NAME,
        )
        columns = {r["column_name"]: r for r in rows}
        assert set(columns) == set(EXPECTED_COLUMNS)
        for name, (kind, nullable, default) in EXPECTED_COLUMNS.items():
            assert columns[name]["data_type"] == kind, name
            assert columns[name]["is_nullable"] == nullable, name
            if default is not None:
                assert default in (columns[name]["column_default"] or ""), name
        assert columns["id"]["is_identity"] == "YES"
        indexes = {
            r["indexname"]: r["indexdef"]
            for r in await conn.fetch(
                "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = $1", TABLE_NAME
            )
        }
        defs = list(indexes.values())
        key = indexes[EVENT_KEY]
        assert key.startswith("CREATE UNIQUE INDEX") and "(event_id, created_at)" in key
        assert "(id, created_at)" in indexes[f"{TABLE_NAME}_pkey"]
        assert not any(d.endswith("(event_id)") for d in defs), defs
        kind = await conn.fetchval("SELECT relkind::text FROM pg_class WHERE oid = $1::regclass", TABLE_NAME)
        assert kind == "p"  # partitioned
        assert any("(event_type, created_at)" in d for d in defs), defs
        assert any("(user_id, created_at)" in d for d in defs), defs
    finally:
        await conn.close()


async def test_defaults_fill_metadata_and_received_at(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            row = await conn.fetchrow(
                f"INSERT INTO {TABLE_NAME} (event_id, event_type, created_at) "
                "VALUES (gen_random_uuid(), 'x', now()) RETURNING event_metadata, received_at, id"
            )
            assert row["event_metadata"] == "{}"
            assert row["received_at"] is not None
            assert row["id"] >= 1
            raise _Rollback
    except _Rollback:
        pass
    finally:
        await conn.close()


class _Rollback(Exception):
    pass


async def test_migrate_is_idempotent(database_url: str) -> None:
    await migrate(database_url)
    await migrate(database_url)


async def test_migrate_twice_over_rows_keeps_every_row() -> None:
    """Idempotent over a table with rows, not only an empty one: nothing dropped, recreated or added."""
    name = f"analytics_migrate_rows_{secrets.token_hex(4)}"
    url = f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    try:
        await migrate(url)
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(
                f"INSERT INTO {TABLE_NAME} (event_id, event_type, created_at) "
                "SELECT gen_random_uuid(), 'kept', now() FROM generate_series(1, 250)"
            )
            before = await conn.fetch(f"SELECT id, event_id FROM {TABLE_NAME} ORDER BY id")
            oid = await conn.fetchval("SELECT to_regclass($1)::oid", TABLE_NAME)
            await migrate(url)
            await migrate(url)
            after = await conn.fetch(f"SELECT id, event_id FROM {TABLE_NAME} ORDER BY id")
            assert len(before) == 250 and after == before
            assert await conn.fetchval("SELECT to_regclass($1)::oid", TABLE_NAME) == oid  # not recreated
        finally:
            await conn.close()
    finally:
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def test_migrate_creates_a_missing_database_and_concurrent_calls_agree() -> None:
    name = f"analytics_migrate_{secrets.token_hex(4)}"
    url = f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    try:
        # Three at once: the database and the table are each created exactly once, nobody fails.
        await asyncio.gather(migrate(url), migrate(url), migrate(url))
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", TABLE_NAME)
        finally:
            await conn.close()
    finally:
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def test_migrate_reports_an_unreachable_server() -> None:
    with pytest.raises(OSError):
        await migrate("postgresql://postgres@127.0.0.1:1/nothing_here")


async def test_a_migrated_database_matches_the_metadata(database_url: str) -> None:
    """The revisions and the Core metadata describe the same table: autogenerate finds nothing to do."""
    engine = create_async_engine(sqlalchemy_url(database_url))
    try:
        async with engine.connect() as conn:

            def diff(sync: object) -> list[object]:
                context = MigrationContext.configure(sync, opts={"version_table": VERSION_TABLE})  # type: ignore[arg-type]
                # only our table: the partitions are made at run time, not by the metadata
                return [d for d in compare_metadata(context, metadata) if "analytics_events_p" not in str(d)]

            assert await conn.run_sync(diff) == []
    finally:
        await engine.dispose()


async def test_the_baseline_revision_is_the_previous_releases_table() -> None:
    """Adoption stamps a database made by the previous release as revision 0001: that is only right if
    0001 makes exactly that table (columns, defaults, identity, constraints, indexes)."""
    async with (
        scratch_database("analytics_baseline") as by_revision,
        scratch_database("analytics_old") as old,
    ):
        await upgrade_to(by_revision, "0001")
        conn = await asyncpg.connect(old)
        try:
            await conn.execute(LEGACY_DDL)
        finally:
            await conn.close()
        assert await catalog(by_revision) == await catalog(old)
