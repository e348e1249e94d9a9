"""Section 5: end-to-end latency on the defaults, track() -> Redis -> a real Celery worker -> PostgreSQL.

A real ``celery -A bridge worker -Q analytics`` subprocess (one prefork child, beat embedded with
``-B``) is configured entirely through ``ANALYTICS_*`` variables: this run's own key prefix, its own
broker database number (``ANALYTICS_BENCH_BROKER_DB``, default 14; the tests use 13) and its own
PostgreSQL database; every timing setting is left at its default (flush interval 60 s, backlog
trigger on with its 1 s cooldown, the max delay), as a new user would run it. One AnalyticsClient
offers a steady rate of events, first at the mode's high rate (1,000 events/s), then at 50 events/s;
nothing asks for a flush at the end, so the events tracked last wait for what the defaults do for
them. Latency is each row's ``received_at - created_at`` (client clock to the drain's transaction),
read from the table once every event of the run is in. The worker is stopped by its PID (its
process group: the prefork child too) in a ``finally``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import asyncpg
import redis

from analytics_sdk import AnalyticsClient, Settings
from analytics_sdk._keys import QueueKeys

from ._common import EVENT_TYPE, FIELDS, Check, Context, Section, fmt_ms, fmt_rate
from .database import bench_database

REPO = Path(__file__).resolve().parents[1]
BROKER_DB = int(os.environ.get("ANALYTICS_BENCH_BROKER_DB", "14"))
LOW_RATE = 50  # events/s of the quiet run: a batch of 100 takes 2 s to fill
TARGET_P99 = {1_000: 2.0, LOW_RATE: 5.0}  # seconds, issue 13: including the events tracked last
TICK = 0.002  # the producer releases due events every 2 ms
READY_TIMEOUT = 90.0
SETTLE_TIMEOUT = 120.0
_LATENCY_SQL = """
SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY s) AS p50,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY s) AS p99,
       max(s) AS worst, count(*) AS n
FROM (SELECT extract(epoch FROM received_at - created_at)::float8 AS s FROM analytics_events
      WHERE event_type = $1) AS lat
