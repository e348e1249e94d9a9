"""Section 4: Redis memory per queued event against the event's JSON size.

The queue is filled through the SDK's own push (the same bytes track() queues), then measured two
ways: ``MEMORY USAGE <queue> SAMPLES 0`` (exact: every element counted) divided by the count, and the
``INFO memory`` used_memory delta (noisy on a shared server; printed for reference only).
"""

from __future__ import annotations

import asyncio
import statistics
from typing import Any

import redis.asyncio as aioredis

from analytics_sdk._event import validate
from analytics_sdk._queue import QueueKeys, push

from ._common import EVENT_TYPE, FIELDS, Check, Context, Section

CHUNK = 1_000


async def _measure(ctx: Context) -> dict[str, Any]:
    settings = ctx.settings("memory")
    keys = QueueKeys(settings.analytics_key_prefix)
    count = ctx.mode.memory_events
    payloads = [
        validate({"event_type": EVENT_TYPE, **FIELDS, "user_id": f"user-{i % 5000}"}).encode()
        for i in range(count)
    ]
    client = aioredis.Redis.from_url(ctx.redis_url)
    try:
        await client.delete(keys.queue)
        before = int((await client.info("memory"))["used_memory"])
        for start in range(0, count, CHUNK):
            await push(client, keys, payloads[start : start + CHUNK], settings.analytics_max_queue_size)
        after = int((await client.info("memory"))["used_memory"])
        usage = int(await client.memory_usage(keys.queue, samples=0) or 0)
        length = int(await client.llen(keys.queue))
        encoding = await client.object("encoding", keys.queue)
    finally:
        await client.delete(keys.queue)
        await client.aclose()
    if length != count:
        raise RuntimeError(f"queued {length} events, expected {count} (is the cap lower than the run?)")
    return {
        "events": count,
        "json_bytes_mean": statistics.fmean(len(p) for p in payloads),
        "memory_usage_per_event": usage / count,
        "used_memory_delta_per_event": (after - before) / count,
        "encoding": encoding.decode() if isinstance(encoding, bytes) else str(encoding),
    }


def run(ctx: Context) -> Section:
    d = asyncio.run(_measure(ctx))
    json_size, per_event = d["json_bytes_mean"], d["memory_usage_per_event"]
    section = Section(
        "4. Redis memory per queued event",
        ["measure", "bytes/event", "/ JSON size"],
        data=d,
    )
    section.rows = [
        ["JSON payload (mean)", f"{json_size:,.0f}", "1.00x"],
        ["MEMORY USAGE SAMPLES 0 / count", f"{per_event:,.0f}", f"{per_event / json_size:.2f}x"],
        [
            "INFO used_memory delta / count (shared server: noisy)",
            f"{d['used_memory_delta_per_event']:,.0f}",
            f"{d['used_memory_delta_per_event'] / json_size:.2f}x",
        ],
    ]
    section.notes.append(f"{d['events']:,} events in one list (encoding {d['encoding']})")
    section.checks = [Check("queued event memory / JSON size", per_event / json_size, 1.3, at_most=True)]
    return section
