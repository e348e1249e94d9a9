"""Section 1 on uvloop: the same client on the loop many ASGI servers run (uvicorn, granian).

Its own ceiling is measured on the same loop, so the ratio reads like the asyncio one. uvloop comes
with the ``bench`` dependency group; the package itself never depends on it. Without it the section
says so and skips these rows.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import redis
import redis.asyncio as aioredis

from analytics_sdk import AnalyticsClient
from analytics_sdk._queue import QueueKeys

from ._common import EVENT_TYPE, FIELDS, Context, Run, Summary, run_callers
from .baselines import ceiling

__all__ = ["available", "measure"]

CALLERS = (256, 1024)


def available() -> bool:
    return importlib.util.find_spec("uvloop") is not None


async def _measure(ctx: Context) -> dict[str, Summary]:
    mode = ctx.mode
    settings = ctx.settings("track-uvloop")
    keys = QueueKeys(settings.analytics_key_prefix)
    cap = settings.analytics_max_queue_size
    raw = aioredis.Redis.from_url(ctx.redis_url)
    sync = redis.Redis.from_url(ctx.redis_url)
    ours = AnalyticsClient(settings)

    def call() -> Any:
        return ours.track(EVENT_TYPE, **FIELDS)

    runs: dict[str, list[Run]] = {}
    try:
        for repeat in range(mode.repeats + 1):
            scale = 4 if repeat == 0 else 1  # an untimed warm-up first, as in the asyncio rows
            measured = {"ceiling": await ceiling(raw, keys, max(1, mode.ceiling_batches // scale), cap)}
            sync.delete(keys.queue)
            for callers in CALLERS:
                measured[f"ours/{callers}"] = await run_callers(call, mode.track_events // scale, callers)
                sync.delete(keys.queue)
            if repeat:
                for name, run in measured.items():
                    runs.setdefault(name, []).append(run)
    finally:
        sync.delete(keys.queue)
        await ours.aclose()
        await raw.aclose()
        sync.close()
    return {name: Summary.of(r) for name, r in runs.items()}


def measure(ctx: Context) -> dict[str, Summary]:
    import uvloop  # optional: only the bench group installs it

    # typed here: the typecheck session does not install the bench group, so uvloop is untyped there
    result: dict[str, Summary] = uvloop.run(_measure(ctx))
    return result
