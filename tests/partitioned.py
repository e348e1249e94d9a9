"""The partitioned ``analytics_events`` for tests and the partition benchmark, made in ONE place.

:func:`make_partitioned` runs the real ``migrate`` (the Alembic revisions) and then drops the partitions
it made ahead, so each test starts from the parent alone and makes exactly the partitions it needs.
The benchmark (``benchmarks/partitions.py``) uses it too, so this module imports neither pytest nor
the conftest at its top.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any

import asyncpg

__all__ = ["insert_at", "make_partitioned", "partitioned_database", "partitions_of"]


async def make_partitioned(url: str) -> None:
    """Give the database at ``url`` the partitioned events table, migrated to head, with no partitions."""
    from bridge.schema import migrate

    await migrate(url)
    conn = await asyncpg.connect(url)
    try:
        for name in await conn.fetch(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = to_regclass('analytics_events')"
        ):
            await conn.execute(f'DROP TABLE "{name["relname"]}"')
    finally:
        await conn.close()


@contextlib.contextmanager
def partitioned_database() -> Iterator[str]:
    """A fresh database holding the partitioned events table (no partitions), dropped on exit."""
    from tests.conftest import PG_ADMIN_URL, _admin, _pg_fail, run_blocking

    name = f"analytics_part_{os.getpid()}_{secrets.token_hex(3)}"
    try:
        run_blocking(_admin(f'CREATE DATABASE "{name}"'))
    except (TimeoutError, OSError) as exc:
        _pg_fail(PG_ADMIN_URL, exc)
    url = f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    try:
        run_blocking(make_partitioned(url))
        yield url
    finally:
        run_blocking(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def partitions_of(conn: asyncpg.Connection[Any]) -> set[str]:
    """The names of the partitions attached to analytics_events now."""
    rows = await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'analytics_events'::regclass"
    )
    return {r["relname"] for r in rows}


async def insert_at(conn: asyncpg.Connection[Any], event_type: str, moments: Iterable[datetime]) -> None:
    """One row of ``event_type`` created at each of ``moments`` (straight into the table)."""
    await conn.executemany(
        "INSERT INTO analytics_events (event_id, event_type, created_at) VALUES (gen_random_uuid(), $1, $2)",
        [(event_type, moment) for moment in moments],
    )
