"""The scale section's helper processes: producers and drains in processes of their own.

Spawned, never forked (no client or event loop crosses a fork), started once per section and then
told what to run over a pipe, in JSON: ``{"kind": "produce" | "drain", "settings": {...}, ...}``.
Every job of one round waits for the same wall-clock instant before its clock starts, so the
processes really run at once; a round's rate is the events of all its jobs over the time from the
first start to the last end. A producer job runs exactly what the in-process rows run
(:func:`produce`), so one process and two compare like for like. Also the chores between runs:
empty a contender's queues (:func:`clear`), refill the drains' queue and table (:func:`refill`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import multiprocessing
import time
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from types import TracebackType
from typing import Any

import asyncpg
import msgspec
import redis
import redis.asyncio as aioredis

from analytics_sdk import AnalyticsClient, Settings
from analytics_sdk._queue import QueueKeys, push
from analytics_sdk._redis import sync_cluster_client
from analytics_sdk._shards import all_shard_keys

from ._common import EVENT_TYPE, FIELDS, Run, run_callers

__all__ = ["Helpers", "Round", "clear", "produce", "refill", "rows", "settings_spec"]

_START_DELAY = 0.5  # s from sending a round to its start: every helper has read its job by then
_JOB_TIMEOUT = 600.0
_CAP = 10_000_000  # the drains' queue holds a whole run


def settings_spec(settings: Settings) -> dict[str, Any]:
    """The fields of ``settings`` that differ from the defaults (what a helper rebuilds it from)."""
    defaults = Settings()
    return {
        f.name: getattr(settings, f.name)
        for f in dataclasses.fields(Settings)
        if getattr(settings, f.name) != getattr(defaults, f.name)
    }


@dataclasses.dataclass(slots=True)
class Round:
    """What the jobs of one round did: events in all, wall time first start -> last end, latencies."""

    ops: int
    seconds: float
    latencies: list[float]

    @property
    def rate(self) -> float:
        return self.ops / self.seconds

    def as_run(self) -> Run:
        return Run(self.ops, self.seconds, self.latencies)


async def _until(start_at: float) -> None:
    delay = start_at - time.time()
    if delay > 0:
        await asyncio.sleep(delay)


async def produce(settings: Settings, events: int, callers: int, start_at: float = 0.0) -> dict[str, Any]:
    """``callers`` coroutines calling ``track()`` on one client, ``events`` in all, after a short
    untimed warm-up (connections, scripts, the shard-count record) and ``start_at``."""
    async with AnalyticsClient(settings) as client:

        def call() -> Any:
            return client.track(EVENT_TYPE, **FIELDS)

        await run_callers(call, min(events, callers * 4), callers)
        await _until(start_at)
        start = time.time()
        run = await run_callers(call, events, callers)
        end = time.time()
    return {"ops": run.ops, "start": start, "end": end, "latencies": run.latencies}


async def _drain(settings: Settings, start_at: float) -> dict[str, Any]:
    from bridge.drain import drain

    await _until(start_at)
    start = time.time()
    summary = await drain(settings, time_budget=3600)
    return {"ops": summary.inserted, "start": start, "end": time.time(), "latencies": []}


async def _job(job: dict[str, Any]) -> dict[str, Any]:
    settings = Settings(**job["settings"])
    if job["kind"] == "produce":
        return await produce(settings, job["events"], job["callers"], job["start_at"])
    return await _drain(settings, job["start_at"])


def _serve(conn: Connection) -> None:
    """A helper's main loop: one job per message, until an empty message."""
    while raw := conn.recv_bytes():
        try:
            result = asyncio.run(_job(msgspec.json.decode(raw)))
        except Exception as exc:  # the parent raises it, with the helper's words
            result = {"error": f"{type(exc).__name__}: {exc}"}
        conn.send_bytes(msgspec.json.encode(result))


class Helpers:
    """``count`` spawned helper processes; :meth:`run` gives each a job and gathers the round."""

    def __init__(self, count: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._conns: list[Connection] = []
        self._procs: list[BaseProcess] = []
        for n in range(count):
            mine, theirs = context.Pipe()
            process = context.Process(target=_serve, args=(theirs,), name=f"scale-helper-{n}", daemon=True)
            process.start()
            theirs.close()
            self._conns.append(mine)
            self._procs.append(process)

    def __enter__(self) -> Helpers:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def run(self, kind: str, settings: Settings, processes: int, **job: Any) -> Round:
        """The same job in ``processes`` helpers at once."""
        if not 1 <= processes <= len(self._conns):
            raise ValueError(f"processes must be in 1..{len(self._conns)}, not {processes}")
        start_at = time.time() + _START_DELAY
        message = {"kind": kind, "settings": settings_spec(settings), "start_at": start_at, **job}
        conns = self._conns[:processes]
        for conn in conns:
            conn.send_bytes(msgspec.json.encode(message))
        results = []
        for conn in conns:
            if not conn.poll(_JOB_TIMEOUT):
                raise RuntimeError(f"a {kind} helper gave no answer within {_JOB_TIMEOUT:.0f} s")
            result = msgspec.json.decode(conn.recv_bytes())
            if "error" in result:
                raise RuntimeError(f"a {kind} helper failed: {result['error']}")
            results.append(result)
        first = min(r["start"] for r in results)
        last = max(r["end"] for r in results)
        latencies = [latency for r in results for latency in r["latencies"]]
        return Round(sum(r["ops"] for r in results), last - first, latencies)

    def close(self) -> None:
        """Ask every helper to stop, then make sure (by its own handle) that it did."""
        for conn in self._conns:
            with contextlib.suppress(OSError):  # already gone
                conn.send_bytes(b"")
        for process in self._procs:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join(10)
        for conn in self._conns:
            conn.close()


def clear(settings: Settings) -> None:
    """Delete the queues a contender filled (the cluster's memory, the machine's shared Redis)."""
    prefix = settings.analytics_key_prefix
    shards = all_shard_keys(
        prefix, [1, settings.analytics_queue_shards], cluster=settings.analytics_redis_cluster
    )
    client: Any = (
        sync_cluster_client(settings, startup_nodes=settings.cluster_startup_nodes)
        if settings.analytics_redis_cluster
        else redis.Redis.from_url(settings.redis_dsn)
    )
    try:
        for keys in shards:
            client.delete(keys.queue)
    finally:
        client.close()


async def refill(settings: Settings, url: str, payloads: list[bytes]) -> None:
    """An empty table and the plain queue of ``settings`` holding exactly ``payloads``."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("TRUNCATE analytics_events")
    finally:
        await conn.close()
    keys = QueueKeys(settings.analytics_key_prefix)
    client = aioredis.Redis.from_url(settings.redis_dsn)
    try:
        await client.delete(keys.queue)
        for start in range(0, len(payloads), 1_000):
            await push(client, keys, payloads[start : start + 1_000], _CAP)
    finally:
        await client.aclose()


async def rows(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM analytics_events"))
    finally:
        await conn.close()
