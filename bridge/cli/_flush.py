"""`analytics-bridge flush`: the Celery task's drain(), run inline, behind a progress bar; every shard
the drains visit is drained (:func:`bridge.drain.drain`)."""

from __future__ import annotations

import logging
import sys
from typing import Any, cast

import click
import redis.asyncio as aioredis

from analytics_sdk._settings import Settings
from analytics_sdk._topology import known_shards, queue_client

from .._broker import check_broker
from .._preflight import check_postgres, check_redis
from ..drain import DrainSummary, drain

__all__ = ["run_flush"]

logger = logging.getLogger(__name__)


async def _backlog(settings: Settings) -> int:
    """Events waiting plus events in flight on every shard: what this drain may end up moving (the
    bar's length)."""
    client = cast("aioredis.Redis", queue_client(settings))  # the cluster client answers alike
    try:
        waiting = 0
        for keys in await known_shards(client, settings):
            waiting += int(await client.llen(keys.queue))
            for batch_id in await client.zrange(keys.leases, 0, -1):
                name = batch_id.decode() if isinstance(batch_id, bytes) else str(batch_id)
                waiting += int(await client.llen(keys.inflight(name)))
        return waiting
    finally:
        await client.aclose()


async def run_flush(settings: Settings, *, time_budget: float | None, show_progress: bool) -> dict[str, Any]:
    """Drain now; returns the summary as a dict (the same one the task returns and logs).

    Checks first, as the worker does at start-up: a Redis older than 7.0 raises
    :class:`bridge._errors.RedisTooOld`, a missing table :class:`bridge._errors.NotMigrated`, a
    broker on the queue's Redis Cluster :class:`~analytics_sdk.ConfigurationError`."""
    check_broker(settings)
    await check_redis(settings)
    await check_postgres(settings)
    length = await _backlog(settings)
    logger.info(
        "flush: %s event(s) queued or in flight under prefix %r", length, settings.analytics_key_prefix
    )
    with click.progressbar(
        length=max(length, 1), label="Draining", file=sys.stderr, show_pos=True, hidden=not show_progress
    ) as bar:

        def progress(summary: DrainSummary) -> None:
            # claimed counts fresh claims and take-overs alike. Producers may add events while we
            # drain: grow the bar rather than overflow it.
            bar.length = max(bar.length or 0, summary.claimed)
            bar.update(summary.claimed - bar.pos)

        summary = await drain(settings, time_budget=time_budget, progress=progress)
    return summary.as_dict()
