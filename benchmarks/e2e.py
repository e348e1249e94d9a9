"""Section 5: end-to-end latency, track() -> Redis -> a real Celery worker -> PostgreSQL.

A real ``celery -A bridge worker -Q analytics`` subprocess (one prefork child, beat embedded with
``-B``) is configured entirely through ``ANALYTICS_*`` variables: this run's own key prefix, its own
broker database number (``ANALYTICS_BENCH_BROKER_DB``, default 14; the tests use 13), its own
PostgreSQL database, a short flush interval and the backlog trigger on. One AnalyticsClient offers a
steady rate of events; latency is each row's ``received_at - created_at`` (client clock to the
drain's transaction), read from the table once every event is in. The worker is stopped by its PID
(its process group: the prefork child too) in a ``finally``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import asyncpg
import redis

from analytics_sdk import AnalyticsClient, Settings

from ._common import EVENT_TYPE, FIELDS, Check, Context, Section, fmt_ms, fmt_rate
from .database import bench_database, row_count

REPO = Path(__file__).resolve().parents[1]
BROKER_DB = int(os.environ.get("ANALYTICS_BENCH_BROKER_DB", "14"))
FLUSH_INTERVAL = 1.0
TRIGGER_COOLDOWN = 0.2
TICK = 0.002  # the producer releases due events every 2 ms
READY_TIMEOUT = 90.0
SETTLE_TIMEOUT = 120.0
_LATENCY_SQL = """
SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY s) AS p50,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY s) AS p99,
       max(s) AS worst, count(*) AS n
FROM (SELECT extract(epoch FROM received_at - created_at)::float8 AS s FROM analytics_events) AS lat
"""


def _environment(ctx: Context, database_url: str) -> dict[str, str]:
    base = ctx.redis_url.rsplit("/", 1)[0]
    return {
        "ANALYTICS_REDIS_URL": ctx.redis_url,
        "ANALYTICS_BROKER_URL": f"{base}/{BROKER_DB}",
        "ANALYTICS_DATABASE_URL": database_url,
        "ANALYTICS_KEY_PREFIX": f"{ctx.prefix}-e2e",
        "ANALYTICS_FLUSH_INTERVAL": str(FLUSH_INTERVAL),
        "ANALYTICS_BACKLOG_TRIGGER": "true",
        "ANALYTICS_BACKLOG_TRIGGER_COOLDOWN": str(TRIGGER_COOLDOWN),
    }


def _start_worker(ctx: Context, env: dict[str, str], workdir: Path) -> tuple[subprocess.Popen[bytes], Path]:
    log = workdir / "worker.log"
    command = [
        sys.executable, "-m", "celery", "-A", "bridge", "worker", "-Q", "analytics", "-c", "1",
        "-B", "--schedule", str(workdir / "beat-schedule"), "-n", f"bench-{ctx.run_id}@%h",
        "--loglevel", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    full_env = {
        **os.environ,
        **env,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return process, log


def _wait_ready(process: subprocess.Popen[bytes], log: Path) -> float:
    started = time.monotonic()
    while time.monotonic() - started < READY_TIMEOUT:
        if process.poll() is not None:
            raise RuntimeError(
                f"the celery worker exited with {process.returncode}:\n{log.read_text()[-3000:]}"
            )
        if b" ready." in log.read_bytes():
            return time.monotonic() - started
        time.sleep(0.1)
    raise RuntimeError(
        f"the celery worker was not ready within {READY_TIMEOUT:.0f} s:\n{log.read_text()[-3000:]}"
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the worker's own process group (started with start_new_session), then SIGKILL."""
    if process.poll() is not None:
        return
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def _clean_broker(ctx: Context) -> None:
    """Remove only this run's broker keys: the flush queue and kombu's bookkeeping in our DB number."""
    base = ctx.redis_url.rsplit("/", 1)[0]
    with redis.Redis.from_url(f"{base}/{BROKER_DB}") as broker:
        keys = [b"analytics", b"unacked", b"unacked_index", b"unacked_mutex"]
        keys += list(broker.scan_iter(match="_kombu.*"))
        broker.delete(*keys)


