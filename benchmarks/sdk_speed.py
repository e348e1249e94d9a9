"""Quick check of issue 2's "Speed" figures: track() at 256 concurrent callers against its ceiling.

    PYTHONPATH=. /work/venv/bin/python -m benchmarks.sdk_speed [--repeats 5] [--events 100000]

Contenders, interleaved inside each repeat so machine noise (2 shared cores) hits them alike:
- ceiling: a raw ``MULTI; RPUSH <1,000 pre-encoded events>; LTRIM; EXEC`` loop, one connection;
- track: ``AnalyticsClient.track()`` with 256 concurrent callers (validate, encode, group commit),
  each call returning only once Redis acknowledged its own event;
- transport: the same group commit fed pre-encoded events (track() minus validation and encoding);
- naive: the same validation and encoding, then one MULTI per event (256 pooled connections).
Also validate+encode alone per event. Medians over the repeats are printed; a throwaway
redis-server on a free port is used unless ``--redis-url`` is given (its keys are deleted after).
The full, permanent suite is ``nox -s bench`` (benchmarks/__main__.py).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis
import redis.asyncio as aioredis

from analytics_sdk import AnalyticsClient, Settings
from analytics_sdk._event import encode_fields, validate
from analytics_sdk._queue import QueueKeys

CALLERS = 256
BATCH = 1_000
CAP = 10_000_000
METADATA = {"scroll_depth": 0.8, "section": "news", "experiment": "checkout-v2", "items": [101, 202, 303]}
FIELDS: dict[str, Any] = {
    "user_id": "user-4242",
    "session_id": "sess-7f3a9c1e2b",
    "entity_type": "article",
    "entity_id": "98765",
    "event_metadata": METADATA,
    "ip_address": "203.0.113.9",
    "user_agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0",
    "referrer": "https://news.example.com/front-page?utm_source=newsletter",
}


@contextmanager
def throwaway_redis() -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    binary = shutil.which("redis-server") or "redis-server"
    with tempfile.TemporaryDirectory() as directory:
        args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        process = subprocess.Popen([*args, "--dir", directory], stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    with redis.Redis(port=port) as probe:
                        probe.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.terminate()
            process.wait(10)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def callers(call: Callable[[], Awaitable[object]], total: int) -> tuple[float, list[float]]:
    """Events/s and per-call latencies of CALLERS coroutines each awaiting ``call()`` in turn."""
    per = total // CALLERS
    latencies: list[float] = []
    clock = time.perf_counter

    async def caller() -> None:
        for _ in range(per):
            begin = clock()
            await call()
            latencies.append(clock() - begin)

    start = clock()
    await asyncio.gather(*(caller() for _ in range(CALLERS)))
    return per * CALLERS / (clock() - start), latencies


async def ceiling(url: str, keys: QueueKeys, total: int) -> float:
    payloads = [validate({"event_type": "page_view", **FIELDS}).encode() for _ in range(BATCH)]
    client = aioredis.Redis.from_url(url)
    try:
        start = time.perf_counter()
        for _ in range(total // BATCH):
            async with client.pipeline(transaction=True) as pipe:
                pipe.rpush(keys.queue, *payloads)
                pipe.ltrim(keys.queue, -CAP, -1)
                await pipe.execute()
        return total // BATCH * BATCH / (time.perf_counter() - start)
    finally:
        await client.aclose()


async def tracked(settings: Settings, total: int) -> tuple[float, list[float]]:
    async with AnalyticsClient(settings) as client:
        await client.track("warm-up")
        return await callers(lambda: client.track("page_view", **FIELDS), total)


async def transport(settings: Settings, total: int) -> float:
    payload = validate({"event_type": "page_view", **FIELDS}).encode()
    async with AnalyticsClient(settings) as client:
        await client.track("warm-up")
        rate, _ = await callers(lambda: client._enqueue([payload], len(payload)), total)
        return rate


async def naive(url: str, keys: QueueKeys, total: int) -> float:
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=CALLERS)
    client = aioredis.Redis(connection_pool=pool)

    async def one() -> None:
        payload = validate({"event_type": "page_view", **FIELDS}).encode()
        async with client.pipeline(transaction=True) as pipe:
            pipe.rpush(keys.queue, payload)
            pipe.ltrim(keys.queue, -CAP, -1)
            await pipe.execute()

    try:
        rate, _ = await callers(one, total)
        return rate
    finally:
        await client.aclose()
        await pool.aclose()


async def asyncio_floor(total: int) -> float:
    """256 callers each awaiting its own future, resolved in batches by one task, no I/O at all:
    the cost of the one-future-per-caller shape itself, whatever the work around it."""
    loop = asyncio.get_running_loop()
    waiting: list[asyncio.Future[None]] = []
    flushing = False
    tasks: set[asyncio.Task[None]] = set()

    async def flush() -> None:
        nonlocal flushing
        while waiting:
            batch = waiting[:]
            waiting.clear()
            await asyncio.sleep(0)  # where the round trip would be
            for future in batch:
                future.set_result(None)
        flushing = False

    async def enqueue() -> None:
        nonlocal flushing
        future = loop.create_future()
        waiting.append(future)
        if not flushing:
            flushing = True
            task = loop.create_task(flush())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await future

    rate, _ = await callers(enqueue, total)
    return rate


def cpu_per_event(n: int = 20_000) -> float:
    """CPU seconds (this thread's, so other processes' load counts less) of track()'s validate+encode."""
    fields = {"event_type": "page_view", **FIELDS}
    start = time.thread_time()
    for _ in range(n):
        encode_fields(fields)
    return (time.thread_time() - start) / n


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--events", type=int, default=100_000, help="events per track()/ceiling run")
    parser.add_argument("--naive-events", type=int, default=20_000)
    parser.add_argument("--redis-url", help="use this Redis instead of a throwaway redis-server")
    args = parser.parse_args()
    with throwaway_redis() if args.redis_url is None else _given(args.redis_url) as url:
        keys = QueueKeys(f"bench-{uuid.uuid4().hex[:8]}")
        settings = Settings(
            redis_url=url,
            analytics_key_prefix=keys.prefix,
            analytics_backlog_trigger=False,
            analytics_max_queue_size=CAP,
        )
        rows: dict[str, list[float]] = {
            k: [] for k in ("ceiling", "track", "p50", "p99", "transport", "naive", "cpu", "floor")
        }
        with redis.Redis.from_url(url) as admin:
            for repeat in range(args.repeats):
                rows["ceiling"].append(await ceiling(url, keys, args.events))
                admin.delete(keys.queue)
                rate, latencies = await tracked(settings, args.events)
                rows["track"].append(rate)
                rows["p50"].append(percentile(latencies, 0.50))
                rows["p99"].append(percentile(latencies, 0.99))
                admin.delete(keys.queue)
                rows["transport"].append(await transport(settings, args.events))
                admin.delete(keys.queue)
                rows["naive"].append(await naive(url, keys, args.naive_events))
                admin.delete(keys.queue)
                rows["cpu"].append(cpu_per_event())
                rows["floor"].append(await asyncio_floor(args.events))
                print(
                    f"repeat {repeat + 1}: ceiling {rows['ceiling'][-1]:,.0f}/s  track {rate:,.0f}/s "
                    f"(p99 {rows['p99'][-1] * 1000:.2f} ms)  transport {rows['transport'][-1]:,.0f}/s  "
                    f"naive {rows['naive'][-1]:,.0f}/s  validate+encode {rows['cpu'][-1] * 1e6:.2f} us",
                    flush=True,
                )
            admin.delete(keys.queue, keys.dropped)
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"\nmedians of {args.repeats} repeats, {CALLERS} concurrent callers:")
    print(f"  raw ceiling (MULTI of {BATCH} pre-encoded) {med['ceiling']:>12,.0f} events/s")
    print(
        f"  track()                                 {med['track']:>12,.0f} events/s  "
        f"= {med['track'] / med['ceiling']:.0%} of ceiling (target >= 50%)"
    )
    print(
        f"  track() latency p50 / p99               {med['p50'] * 1000:>8.2f} / {med['p99'] * 1000:.2f} ms "
        "(target p99 <= 5 ms)"
    )
    print(f"  group commit, pre-encoded (transport)   {med['transport']:>12,.0f} events/s")
    print(
        f"  naive, one MULTI per event              {med['naive']:>12,.0f} events/s  "
        f"-> track() is {med['track'] / med['naive']:.1f}x (target >= 20x)"
    )
    print(f"  validate + encode alone (CPU time)      {med['cpu'] * 1e6:>10.2f} us/event")
    print(f"  asyncio floor: a future per caller, no I/O {med['floor']:>9,.0f} events/s")


@contextmanager
def _given(url: str) -> Iterator[str]:
    yield url


if __name__ == "__main__":
    asyncio.run(main())
