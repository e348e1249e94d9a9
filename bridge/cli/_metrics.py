"""`analytics-bridge metrics`: a Prometheus exporter reading the queue and the table on each scrape.

Nothing is counted in this process: every scrape reads the figures `status` reads (the Redis part
of :func:`bridge.cli._status.collect_status`, same keys, same clock) so the exporter and `status`
never disagree, and any number of exporters (or none) may run. Each scrape is one ``asyncio.run``
on the HTTP server's request thread, with clients made and closed inside it: no async client outlives
its loop. Each backend is read under its own timeout, so a dead PostgreSQL costs one timeout, not the
scrape, and leaves the queue figures visible (and the other way round).

Exported (totals over the queue's shards; no labels except ``backend`` and ``shard``):

- ``analytics_queue_length``: events waiting in the queue (not counting claimed batches).
- ``analytics_queue_latency_seconds``: Redis's clock now minus the ``created_at`` of the event at the
  head of the queue (the oldest waiting); 0 when the queue is empty. The wire format carries no
  queued-at time, so this is the age the *producer* gave the event: for live traffic it is how long
  the oldest event has waited (plus the producer's clock skew); a backfill of old events reads as old
  until drained. Absent when the head item is not a readable event.
- ``analytics_shard_queue_length{shard=...}``: each shard's queue length, only when there are
  several shards (``ANALYTICS_QUEUE_SHARDS`` > 1, or several shard counts recorded).
- ``analytics_inflight_batches``: leases held (batches claimed by a drain, not yet committed).
- ``analytics_dead_letters``: entries in the dead-letter list now (a purge lowers it).
- ``analytics_dropped_events_total``, ``analytics_inserted_events_total``,
  ``analytics_duplicate_events_total``: the counters the push script and the drains keep in Redis.
- ``analytics_last_flush_timestamp_seconds``: when a drain last finished (Unix time, the drain host's
  clock; drains record it even when idle); 0 when none ever did for this key prefix.
- ``analytics_backend_up{backend="redis"|"postgresql"}``: 1 when the figures could be read; 0 when the
  backend is unreachable, refuses, times out or (PostgreSQL) lacks the ``analytics_events`` table.
  Redis down: the queue metrics are absent for that scrape, the scrape itself still succeeds.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Iterable, Iterator
from datetime import datetime
from types import FrameType
from typing import Any

import asyncpg
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from redis.exceptions import RedisClusterException, RedisError

from analytics_sdk._settings import Settings, redact_url

from ..schema import asyncpg_dsn
from ._status import _database_error, _redis_error, _redis_figures

__all__ = ["DEFAULT_PORT", "QueueCollector", "make_registry", "serve"]

logger = logging.getLogger(__name__)

DEFAULT_PORT = 9808
# Failures that say a backend is down or refusing (TimeoutError is an OSError); anything else is a bug
# here, logged with its traceback, and still only zeroes the gauge: the scrape goes on.
_EXPECTED = (OSError, RedisError, RedisClusterException, asyncpg.PostgresError, asyncpg.InterfaceError)
_REDIS_ERRORS = (OSError, RedisError, RedisClusterException)
DEFAULT_TIMEOUT = 10.0  # seconds per backend per scrape; Prometheus's default scrape_timeout is 10 s


async def _probe_database(database_url: str, limit: float) -> None:
    """Raise unless PostgreSQL answers and holds the table. Deliberately not `status`'s ``count(*)``:
    that reads the whole table, which a scrape every 15 s must not do."""
    conn = await asyncpg.connect(asyncpg_dsn(database_url), timeout=limit)
    try:
        await conn.fetchval("SELECT 'analytics_events'::regclass::oid", timeout=limit)
    finally:
        await conn.close(timeout=limit)


class QueueCollector:
    """A prometheus_client collector: one read of Redis and PostgreSQL per :meth:`collect`."""

    def __init__(self, settings: Settings, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.settings = settings
        self.timeout = timeout
        # Last state per backend, so a backend that stays down is logged once, not every scrape.
        self._up: dict[str, bool | None] = {"redis": None, "postgresql": None}
        self._lock = threading.Lock()  # scrapes run on concurrent request threads

    def describe(self) -> Iterable[Metric]:
        # Registering must not touch the services; an empty description is what lets it skip collect().
        return []

    async def _read(self) -> tuple[dict[str, Any] | BaseException, BaseException | None]:
        settings, timeout = self.settings, self.timeout
        redis_part: dict[str, Any] | BaseException
        db_part: BaseException | None
        redis_part, db_part = await asyncio.gather(
            asyncio.wait_for(_redis_figures(settings), timeout),
            asyncio.wait_for(_probe_database(settings.database_url, timeout), timeout),
            return_exceptions=True,
        )
        return redis_part, db_part

    def _note(self, backend: str, error: BaseException | None) -> None:
        """Log a backend's transitions (down with why and what to do, back up), not its steady state."""
        if error is not None and not isinstance(error, _EXPECTED):
            logger.error("reading %s failed unexpectedly", backend, exc_info=error)
        with self._lock:
            was, self._up[backend] = self._up[backend], error is None
        if error is None:
            if was is False:
                logger.info("%s answers again", backend)
            return
        if was is False:
            return
        if backend == "redis":
            where = redact_url(self.settings.redis_dsn)
            advice = _redis_error(error, self.settings)[1] if isinstance(error, _REDIS_ERRORS) else ""
        else:
            where = redact_url(self.settings.database_url)
            advice = _database_error(error)[1]
        # wait_for's TimeoutError has no message: say what it means.
        reason = str(error) or (
            f"no answer within {self.timeout:g}s" if isinstance(error, TimeoutError) else type(error).__name__
        )
        logger.warning("%s at %s is down (%s); %s", backend, where, reason, advice or "see above")

    def collect(self) -> Iterator[Metric]:
        redis_part, db_error = asyncio.run(self._read())
        redis_error = redis_part if isinstance(redis_part, BaseException) else None
        for error in (redis_error, db_error):
            if error is not None and not isinstance(error, Exception):
                raise error  # KeyboardInterrupt, SystemExit: not a backend's state
        self._note("redis", redis_error)
        self._note("postgresql", db_error)
        up = GaugeMetricFamily(
            "analytics_backend_up", "1 when the backend answered this scrape, else 0.", labels=["backend"]
        )
        up.add_metric(["redis"], 0.0 if redis_error else 1.0)
        up.add_metric(["postgresql"], 0.0 if db_error else 1.0)
        yield up
        if isinstance(redis_part, dict):
            yield from _queue_metrics(redis_part)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _queue_metrics(figures: dict[str, Any]) -> Iterator[Metric]:
    queue, totals = figures["queue"], figures["totals"]
    yield _gauge("analytics_queue_length", "Events waiting in the Redis queue.", queue["depth"])
    age = queue["oldest_age_seconds"]
    if queue["depth"] == 0 or age is not None:
        yield _gauge(
            "analytics_queue_latency_seconds",
            "Redis time now minus the created_at of the oldest queued event (0 when empty).",
            0.0 if queue["depth"] == 0 else float(age),
        )
    yield _gauge(
        "analytics_inflight_batches",
        "Batches claimed by a drain and not yet committed (leases).",
        figures["in_flight"]["batches"],
    )
    yield _gauge("analytics_dead_letters", "Entries in the dead-letter list now.", figures["dead_letters"])
    yield CounterMetricFamily(
        "analytics_dropped_events", "Events the queue cap trimmed off the head.", value=figures["dropped"]
    )
    yield CounterMetricFamily(
        "analytics_inserted_events", "Events the drains inserted as new rows.", value=totals["inserted"]
    )
    yield CounterMetricFamily(
        "analytics_duplicate_events",
        "Events the drains found already in the table (redeliveries, repeated event_ids).",
        value=totals["duplicates"],
    )
    shards = figures.get("shards") or []
    if len(shards) > 1:  # K > 1 or several K recorded: the queue length of each shard too
        per_shard = GaugeMetricFamily(
            "analytics_shard_queue_length", "Events waiting in one shard's queue.", labels=["shard"]
        )
        for shard in shards:
            per_shard.add_metric([shard["shard"]], shard["depth"])
        yield per_shard
    last = figures["last_flush"]
    yield _gauge(
        "analytics_last_flush_timestamp_seconds",
        "Unix time a drain last finished (0: never, for this key prefix).",
        0.0 if last is None else datetime.fromisoformat(last["at"]).timestamp(),
    )


def make_registry(settings: Settings, timeout: float = DEFAULT_TIMEOUT) -> CollectorRegistry:
    """A registry holding only the queue collector (no process metrics: this is the queue's view)."""
    registry = CollectorRegistry()
    registry.register(QueueCollector(settings, timeout))
    return registry


def serve(settings: Settings, *, host: str, port: int, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Serve ``/metrics`` on ``host:port`` until SIGTERM or SIGINT. Raises OSError if it cannot listen."""
    httpd, thread = start_http_server(port, addr=host, registry=make_registry(settings, timeout))
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    logger.info(
        "serving analytics metrics on http://%s:%s/metrics (prefix %r, redis %s, database %s)",
        host,
        httpd.server_port,
        settings.analytics_key_prefix,
        redact_url(settings.redis_dsn),
        redact_url(settings.database_url),
    )
    try:
        while not stop.wait(1.0):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)
    logger.info("metrics server stopped")