async def _produce(settings: Settings, rate: int, seconds: float) -> dict[str, Any]:
    total = max(1, int(rate * seconds))
    latencies: list[float] = []
    async with AnalyticsClient(settings) as client:

        async def one() -> None:
            begin = time.perf_counter()
            await client.track(EVENT_TYPE, **FIELDS)
            latencies.append(time.perf_counter() - begin)

        tasks: set[asyncio.Task[None]] = set()
        loop = asyncio.get_running_loop()
        start = loop.time()
        sent = 0
        while sent < total:
            due = min(total, int((loop.time() - start) * rate) + 1)
            for _ in range(due - sent):
                task = loop.create_task(one())
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            sent = due
            await asyncio.sleep(TICK)
        await asyncio.gather(*tasks)
        elapsed = loop.time() - start
        await client.flush_events_now()  # the last few events, below the backlog trigger
    latencies.sort()
    return {
        "events": total,
        "offered_seconds": elapsed,
        "track_p99": latencies[int(len(latencies) * 0.99) - 1],
    }


async def _settle(database_url: str, total: int) -> dict[str, Any]:
    conn = await asyncpg.connect(database_url)
    try:
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while (rows := await row_count(conn)) < total:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {rows} of {total} events reached PostgreSQL in {SETTLE_TIMEOUT:.0f} s"
                )
            await asyncio.sleep(0.2)
        result = await conn.fetchrow(_LATENCY_SQL)
        if result is None:
            raise RuntimeError("the latency query returned no row")
        return dict(result)
    finally:
        await conn.close()


async def _run(ctx: Context) -> dict[str, Any]:
    mode = ctx.mode
    async with bench_database(ctx, "e2e") as url:
        env = _environment(ctx, url)
        settings = Settings.from_env(env)
        with tempfile.TemporaryDirectory(prefix="analytics-bench-") as tmp:
            process, log = _start_worker(ctx, env, Path(tmp))
            try:
                ready = await asyncio.to_thread(_wait_ready, process, log)
                produced = await _produce(settings, mode.e2e_rate, mode.e2e_seconds)
                latency = await _settle(url, produced["events"])
            finally:
                _stop(process)
                _clean_broker(ctx)
        if latency["n"] != produced["events"]:
            raise RuntimeError(f"{latency['n']} rows for {produced['events']} events")
        return {**produced, **latency, "worker_ready_seconds": ready, "rate_offered": mode.e2e_rate}


def run(ctx: Context) -> Section:
    d = asyncio.run(_run(ctx))
    achieved = d["events"] / d["offered_seconds"]
    section = Section(
        f"5. end to end: {d['rate_offered']:,} events/s offered for {ctx.mode.e2e_seconds:g} s, one worker",
        ["measure", "value"],
        data={k: (float(v) if isinstance(v, int | float) else v) for k, v in d.items()},
    )
    section.rows = [
        ["events (all in PostgreSQL)", f"{d['events']:,}"],
        ["rate achieved by the producer", fmt_rate(achieved)],
        ["created_at -> received_at p50", fmt_ms(d["p50"])],
        ["created_at -> received_at p99", fmt_ms(d["p99"])],
        ["created_at -> received_at max", fmt_ms(d["worst"])],
        ["track() p99 meanwhile", fmt_ms(d["track_p99"])],
    ]
    section.notes.append(
        f"worker: celery -A bridge worker -Q analytics -c 1 -B "
        f"(ready after {d['worker_ready_seconds']:.1f} s); "
        f"flush interval {FLUSH_INTERVAL:g} s, backlog trigger on (cooldown {TRIGGER_COOLDOWN:g} s), "
        f"broker DB {BROKER_DB}"
    )
    section.checks = [Check("end-to-end p99 at the offered rate, ms", d["p99"] * 1000, 2000, at_most=True)]
    return section
