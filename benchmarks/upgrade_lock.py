"""The longest exclusive lock of the upgrade from the previous release's heap to the partitioned table.

    python -m benchmarks.upgrade_lock [--rows 1000000] [--small 100000] [--repeat 3]

For each size it makes a database as the previous release left it (revision 0001's heap, no version
table) with that many rows, then runs ``migrate`` while two other sessions watch:

- a **sampler** polls ``pg_locks`` every ~2 ms for ACCESS EXCLUSIVE locks on ``analytics_events*``
  relations and records how long each (session, relation) was seen granted: the longest is the
  figure (a hold is measured from the first poll that sees it to the last one, so to within one poll
  interval; a hold shorter than a poll interval may be missed);
- the same polls record every lock the old drain (below) is seen **waiting** for, and for how long;
- an **old drain** inserts one row at a time as the previous release does (``ON CONFLICT (event_id)``)
  and records its longest insert: how long writes actually stalled. Once the swap is done its insert
  fails with 42P10 (the old release holds its events then) and it stops.

Each size runs ``--repeat`` times and its worst run counts. The two sizes run side by side: the lock
should not grow with the table (ratio ~1) while the whole migration does (the VALIDATE scan and the
index builds, which block no writer). Each database is dropped at the end. The machine may be
loaded: read the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from dataclasses import dataclass, field

import asyncpg

_ADMIN = os.environ.get("ANALYTICS_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
# Granted ACCESS EXCLUSIVE locks (the holds), and every lock request still waiting (the stalls).
_LOCKS = """
SELECT l.pid, coalesce(l.relation::regclass::text, l.locktype) AS rel, coalesce(l.relation, 0) AS oid,
       l.granted
FROM pg_locks l
WHERE ((l.locktype = 'relation' AND l.mode = 'AccessExclusiveLock'
        AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()))
       OR (NOT l.granted AND l.pid = $1))
  AND l.pid <> pg_backend_pid()
"""
_OLD_INSERT = (
    "INSERT INTO analytics_events (event_id, event_type, created_at) VALUES ($1, 'old_drain', now()) "
    "ON CONFLICT (event_id) DO NOTHING"
)


@dataclass
class Spans:
    """Continuous spans of a condition seen by successive polls, per (session, relation): a span ends
    at the first poll that no longer sees it, so two holds by one session are two spans."""

    open: dict[tuple[int, int], tuple[float, float, str]] = field(default_factory=dict)
    longest: float = 0.0
    longest_on: str = ""
    count: int = 0

    def poll(self, now: float, seen: dict[tuple[int, int], str]) -> None:
        for key in list(self.open):
            if key not in seen:
                self._close(key)
        for key, rel in seen.items():
            first, _, _ = self.open.get(key, (now, now, rel))
            self.open[key] = (first, now, rel)

    def _close(self, key: tuple[int, int]) -> None:
        first, last, rel = self.open.pop(key)
        self.count += 1
        if last - first >= self.longest:
            self.longest, self.longest_on = last - first, rel

    def finish(self) -> None:
        for key in list(self.open):
            self._close(key)


@dataclass
class Figures:
    rows: int
    migrate_s: float = 0.0
    polls: int = 0
    longest_insert_s: float = 0.0
    inserts: int = 0
    writer_pid: int = 0
    holds: Spans = field(default_factory=Spans)
    waits: Spans = field(default_factory=Spans)


async def _sample(url: str, figures: Figures, stop: asyncio.Event) -> None:
    conn = await asyncpg.connect(url)
    try:
        while not stop.is_set():
            now = time.perf_counter()
            held: dict[tuple[int, int], str] = {}
            waiting: dict[tuple[int, int], str] = {}
            for row in await conn.fetch(_LOCKS, figures.writer_pid):
                if not row["granted"]:
                    waiting[(row["pid"], row["oid"])] = row["rel"]
                elif str(row["rel"]).startswith("analytics_events"):
                    held[(row["pid"], row["oid"])] = row["rel"]
            figures.holds.poll(now, held)
            figures.waits.poll(now, waiting)
            figures.polls += 1
            await asyncio.sleep(0.002)
    finally:
        await conn.close()
    figures.holds.finish()
    figures.waits.finish()


async def _old_drain(url: str, figures: Figures, stop: asyncio.Event, ready: asyncio.Event) -> None:
    conn = await asyncpg.connect(url)
    figures.writer_pid = conn.get_server_pid()
    ready.set()
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
        stop, ready = asyncio.Event(), asyncio.Event()
        watchers = [asyncio.create_task(_old_drain(url, figures, stop, ready))]
        await ready.wait()
        watchers.append(asyncio.create_task(_sample(url, figures, stop)))
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
    return figures


async def _count(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM analytics_events"))
    finally:
        await conn.close()


async def _worst(rows: int, repeat: int) -> Figures:
    """Measure ``repeat`` times; the run with the longest exclusive lock (printed each)."""
    runs = []
    for _ in range(repeat):
        runs.append(await measure(rows))
        print(_line(runs[-1]), flush=True)
    return max(runs, key=lambda f: f.holds.longest)


def _line(f: Figures) -> str:
    return (
        f"{f.rows:>9,} rows | migrate {f.migrate_s * 1000:8.0f} ms | longest ACCESS EXCLUSIVE "
        f"{f.holds.longest * 1000:6.1f} ms on {f.holds.longest_on} ({f.holds.count} seen, {f.polls} polls) | "
        f"old drain: longest lock wait {f.waits.longest * 1000:6.1f} ms ({f.waits.count} seen), "
        f"longest insert {f.longest_insert_s * 1000:6.1f} ms ({f.inserts} inserts)"
    )


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.upgrade_lock", description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the big table")
    parser.add_argument("--small", type=int, default=100_000, help="rows of the table it is compared with")
    parser.add_argument("--repeat", type=int, default=3, help="runs per size; the worst one counts")
    args = parser.parse_args(argv)
    small = await _worst(args.small, args.repeat)
    big = await _worst(args.rows, args.repeat)
    print(
        f"ratio {args.rows:,} / {args.small:,} rows: longest lock "
        f"{big.holds.longest / max(small.holds.longest, 1e-6):.2f}x, old drain's longest insert "
        f"{big.longest_insert_s / max(small.longest_insert_s, 1e-6):.2f}x, whole migrate "
        f"{big.migrate_s / max(small.migrate_s, 1e-6):.2f}x"
    )


if __name__ == "__main__":
    asyncio.run(main())
