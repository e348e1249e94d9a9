"""The benchmark's own PostgreSQL database: created (and migrated) for one run, dropped after it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg

from bridge.store import COLUMNS, record

from ._common import Context

__all__ = ["COLUMNS", "bench_database", "copy_in_batches", "record", "row_count"]


def _url(ctx: Context, name: str) -> str:
    return f"{ctx.pg_admin_url.rsplit('/', 1)[0]}/{name}"


async def _admin(ctx: Context, sql: str) -> None:
    conn = await asyncpg.connect(ctx.pg_admin_url, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def bench_database(ctx: Context, suffix: str) -> AsyncIterator[str]:
    """A fresh database with the bridge's schema (``bridge.schema.migrate``); dropped on exit."""
    from bridge.schema import migrate

    name = f"analytics_bench_{ctx.run_id.replace('-', '_')}_{suffix}"
    await _admin(ctx, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await _admin(ctx, f'CREATE DATABASE "{name}"')
    try:
        url = _url(ctx, name)
        await migrate(url)
        yield url
    finally:
        await _admin(ctx, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def row_count(conn: asyncpg.Connection[Any]) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM analytics_events"))


async def copy_in_batches(
    conn: asyncpg.Connection[Any], records: Sequence[tuple[Any, ...]], rows: int, batch: int
) -> int:
    """The raw-COPY contender: the first ``rows`` of ``records`` into the table, ``batch`` rows per
    transaction (no copy of the list: the slices are what COPY sends)."""
    for start in range(0, rows, batch):
        async with conn.transaction():
            await conn.copy_records_to_table(
                "analytics_events", records=records[start : min(start + batch, rows)], columns=COLUMNS
            )
    return rows
