"""The end-to-end demo: `nox -s demo` (or `python -m bridge.demo`, `analytics-bridge demo`).

Checks Redis and PostgreSQL, migrates, starts a real `celery -A bridge worker -B -Q analytics`, lets
simulated users track events through AnalyticsClient, waits until every event is a row, and prints
what it measured. It uses a key prefix of its own (``demo-<run>``, deleted at the end) and a broker
database of its own, so it never touches another queue on the same Redis; rows stay in the table,
tagged ``event_metadata.demo_run``. The worker is stopped however the demo ends, Ctrl-C included.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import click
import redis

from analytics_sdk import AnalyticsClient, ConfigurationError, Settings
from analytics_sdk._settings import redact_url

from ..cli._status import collect_status
from ..schema import migrate
from . import _site as site
from ._worker import DemoError, Worker, broker_for_demo, check_postgres, check_redis

__all__ = ["main"]


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    # SIGTERM / SIGHUP take the same way out as Ctrl-C, through every `finally`.
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _delete_prefix(settings: Settings) -> None:
    with redis.Redis.from_url(settings.redis_dsn, socket_timeout=5) as client:
        keys = list(client.scan_iter(match=f"{settings.analytics_key_prefix}:*", count=1000))
        if keys:
            client.delete(*keys)


async def _run(settings: Settings, worker: Worker, users: int, per_user: int, run_id: str) -> dict[str, Any]:
    total = users * per_user
    since = datetime.now(UTC) - timedelta(seconds=1)
    engine = site.engine_for(settings.database_url)
    try:
        async with AnalyticsClient(settings) as client:
            with click.progressbar(
                length=total,
                label=f"Tracking  {users} users",
                show_pos=True,
                update_min_steps=max(1, total // 200),
            ) as bar:
                started = time.monotonic()
                await site.simulate(client, users, per_user, run_id, bar.update)
                tracked_s = time.monotonic() - started
        with click.progressbar(length=total, label="Rows in PostgreSQL", show_pos=True) as bar:
            done = await site.wait_for_rows(
                engine,
                run_id,
                since,
                total,
                deadline_s=max(60.0, total / 500),
                on_count=lambda n: bar.update(n - bar.pos),
                check=worker.check_alive,
            )
        readback = await site.read_back(engine, run_id, since)
    finally:
        await engine.dispose()
    return {
        "events": total,
        "users": users,
        "tracked_seconds": tracked_s,
        "rows_seconds": done - started,
        "readback": readback,
        "status": await _settled_status(settings),
    }


async def _settled_status(settings: Settings, within: float = 10.0) -> dict[str, Any]:
    """The status once the last batch is acknowledged too (its rows are visible just before the ack)."""
    deadline = time.monotonic() + within
    while True:
        status = await collect_status(settings)
        settled = (
            status.get("in_flight", {}).get("batches") == 0 and status.get("queue", {}).get("depth") == 0
        )
        if settled or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.1)


def _summary(result: dict[str, Any], run_id: str, settings: Settings, worker_ready: float) -> str:
    rb: site.Readback = result["readback"]
    status = result["status"]
    events, tracked_s, rows_s = result["events"], result["tracked_seconds"], result["rows_seconds"]
    queue = status.get("queue", {})
    flight = status.get("in_flight", {})
    lines = [
        "",
        f"Demo run {run_id} (key prefix {settings.analytics_key_prefix!r};"
        f" worker ready in {worker_ready:.1f}s)",
        f"  events tracked     {events:,} by {result['users']} concurrent users in {tracked_s:.2f}s"
        f" = {events / tracked_s:,.0f} events/s",
        f"  rows in PostgreSQL {sum(rb.per_type.values()):,} in {rows_s:.2f}s from the first track()"
        f" = {events / rows_s:,.0f} rows/s",
        f"  latency            p50 {rb.latency_p50 * 1000:,.0f} ms, p99 {rb.latency_p99 * 1000:,.0f} ms,"
        f" max {rb.latency_max * 1000:,.0f} ms (created_at -> received_at)",
        "  rows per event_type (read back through SQLAlchemy async):",
        *(f"    {kind:<12} {n:>8,}" for kind, n in rb.per_type.items()),
        f"  queue size {queue.get('depth', '?')}, in-flight batches {flight.get('batches', '?')},"
        f" dead letters {status.get('dead_letters', '?')}, dropped {status.get('dropped', '?')}",
        f"  table analytics_events in {redact_url(settings.database_url)}"
        f" (this run's rows: event_metadata->>'demo_run' = '{run_id}')",
    ]
    return "\n".join(lines)


@click.command()
@click.option("--users", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--events-per-user", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--flush-interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True)
@click.option(
    "--concurrency", type=click.IntRange(min=1), default=2, show_default=True, help="Worker processes."
)
def main(users: int, events_per_user: int, flush_interval: float, concurrency: int) -> None:
    """Simulate a site against Redis, a real Celery worker and PostgreSQL; print what it measured.

    Reads the ANALYTICS_* variables for Redis and PostgreSQL (defaults: 127.0.0.1, database
    "analytics", created by migrate). ANALYTICS_KEY_PREFIX is not used: the demo has its own prefix.
    """
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        sys.exit(_demo(users, events_per_user, flush_interval, concurrency))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _demo(users: int, per_user: int, flush_interval: float, concurrency: int) -> int:
    run_id = secrets.token_hex(4)
    try:
        base = Settings.from_env()
        settings = base.replace(
            analytics_key_prefix=f"demo-{run_id}",
            broker_url=broker_for_demo(base, dict(os.environ)),
            analytics_flush_interval=flush_interval,
        )
    except ConfigurationError as exc:
        click.echo(f"demo: bad configuration: {exc}", err=True)
        return 2
    try:
        check_redis(settings)
        check_postgres(settings)
    except DemoError as exc:
        click.echo(f"demo: {exc}", err=True)
        return 2
    click.echo(
        f"Redis {redact_url(settings.redis_dsn)}, PostgreSQL {redact_url(settings.database_url)}: both answer"
    )
    asyncio.run(migrate(settings.database_url))
    click.echo("migrated: table analytics_events is in place")

    env = {k: v for k, v in os.environ.items() if k != "ANALYTICS_FAILPOINTS"}
    env.update(
        ANALYTICS_REDIS_URL=settings.redis_dsn,
        ANALYTICS_DATABASE_URL=settings.database_url,
        ANALYTICS_BROKER_URL=settings.broker_dsn,
        ANALYTICS_KEY_PREFIX=settings.analytics_key_prefix,
        ANALYTICS_FLUSH_INTERVAL=str(flush_interval),
    )
    with tempfile.TemporaryDirectory(prefix="analytics-demo-") as workdir:
        worker = Worker(env, Path(workdir), concurrency)
        code = 1
        try:
            worker.start()
            click.echo(f"started worker pid {worker.pid}: celery -A bridge worker -B -Q analytics")
            ready = worker.wait_ready()
            result = asyncio.run(_run(settings, worker, users, per_user, run_id))
            click.echo(_summary(result, run_id, settings, ready))
            code = 0
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            code = 130
        except (DemoError, TimeoutError) as exc:
            click.echo(f"demo: {exc}\nworker log ends:\n{worker.tail()}", err=True)
        finally:
            # A second Ctrl-C must not cut the worker's shutdown short: it has its own deadline.
            ignored = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                # Queue emptied first, so a drain still running (after Ctrl-C) finds nothing more to
                # claim and the warm shutdown is quick; again after, for what it acked meanwhile.
                _delete_prefix(settings)
                click.echo(f"stopping worker pid {worker.pid}", err=True)
                exit_code = worker.stop()
                click.echo(f"worker pid {worker.pid} stopped (exit code {exit_code})", err=True)
                _delete_prefix(settings)
            except redis.RedisError as exc:
                click.echo(
                    f"could not delete the demo's keys {settings.analytics_key_prefix}:* ({exc})", err=True
                )
            finally:
                for sig, handler in ignored.items():
                    signal.signal(sig, handler)
    return code
