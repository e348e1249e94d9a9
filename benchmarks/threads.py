"""Section 2: ``SyncAnalyticsClient`` from 8 threads, and from one, against a raw sync pipeline per event.

The raw contender does the same validation and encoding, then its own ``MULTI; RPUSH; LTRIM; EXEC``
through a shared ``redis.Redis`` (thread-safe pool): what sync code without this SDK would write. The
old design (pickled list under a threading.Lock) runs here too, in the threads it was written for.
One thread alone (a script, a cron job, a sync worker) is measured too, ours and raw alternating in
each repeat: there the client pushes from the calling thread (analytics_sdk._direct).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis

from analytics_sdk import SyncAnalyticsClient
from analytics_sdk._event import validate
from analytics_sdk._queue import QueueKeys

from ._common import EVENT_TYPE, FIELDS, Check, Context, Run, Section, Summary, fmt_ms, fmt_rate, fmt_ratio
from .old_design import OldDesignClient

logger = logging.getLogger(__name__)

THREADS = 8


def _threaded(call: Callable[[], object], total: int, threads: int = THREADS) -> Run:
    per = max(1, total // threads)
    latencies: list[list[float]] = [[] for _ in range(threads)]
    barrier = threading.Barrier(threads + 1)
    clock = time.perf_counter

    def worker(mine: list[float]) -> None:
        barrier.wait()
        for _ in range(per):
            start = clock()
            call()
            mine.append(clock() - start)

    pool = [threading.Thread(target=worker, args=(latencies[i],), daemon=True) for i in range(threads)]
    for thread in pool:
        thread.start()
    barrier.wait()
    start = clock()
    for thread in pool:
        thread.join()
    return Run(per * threads, clock() - start, [x for mine in latencies for x in mine])


def run(ctx: Context) -> Section:
    mode = ctx.mode
    settings = ctx.settings("threads")
    keys = QueueKeys(settings.analytics_key_prefix)
    cap = settings.analytics_max_queue_size
    limit = settings.analytics_max_metadata_bytes
    old_key = f"{settings.analytics_key_prefix}:old-design:batch"
    sync = redis.Redis.from_url(ctx.redis_url)
    ours = SyncAnalyticsClient(settings)
    old = OldDesignClient(sync, old_key)

    def raw_call() -> None:
        payload = validate({"event_type": EVENT_TYPE, **FIELDS}, max_metadata_bytes=limit).encode()
        with sync.pipeline(transaction=True) as pipe:
            pipe.rpush(keys.queue, payload)
            pipe.ltrim(keys.queue, -cap, -1)
            pipe.execute()

    contenders: dict[str, Callable[[], object]] = {
        "ours": lambda: ours.track(EVENT_TYPE, **FIELDS),
        "raw": raw_call,
        "old": lambda: old.track_event(EVENT_TYPE, **FIELDS),
    }
    runs: dict[str, list[Run]] = {}
    try:
        for repeat in range(mode.repeats + 1):
            total = mode.sync_events if repeat else mode.sync_events // 4
            for name, call in contenders.items():
                result = _threaded(call, max(THREADS, total))
                sync.delete(keys.queue, old_key)
                if repeat:
                    runs.setdefault(name, []).append(result)
            for name in ("ours", "raw"):  # one thread alone, side by side
                result = _threaded(contenders[name], total // 2, threads=1)
                sync.delete(keys.queue)
                if repeat:
                    runs.setdefault(f"{name}/1", []).append(result)
            logger.info("threads: repeat %s/%s done", repeat, mode.repeats)
    finally:
        ours.close()
        sync.delete(keys.queue, old_key)
        sync.close()
    s = {name: Summary.of(r) for name, r in runs.items()}
    section = Section(
        f"2. sync clients, {THREADS} threads and 1",
        ["threads", "contender", "events/s", "p50", "p99", "ours / it"],
    )
    labels = {
        "ours": "SyncAnalyticsClient.track()",
        "raw": "raw sync MULTI per event",
        "old": "old design (pickle + threading.Lock)",
    }
    for threads, suffix in ((str(THREADS), ""), ("1", "/1")):
        mine = s[f"ours{suffix}"]
        for name, label in labels.items():
            if f"{name}{suffix}" not in s:
                continue
            it = s[f"{name}{suffix}"]
            ratio = "" if name == "ours" else fmt_ratio(mine.rate / it.rate)
            section.rows.append([threads, label, fmt_rate(it.rate), fmt_ms(it.p50), fmt_ms(it.p99), ratio])
    section.data = {name: summary.as_dict() for name, summary in s.items()}
    section.checks = [
        Check("sync track() 1 thread / raw sync pipeline per event", s["ours/1"].rate / s["raw/1"].rate, 1.0),
    ]
    section.notes.append(f"no target is set for {THREADS} threads; the ratio is printed for the record")
    return section
