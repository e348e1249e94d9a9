"""Section 1: ``track()`` with 1-1,024 concurrent callers on one client, against the alternatives.

Contenders, run interleaved inside each repeat so that machine noise hits them alike:
- ceiling: raw ``MULTI; RPUSH <1,000 pre-encoded events>; LTRIM; EXEC`` through redis.asyncio;
- raw round trip: the same MULTI with one pre-encoded event, one at a time (one caller's floor),
  measured alternately with a lone track() in chunks of 50 for the one-caller latency check;
- naive: the same validation and encoding as ours, then one MULTI per event (a blocking pool of
  up to 256 connections: redis.asyncio's default pool refuses more than 100);
- old design: :mod:`benchmarks.old_design` (pickled list under a threading.Lock, batch size 100);
- Segment and PostHog: :mod:`benchmarks.vendors` (in-memory per-call cost, one thread).

The 256 and 1,024 caller rows run again on uvloop (:mod:`benchmarks.track_uvloop`), against a
ceiling measured on that loop.

Three diagnostic rows split our cost: the asyncio floor at 256 callers (each awaits its own future,
resolved in batches by one task, with no I/O and no validation: what the one-future-per-caller shape
costs by itself), the group commit carrying pre-encoded events at 256 and 1,024 callers (transport
only, no validation; its ratio is to the ceiling) and validate+encode alone in a loop (CPU only, no I/O).
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from typing import Any

import redis
import redis.asyncio as aioredis

from analytics_sdk import AnalyticsClient
from analytics_sdk._event import encode_fields, validate
from analytics_sdk._queue import QueueKeys, push

from . import track_uvloop
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
from .baselines import Floor, ceiling, cpu_only, paired, sample_payload
from .old_design import OldDesignClient
from .vendors import PostHog, Segment

logger = logging.getLogger(__name__)

NAIVE_MAX_CONNECTIONS = 256


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

    payload = sample_payload()

    def transport_call() -> Any:
        return ours._enqueue_one(payload)  # diagnostic: the group commit without validation

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
            keep("ceiling", await ceiling(raw, keys, max(1, mode.ceiling_batches // scale), cap), timed)
            rtt, lone = await paired(raw, keys, ours_call, mode.rtt_samples, cap)
            keep("rtt", rtt, timed)
            keep("lone", lone, timed)
            for callers in CONCURRENCY:
                events = mode.track_events // scale // (10 if callers == 1 else 1)  # one caller is slow
                keep(f"ours/{callers}", await run_callers(ours_call, events, callers), timed)
                slow = max(callers, mode.slow_events // scale)
                keep(f"naive/{callers}", await run_callers(naive, slow, callers), timed)
                keep(f"old/{callers}", await run_callers(old_call, slow, callers), timed)
            for callers in (256, 1024):
                run = await run_callers(transport_call, mode.track_events // scale, callers)
                keep(f"transport/{callers}", run, timed)
            keep("cpu", cpu_only(mode.vendor_calls // scale, limit), timed)
            keep("floor/256", await run_callers(Floor().call, mode.track_events // scale, 256), timed)
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


def _validate_encode(calls: int) -> tuple[list[str], Check]:
    """Issue 13's target: what track() runs per event before any I/O (``encode_fields``: validate and
    encode on the compiled schema), the bench's event, one thread; the median of five runs."""
    fields = {"event_type": EVENT_TYPE, **FIELDS}
    clock = time.perf_counter
    runs = []
    for _ in range(5):
        start = clock()
        for _ in range(calls):
            encode_fields(fields)
        runs.append((clock() - start) / calls)
    us = statistics.median(runs) * 1e6
    row = [
        "1 thread",
        "validate + encode of the bench's event",
        fmt_rate(1e6 / us),
        f"{us:.2f} us/event",
        "",
        "",
    ]
    return row, Check("validate + encode of the bench's event", us, 2.5, at_most=True, unit="us")


def run(ctx: Context) -> Section:
    s = asyncio.run(_measure(ctx))
    encode_row, encode_check = _validate_encode(max(1_000, ctx.mode.vendor_calls))
    uv = track_uvloop.measure(ctx) if track_uvloop.available() else {}
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
    lone = s["lone"]
    section.rows.append(
        [
            "1",
            "ours, alternating with the row above",
            fmt_rate(lone.rate),
            fmt_ms(lone.p50),
            fmt_ms(lone.p99),
            "",
        ]
    )
    cpu = s["cpu"]
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
    for callers in (256, 1024):  # the ratio: of the ceiling, the group commit's own share
        it = s[f"transport/{callers}"]
        section.rows.append(
            [
                str(callers),
                "diag: ours, pre-encoded (no validation)",
                fmt_rate(it.rate),
                fmt_ms(it.p50),
                fmt_ms(it.p99),
                fmt_ratio(it.rate / ceiling.rate) + " of ceiling",
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
    section.rows.append(encode_row)
    for callers in track_uvloop.CALLERS if uv else ():
        it, uv_ceiling = uv[f"ours/{callers}"], uv["ceiling"]
        vs_asyncio = fmt_ratio(it.rate / s[f"ours/{callers}"].rate)
        ratio = f"{fmt_ratio(it.rate / uv_ceiling.rate)} its ceiling, {vs_asyncio} asyncio"
        section.rows.append(
            [str(callers), "ours on uvloop", fmt_rate(it.rate), fmt_ms(it.p50), fmt_ms(it.p99), ratio]
        )
    if uv:
        u = uv["ceiling"]
        section.rows.append(["-", "ceiling on uvloop", fmt_rate(u.rate), fmt_ms(u.p50), fmt_ms(u.p99), ""])
    else:
        section.notes.append("uvloop is not installed (the bench dependency group has it): no uvloop rows")
    old1 = s["old/1"]
    section.notes.append(
        f"one caller: track() p50 {fmt_ms(s['lone'].p50)} = {s['lone'].p50 / rtt.p50:.2f}x a raw round "
        f"trip; the old design's p50 {fmt_ms(old1.p50)} (ours {fmt_ratio(old1.p50 / s['ours/1'].p50)} faster)"
    )
    ours1024 = s["ours/1024"]
    section.data = {name: summary.as_dict() for name, summary in s.items()}
    section.data.update({f"uvloop/{name}": summary.as_dict() for name, summary in uv.items()})
    section.checks = [
        encode_check,
        Check("track() 256 callers / ceiling", ours256.rate / ceiling.rate, 0.4, note="stretch 0.5"),
        Check("track() 256 callers / naive client", ours256.rate / s["naive/256"].rate, 20),
        Check("track() 256 callers / old design", ours256.rate / s["old/256"].rate, 150),
        Check("track() 256 callers / Segment per call", ours256.rate / s["segment"].rate, 5),
        Check("track() 256 callers / PostHog per call", ours256.rate / s["posthog"].rate, 5),
        Check("track() 1 caller p50 / raw round trip p50", s["lone"].p50 / rtt.p50, 1.3, at_most=True),
        Check("track() 256 callers p99, ms", ours256.p99 * 1000, 3.0, at_most=True),
        Check("track() 1,024 callers / 256 callers", ours1024.rate / ours256.rate, 1.0),
        Check("track() 1,024 callers p99, ms", ours1024.p99 * 1000, 12.0, at_most=True),
    ]
    return section
