"""``python -m benchmarks.upgrade_lock [--rows 1000000] [--small 100000]``: the longest exclusive lock
of the upgrade from the previous release's heap to the partitioned table.

For each size it makes a database as the previous release left it (revision 0001's heap, no version
table) with that many rows, then runs ``migrate`` while two other sessions watch:

- a **sampler** polls ``pg_locks`` every ~2 ms for ACCESS EXCLUSIVE locks on ``analytics_events*``
  relations and records how long each (session, relation) was seen granted: the longest is the
  figure (a hold is seen to within one poll; shorter holds may be missed entirely);
- an **old drain** inserts one row at a time as the previous release does (``ON CONFLICT (event_id)``)
  and records its longest insert: how long writes actually stalled. Once the swap is done its insert
  fails with 42P10 (the old release holds its events then) and it stops.

The two sizes run side by side: the lock should not grow with the table (ratio ~1) while the whole
migration does (the VALIDATE scan and the index builds, which block no writer). Each database is
dropped at the end. The machine may be loaded: read the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import asyncpg

_ADMIN = os.environ.get("ANALYTICS_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
_LOCKS = """
SELECT l.pid, l.relation::regclass::text AS rel, l.relation AS oid FROM pg_locks l
WHERE l.locktype = 'relation' AND l.mode = 'AccessExclusiveLock' AND l.granted
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.pid <> pg_backend_pid()
"""
_OLD_INSERT = (
    "INSERT INTO analytics_events (event_id, event_type, created_at) VALUES ($1, 'old_drain', now()) "
    "ON CONFLICT (event_id) DO NOTHING"
)


@dataclass
class Figures:
    rows: int
    migrate_s: float = 0.0
    longest_lock_s: float = 0.0
    longest_lock_on: str = ""
    polls: int = 0
    longest_insert_s: float = 0.0
    inserts: int = 0
    holds: dict[tuple[int, int], list[Any]] = field(default_factory=dict)


async def _sample(url: str, figures: Figures, stop: asyncio.Event) -> None:
    conn = await asyncpg.connect(url)
    try:
        while not stop.is_set():
            now = time.perf_counter()
            for row in await conn.fetch(_LOCKS):
                if not str(row["rel"]).startswith("analytics_events"):
                    continue
                seen = figures.holds.setdefault((row["pid"], row["oid"]), [now, now, row["rel"]])
                seen[1] = now
            figures.polls += 1
            await asyncio.sleep(0.002)
    finally:
        await conn.close()


async def _old_drain(url: str, figures: Figures, stop: asyncio.Event) -> None:
    conn = await asyncpg.connect(url)
    try:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                await conn.execute(_OLD_INSERT, uuid.uuid4())
            except asyncpg.InvalidColumnReferenceError:  # 42P10: swapped, the old release holds now
                return
            figures.longest_insert_s = max(figures.longest_insert_s, time.perf_counter() - started)
            figures.inserts += 1
            await asyncio.sleep(0.005)
    finally:
        await conn.close()


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(_ADMIN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _previous_release(url: str, rows: int) -> None:
    """Revision 0001's heap without our version table: what the previous release's migrate made."""
    from bridge.migrations._run import upgrade_to

    await upgrade_to(url, "0001")
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("DROP TABLE analytics_alembic_version")
        await conn.execute(
            "INSERT INTO analytics_events (event_id, event_type, user_id, created_at, event_metadata) "
            "SELECT gen_random_uuid(), 'type_' || (n % 20), 'u' || (n % 5000), "
            "now() - make_interval(secs => n * 30), jsonb_build_object('n', n) "
            "FROM generate_series(1, $1) AS n",
            rows,
        )
        await conn.execute("VACUUM ANALYZE analytics_events")
    finally:
        await conn.close()


async def measure(rows: int) -> Figures:
    from bridge.schema import migrate

    name = f"analytics_upgrade_lock_{os.getpid()}_{rows}"
    url = f"{_ADMIN.rsplit('/', 1)[0]}/{name}"
    await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await _admin(f'CREATE DATABASE "{name}"')
    figures = Figures(rows)
    try:
        await _previous_release(url, rows)
        stop = asyncio.Event()
        watchers = [
            asyncio.create_task(_sample(url, figures, stop)),
            asyncio.create_task(_old_drain(url, figures, stop)),
        ]
        await asyncio.sleep(0.2)  # the watchers are connected and the old drain writes
        started = time.perf_counter()
        await migrate(url)
        figures.migrate_s = time.perf_counter() - started
        stop.set()
        await asyncio.gather(*watchers)
        count = await _count(url)
        if count < rows:
            raise AssertionError(f"{rows - count} rows lost")
    finally:
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    for first, last, rel in figures.holds.values():
        if last - first >= figures.longest_lock_s:
            figures.longest_lock_s, figures.longest_lock_on = last - first, rel
    return figures


async def _count(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM analytics_events"))
    finally:
        await conn.close()


def _line(f: Figures) -> str:
    return (
        f"{f.rows:>9,} rows | migrate {f.migrate_s * 1000:8.0f} ms | longest ACCESS EXCLUSIVE "
        f"{f.longest_lock_s * 1000:6.1f} ms on {f.longest_lock_on} ({f.polls} polls) | old drain's "
        f"longest insert {f.longest_insert_s * 1000:6.1f} ms ({f.inserts} inserts)"
    )


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.upgrade_lock", description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the big table")
    parser.add_argument("--small", type=int, default=100_000, help="rows of the table it is compared with")
    args = parser.parse_args(argv)
    small = await measure(args.small)
    print(_line(small))
    big = await measure(args.rows)
    print(_line(big))
    print(
        f"ratio {args.rows:,} / {args.small:,} rows: longest lock "
        f"{big.longest_lock_s / max(small.longest_lock_s, 1e-6):.2f}x, old drain's longest insert "
        f"{big.longest_insert_s / max(small.longest_insert_s, 1e-6):.2f}x, whole migrate "
        f"{big.migrate_s / max(small.migrate_s, 1e-6):.2f}x"
    )


if __name__ == "__main__":
    asyncio.run(main())
