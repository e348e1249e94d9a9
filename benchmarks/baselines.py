"""Section 1's baselines and diagnostics: the Redis ceiling, the raw round trip, the asyncio floor."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis

from analytics_sdk._event import encode_fields, validate
from analytics_sdk._queue import QueueKeys

from ._common import EVENT_TYPE, FIELDS, Run, run_callers

CEILING_BATCH = 1_000
PAIR_CHUNK = 50


def sample_payload() -> bytes:
    return validate({"event_type": EVENT_TYPE, **FIELDS}).encode()


async def ceiling(client: aioredis.Redis, keys: QueueKeys, batches: int, cap: int) -> Run:
    payloads = [sample_payload() for _ in range(CEILING_BATCH)]
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


async def round_trip(client: aioredis.Redis, keys: QueueKeys, samples: int, cap: int) -> Run:
    payload = sample_payload()
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


async def paired(
    client: aioredis.Redis, keys: QueueKeys, ours: Callable[[], Awaitable[object]], samples: int, cap: int
) -> tuple[Run, Run]:
    """One raw round trip vs one lone track(), alternating in chunks so that noise hits both alike."""
    raw, mine = Run(0, 0.0), Run(0, 0.0)
    for _ in range(max(1, samples // PAIR_CHUNK)):
        for total, run in ((raw, await round_trip(client, keys, PAIR_CHUNK, cap)),
                           (mine, await run_callers(ours, PAIR_CHUNK, 1))):  # fmt: skip
            total.ops += run.ops
            total.seconds += run.seconds
            total.latencies += run.latencies
    return raw, mine


class Floor:
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


def cpu_only(calls: int, limit: int) -> Run:
    """What track() runs per event before any I/O: its keyword arguments as a new dict, then
    ``encode_fields`` (not ``validate().encode()``, which builds an Event track() never makes)."""
    clock = time.perf_counter
    start = clock()
    for _ in range(calls):
        encode_fields({"event_type": EVENT_TYPE, **FIELDS}, max_metadata_bytes=limit)
    return Run(calls, clock() - start)
