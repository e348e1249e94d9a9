"""Section 1: ``track()`` with 1-1,024 concurrent callers on one client, against the alternatives.

Contenders, run interleaved inside each repeat so that machine noise hits them alike:
- ceiling: raw ``MULTI; RPUSH <1,000 pre-encoded events>; LTRIM; EXEC`` through redis.asyncio;
- raw round trip: the same MULTI with one pre-encoded event, one at a time (one caller's floor);
- naive: the same validation and encoding as ours, then one MULTI per event (a blocking pool of
  up to 256 connections: redis.asyncio's default pool refuses more than 100);
- old design: :mod:`benchmarks.old_design` (pickled list under a threading.Lock, batch size 100);
- Segment and PostHog: :mod:`benchmarks.vendors` (in-memory per-call cost, one thread).

Three diagnostic rows split our cost: the asyncio floor at 256 callers (each awaits its own future,
resolved in batches by one task, with no I/O and no validation: what the one-future-per-caller shape
costs by itself), the group commit carrying pre-encoded events at 256 callers (transport only, no
validation) and validate+encode alone in a loop (CPU only, no I/O).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import redis
import redis.asyncio as aioredis

from analytics_sdk import AnalyticsClient
from analytics_sdk._event import validate
from analytics_sdk._queue import QueueKeys, push

from ._common import (
    CONCURRENCY,
    EVENT_TYPE,
    FIELDS,
    Check,
    Context,
    Run,
    Section,
    Summary,
    fmt_ms,
    fmt_rate,
    fmt_ratio,
    run_callers,
)
from .old_design import OldDesignClient
from .vendors import PostHog, Segment

logger = logging.getLogger(__name__)

CEILING_BATCH = 1_000
NAIVE_MAX_CONNECTIONS = 256


def _payload() -> bytes:
    return validate({"event_type": EVENT_TYPE, **FIELDS}).encode()


async def _ceiling(client: aioredis.Redis, keys: QueueKeys, batches: int, cap: int) -> Run:
    payloads = [_payload() for _ in range(CEILING_BATCH)]
    clock = time.perf_counter
    latencies = []
    start = clock()
    for _ in range(batches):
        begin = clock()
        async with client.pipeline(transaction=True) as pipe:
            pipe.rpush(keys.queue, *payloads)
            pipe.ltrim(keys.queue, -cap, -1)
            await pipe.execute()
        latencies.append(clock() - begin)
    return Run(batches * CEILING_BATCH, clock() - start, latencies)


async def _round_trip(client: aioredis.Redis, keys: QueueKeys, samples: int, cap: int) -> Run:
    payload = _payload()
    clock = time.perf_counter
    latencies = []
    start = clock()
    for _ in range(samples):
        begin = clock()
        async with client.pipeline(transaction=True) as pipe:
            pipe.rpush(keys.queue, payload)
            pipe.ltrim(keys.queue, -cap, -1)
            await pipe.execute()
        latencies.append(clock() - begin)
    return Run(samples, clock() - start, latencies)


class _Floor:
    """The asyncio floor: a future per caller, resolved in batches by one task; no I/O at all."""

    def __init__(self) -> None:
        self.waiting: list[asyncio.Future[None]] = []
        self.flusher: asyncio.Task[None] | None = None

    async def call(self) -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self.waiting.append(future)
        if self.flusher is None:
            self.flusher = loop.create_task(self._flush())
        await future

    async def _flush(self) -> None:
        while self.waiting:
            batch, self.waiting = self.waiting, []
            await asyncio.sleep(0)  # where the round trip would be
            for future in batch:
                future.set_result(None)
        self.flusher = None


def _cpu_only(calls: int, limit: int) -> Run:
    clock = time.perf_counter
    start = clock()
    for _ in range(calls):
        validate({"event_type": EVENT_TYPE, **FIELDS}, max_metadata_bytes=limit).encode()
    return Run(calls, clock() - start)


async def _measure(ctx: Context) -> dict[str, Any]:
    mode = ctx.mode
    settings = ctx.settings("track")
    keys = QueueKeys(settings.analytics_key_prefix)
    cap = settings.analytics_max_queue_size
    limit = settings.analytics_max_metadata_bytes
    old_key = f"{settings.analytics_key_prefix}:old-design:batch"
    raw = aioredis.Redis.from_url(ctx.redis_url)
    naive_redis = aioredis.Redis(
        connection_pool=aioredis.BlockingConnectionPool.from_url(
            ctx.redis_url, max_connections=NAIVE_MAX_CONNECTIONS, timeout=30
        )
    )
    sync = redis.Redis.from_url(ctx.redis_url)
    ours = AnalyticsClient(settings)
    old = OldDesignClient(sync, old_key)
    segment, posthog = Segment(), PostHog()

    async def naive() -> None:
        event = validate({"event_type": EVENT_TYPE, **FIELDS}, max_metadata_bytes=limit)
        await push(naive_redis, keys, [event.encode()], cap)

    def ours_call() -> Any:
        return ours.track(EVENT_TYPE, **FIELDS)

    payload = _payload()

    def transport_call() -> Any:
        return ours._enqueue([payload])  # diagnostic: the group commit without validation

    def old_call() -> Any:
        return old.track(EVENT_TYPE, **FIELDS)

    def reset() -> None:
        sync.delete(keys.queue, old_key)

    runs: dict[str, list[Run]] = {}

    def keep(name: str, run: Run, timed: bool) -> None:
        reset()
        if timed:
            runs.setdefault(name, []).append(run)

    try:
        reset()
        for repeat in range(mode.repeats + 1):
            timed = repeat > 0  # the first pass warms up connections, caches and the allocator
            scale = 1 if timed else 4
            keep("ceiling", await _ceiling(raw, keys, max(1, mode.ceiling_batches // scale), cap), timed)
            keep("rtt", await _round_trip(raw, keys, mode.rtt_samples, cap), timed)
            for callers in CONCURRENCY:
                keep(
                    f"ours/{callers}",
                    await run_callers(ours_call, mode.track_events // scale, callers),
                    timed,
                )
                slow = max(callers, mode.slow_events // scale)
                keep(f"naive/{callers}", await run_callers(naive, slow, callers), timed)
                keep(f"old/{callers}", await run_callers(old_call, slow, callers), timed)
            keep("transport/256", await run_callers(transport_call, mode.track_events // scale, 256), timed)
            keep("cpu", _cpu_only(mode.vendor_calls // scale, limit), timed)
            keep("floor/256", await run_callers(_Floor().call, mode.track_events // scale, 256), timed)
            keep("segment", segment.run(mode.vendor_calls // scale), timed)
            keep("posthog", posthog.run(mode.vendor_calls // scale), timed)
            if timed:
                logger.info("track: repeat %s/%s done", repeat, mode.repeats)
    finally:
        reset()
        segment.close()
        posthog.close()
        await ours.aclose()
        await naive_redis.aclose()
        await raw.aclose()
        sync.close()
    return {name: Summary.of(r) for name, r in runs.items()}


def run(ctx: Context) -> Section:
    s = asyncio.run(_measure(ctx))
    section = Section(
        "1. track() on one client vs the alternatives",
        ["callers", "contender", "events/s", "p50", "p99", "ours / it"],
    )
    ceiling, rtt = s["ceiling"], s["rtt"]
    for callers in CONCURRENCY:
        mine = s[f"ours/{callers}"]
        for label, key in (
            ("ours: track()", "ours"),
            ("naive: MULTI per event", "naive"),
            ("old design", "old"),
        ):
            it = s[f"{key}/{callers}"]
            ratio = "" if key == "ours" else fmt_ratio(mine.rate / it.rate)
            section.rows.append(
                [str(callers), label, fmt_rate(it.rate), fmt_ms(it.p50), fmt_ms(it.p99), ratio]
            )
    ours256 = s["ours/256"]
    section.rows.append(
        [
            "-",
            "ceiling: MULTI RPUSH x1,000",
            fmt_rate(ceiling.rate),
            fmt_ms(ceiling.p50),
            fmt_ms(ceiling.p99),
            fmt_ratio(ours256.rate / ceiling.rate) + " (256)",
        ]
    )
    section.rows.append(
        ["1", "raw pipeline round trip", fmt_rate(rtt.rate), fmt_ms(rtt.p50), fmt_ms(rtt.p99), ""]
    )
    transport, cpu = s["transport/256"], s["cpu"]
    floor = s["floor/256"]
    section.rows.append(
        [
            "256",
            "diag: asyncio floor (future per caller, no I/O)",
            fmt_rate(floor.rate),
            fmt_ms(floor.p50),
            fmt_ms(floor.p99),
            fmt_ratio(ours256.rate / floor.rate),
        ]
    )
    section.rows.append(
        [
            "256",
            "diag: ours, pre-encoded (no validation)",
            fmt_rate(transport.rate),
            fmt_ms(transport.p50),
            fmt_ms(transport.p99),
            fmt_ratio(ours256.rate / transport.rate),
        ]
    )
    section.rows.append(
        [
            "1 thread",
            "diag: validate+encode only (no I/O)",
            fmt_rate(cpu.rate),
            f"{1e6 / cpu.rate:.1f} us/event",
            "",
            fmt_ratio(ours256.rate / cpu.rate),
        ]
    )
    for name, key in (("Segment track() (per call)", "segment"), ("PostHog capture() (per call)", "posthog")):
        v = s[key]
        section.rows.append(
            [
                "1 thread",
                name,
                fmt_rate(v.rate),
                f"{1e6 / v.rate:.1f} us/call",
                "",
                fmt_ratio(ours256.rate / v.rate) + " (256)",
            ]
        )
    section.data = {name: summary.as_dict() for name, summary in s.items()}
    section.checks = [
        Check("track() 256 callers / ceiling", ours256.rate / ceiling.rate, 0.5),
        Check("track() 256 callers / naive client", ours256.rate / s["naive/256"].rate, 20),
        Check("track() 256 callers / old design", ours256.rate / s["old/256"].rate, 150),
        Check("track() 256 callers / Segment per call", ours256.rate / s["segment"].rate, 5),
        Check("track() 256 callers / PostHog per call", ours256.rate / s["posthog"].rate, 5),
        Check("track() 1 caller p50 / raw round trip p50", s["ours/1"].p50 / rtt.p50, 1.3, at_most=True),
        Check("track() 256 callers p99, ms (issue 2)", ours256.p99 * 1000, 5.0, at_most=True),
    ]
    return section