"""


def _environment(ctx: Context, database_url: str) -> dict[str, str]:
    base = ctx.redis_url.rsplit("/", 1)[0]
    return {
        "ANALYTICS_REDIS_URL": ctx.redis_url,
        "ANALYTICS_BROKER_URL": f"{base}/{BROKER_DB}",
        "ANALYTICS_DATABASE_URL": database_url,
        "ANALYTICS_KEY_PREFIX": f"{ctx.prefix}-e2e",
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


async def _produce(settings: Settings, event_type: str, rate: int, seconds: float) -> dict[str, Any]:
    total = max(1, int(rate * seconds))
    latencies: list[float] = []
    async with AnalyticsClient(settings) as client:

        async def one() -> None:
            begin = time.perf_counter()
            await client.track(event_type, **FIELDS)
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
        # No flush_events_now(): the last events are left to the backlog trigger and the max delay.
    latencies.sort()
    return {
        "events": total,
        "offered_seconds": elapsed,
        "track_p99": latencies[max(0, int(len(latencies) * 0.99) - 1)],
    }


async def _settle(database_url: str, event_type: str, total: int) -> dict[str, Any]:
    conn = await asyncpg.connect(database_url)
    try:
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while (rows := await _count(conn, event_type)) < total:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {rows} of {total} events reached PostgreSQL in {SETTLE_TIMEOUT:.0f} s"
                )
            await asyncio.sleep(0.2)
        result = await conn.fetchrow(_LATENCY_SQL, event_type)
        if result is None:
            raise RuntimeError("the latency query returned no row")
        return dict(result)
    finally:
        await conn.close()


async def _count(conn: asyncpg.Connection[Any], event_type: str) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM analytics_events WHERE event_type = $1", event_type))


def _requests(ctx: Context, settings: Settings) -> dict[str, int]:
    """The flushes the clients asked for so far, by kind (now, trailing, delayed)."""
    with redis.Redis.from_url(ctx.redis_url) as client:
        raw = client.hgetall(QueueKeys(settings.analytics_key_prefix).flush_requests)
    return {k.decode(): int(v) for k, v in raw.items()}


async def _run(ctx: Context) -> list[dict[str, Any]]:
    mode = ctx.mode
    results: list[dict[str, Any]] = []
    async with bench_database(ctx, "e2e") as url:
        env = _environment(ctx, url)
        settings = Settings.from_env(env)
        with tempfile.TemporaryDirectory(prefix="analytics-bench-") as tmp:
            process, log = _start_worker(ctx, env, Path(tmp))
            try:
                ready = await asyncio.to_thread(_wait_ready, process, log)
                for rate in (mode.e2e_rate, LOW_RATE):
                    event_type = f"{EVENT_TYPE}-{rate}"
                    before = _requests(ctx, settings)
                    produced = await _produce(settings, event_type, rate, mode.e2e_seconds)
                    latency = await _settle(url, event_type, produced["events"])
                    after = _requests(ctx, settings)
                    if latency["n"] != produced["events"]:
                        raise RuntimeError(f"{latency['n']} rows for {produced['events']} events")
                    flushes = {k: after.get(k, 0) - before.get(k, 0) for k in ("now", "trailing", "delayed")}
                    results.append(
                        {**produced, **latency, "rate_offered": rate, "flushes": flushes, "ready": ready}
                    )
            finally:
                _stop(process)
                _clean_broker(ctx)
    return results


def run(ctx: Context) -> Section:
    runs = asyncio.run(_run(ctx))
    defaults = Settings()
    rates = " and ".join(f"{d['rate_offered']:,}" for d in runs)
    section = Section(
        f"5. end to end on the defaults: {rates} events/s "
        f"offered for {ctx.mode.e2e_seconds:g} s each, one worker",
        ["measure", *(f"{d['rate_offered']:,}/s" for d in runs)],
        data={str(d["rate_offered"]): _plain(d) for d in runs},
    )

    def row(label: str, show: Callable[[dict[str, Any]], str]) -> list[str]:
        return [label, *(show(d) for d in runs)]

    section.rows = [
        row("events (all in PostgreSQL)", lambda d: f"{d['events']:,}"),
        row("rate achieved by the producer", lambda d: fmt_rate(d["events"] / d["offered_seconds"])),
        row("created_at -> received_at p50", lambda d: fmt_ms(d["p50"])),
        row("created_at -> received_at p99", lambda d: fmt_ms(d["p99"])),
        row("created_at -> received_at max (incl. the last events)", lambda d: fmt_ms(d["worst"])),
        row("track() p99 meanwhile", lambda d: fmt_ms(d["track_p99"])),
        row(
            "flushes asked for: now / trailing / delayed",
            lambda d: " / ".join(str(d["flushes"][k]) for k in ("now", "trailing", "delayed")),
        ),
    ]
    section.notes.append(
        f"worker: celery -A bridge worker -Q analytics -c 1 -B (ready after {runs[0]['ready']:.1f} s); "
        f"defaults: flush interval {defaults.analytics_flush_interval:g} s, backlog trigger on "
        f"(cooldown {defaults.analytics_backlog_trigger_cooldown:g} s), max delay "
        f"{defaults.analytics_max_delay:g} s; no flush asked for at the end; broker DB {BROKER_DB}"
    )
    section.checks = [
        Check(
            f"end-to-end p99 on the defaults at {d['rate_offered']:,} events/s (incl. the last), ms",
            d["p99"] * 1000,
            TARGET_P99.get(d["rate_offered"], 2.0) * 1000,
            at_most=True,
        )
        for d in runs
    ]
    return section


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (float(v) if isinstance(v, int | float) and not isinstance(v, bool) else v) for k, v in d.items()
    }
