"""Polling helpers: wait for a condition with a deadline, never a bare sleep."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest


async def wait_for(
    predicate: Callable[[], object | Awaitable[object]],
    timeout: float = 10.0,
    interval: float = 0.05,
    message: str = "",
) -> None:
    """Poll ``predicate`` (sync or async) until it is truthy; fail the test after ``timeout`` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            pytest.fail(f"condition not met within {timeout}s: {message or predicate}")
        await asyncio.sleep(interval)


def wait_for_sync(
    predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.05, message: str = ""
) -> None:
    """The same for sync tests."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s: {message or predicate}")
        time.sleep(interval)


async def row_count(database_url: str) -> int:
    """Rows in analytics_events, over a connection of its own (for polling from any test)."""
    import asyncpg  # the bridge's driver: only the tests that poll PostgreSQL need it

    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM analytics_events"))
    finally:
        await conn.close()
