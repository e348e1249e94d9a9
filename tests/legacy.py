"""Databases as earlier releases left them, for the migration tests (made and dropped by fixtures)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg

from tests.conftest import PG_ADMIN_URL, _admin

LEGACY_DDL = (Path(__file__).parent / "legacy_schema.sql").read_text()


def url_of(name: str) -> str:
    return f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"


@asynccontextmanager
async def scratch_database(prefix: str, *, create: bool = True) -> AsyncIterator[str]:
    """The URL of a database of our own (created unless ``create`` is False), dropped at the end."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    if create:
        await _admin(f'CREATE DATABASE "{name}"')
    try:
        yield url_of(name)
    finally:
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def make_legacy(url: str, rows: int) -> None:
    """The previous release's table with ``rows`` rows spread over the last ~14 months, 7 event types."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(LEGACY_DDL)
        await conn.execute(
            "INSERT INTO analytics_events (event_id, event_type, user_id, created_at, event_metadata) "
            "SELECT gen_random_uuid(), 'type_' || (n % 7), 'u' || (n % 100), "
            "now() - make_interval(mins => n * 60), jsonb_build_object('n', n) "
            "FROM generate_series(1, $1) AS n",
            rows,
        )
    finally:
        await conn.close()


async def upgrade_to(url: str, revision: str) -> None:
    """Run the revisions up to ``revision`` only (an old release's ``migrate``, a half-done upgrade)."""
    from bridge.migrations._run import upgrade_to as run_to

    await run_to(url, revision)


async def fetch(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def catalog(url: str, table: str = "analytics_events") -> dict[str, Any]:
    """The table's definition as PostgreSQL reports it: columns, constraints, indexes, partitioning."""
    conn = await asyncpg.connect(url)
    try:
        columns = await conn.fetch(
            "SELECT column_name, data_type, is_nullable, column_default, is_identity, identity_generation "
            "FROM information_schema.columns WHERE table_name = $1 ORDER BY ordinal_position",
            table,
        )
        constraints = await conn.fetch(
            "SELECT conname, pg_get_constraintdef(oid) AS def FROM pg_constraint "
            "WHERE conrelid = to_regclass($1) ORDER BY conname",
            table,
        )
        indexes = await conn.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = $1 ORDER BY indexname", table
        )
        kind = await conn.fetchval("SELECT relkind::text FROM pg_class WHERE oid = to_regclass($1)", table)
        return {
            "columns": [tuple(r) for r in columns],
            "constraints": [tuple(r) for r in constraints],
            "indexes": [tuple(r) for r in indexes],
            "kind": kind,
        }
    finally:
        await conn.close()
