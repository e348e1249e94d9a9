"""Drains racing each other: 9 (one task delivered twice at once, two beats), 10 (beat at 1 s racing
flush_events_now() and the CLI flush), 11 (four concurrent drainers over 100,000 events)."""

from __future__ import annotations

import asyncio
import multiprocessing
import re
import subprocess
import sys
import time
import uuid
from typing import Any

import pytest
from celery import Celery
from helpers import wait_for_sync

from analytics_sdk import AnalyticsClient, Settings
from analytics_sdk._sender import FLUSH_QUEUE, FLUSH_TASK

from .conftest import Fleet
from .ledger import Ledger, collect, quiesce
from .tools import backlog, drive_until, rows, seed, stats
from .workers import REPO_ROOT, settings_env

pytestmark = pytest.mark.faults

SUCCEEDED = r"flush_analytics_events\[{}\] succeeded"


def _settle(settings: Settings, fleet: Fleet, ledger: Ledger) -> dict[str, str]:
    fleet.close()
    asyncio.run(quiesce(settings))
    outcome = asyncio.run(collect(settings))
    outcome.check(ledger)
    return outcome.stats


def _assert_disjoint(final_stats: dict[str, str], ledger: Ledger) -> None:
    # Had two drains ever claimed the same event, the second insert would have hit ON CONFLICT.
    assert int(final_stats.get("duplicates", 0)) == 0, final_stats
    assert int(final_stats.get("inserted", 0)) == len(ledger.accepted), final_stats


@pytest.mark.timeout(180)
def test_09_same_task_delivered_twice_and_two_beats(fault_settings: Settings, fleet: Fleet) -> None:
    # 100 rows per transaction, each held 20 ms before its commit: 30,000 seeded events keep a drain
    # busy for seconds, long enough for both deliveries and the beats' ticks to overlap (a drain with
    # nothing slowing it empties the queue in well under a second, before the second delivery runs).
    settings = fault_settings.replace(
        analytics_flush_interval=1.0, analytics_batch_size=100, analytics_insert_batch_size=100
    )
    ledger = seed(settings, 30_000)
    worker = fleet.worker(settings, concurrency=2, failpoints="before_commit=sleep:0.02")
    # Two beats: the schedule doubled, as the design warns against. Both must be ticking before the
    # duplicated task goes out, so beat ticks and both deliveries race over the same queue.
    beats = [fleet.beat(settings, name="beat-a"), fleet.beat(settings, name="beat-b")]
    wait_for_sync(
        lambda: all(b.count(r"Sending due task") >= 1 for b in beats), timeout=30, message="both beats tick"
    )
    # The very same task message twice (same id, as a broker redelivery or a double send would do).
    app = Celery("faults-09", broker=settings.broker_dsn, set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"])
    task_id = str(uuid.uuid4())
    try:
        for _ in range(2):
            app.send_task(FLUSH_TASK, queue=FLUSH_QUEUE, task_id=task_id)
    finally:
        app.close()

    def drains() -> list[tuple[str, int]]:
        return [
            (pool, int(claimed))
            for pool, claimed in re.findall(
                r"ForkPoolWorker-(\d+)\] drained \S+: claimed=(\d+)", worker.log()
            )
        ]

    # Keep feeding the queue while the two deliveries drain and after, so the beats' ticks find work:
    # every tick is one more drain racing the others. How long the deliveries take depends on the
    # machine, so feed until the worker has logged both deliveries and at least two ticks with work,
    # and both pool processes have claimed something (bounded), rather than for a fixed time.
    async def feed() -> None:
        deadline = time.monotonic() + 90
        async with AnalyticsClient(settings) as client:
            for round_ in range(100_000):
                batch = [{"event_type": "fed", "event_metadata": {"r": round_, "k": k}} for k in range(100)]
                ledger.accept(await client.track_many(batch))
                await asyncio.sleep(0.02)
                worked = [pool for pool, claimed in drains() if claimed > 0]
                if round_ % 25 == 0 and (
                    (len(worked) >= 4 and len(set(worked)) == 2) or time.monotonic() > deadline
                ):
                    return

    asyncio.run(feed())
    wait_for_sync(
        lambda: backlog(settings) == (0, 0) and worker.count(SUCCEEDED.format(task_id)) == 2,
        timeout=120,
        message="both deliveries ran and the queue is empty",
    )
    # Both pool processes really drained (claimed something), so the claims had to be disjoint.
    done = drains()
    assert len({pool for pool, claimed in done if claimed > 0}) == 2, worker.log()[-3000:]
    assert sum(1 for _, claimed in done if claimed > 0) >= 4, done  # the deliveries + beat ticks
    _assert_disjoint(_settle(settings, fleet, ledger), ledger)
    assert rows(settings) == len(ledger.accepted)


def _cli_flush(settings: Settings) -> subprocess.Popen[bytes]:
    env = settings_env(settings)
    return subprocess.Popen(
        [sys.executable, "-m", "bridge", "flush", "--json"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.mark.timeout(180)
def test_10_beat_racing_flush_now_and_cli_flush(fault_settings: Settings, fleet: Fleet) -> None:
    settings = fault_settings.replace(analytics_flush_interval=1.0, analytics_batch_size=50)
    worker = fleet.worker(settings, concurrency=2)
    fleet.beat(settings)
    ledger = Ledger()
    cli_runs: list[subprocess.Popen[bytes]] = []

    async def produce_and_flush() -> int:
        flushes = 0
        async with AnalyticsClient(settings) as client:
            i = 0
            while i < 10_000:  # ~5 s: 200 rounds of 50, a flush_events_now() every 10, a CLI every 40
                ids = await client.track_many(
                    [{"event_type": "race", "event_metadata": {"i": i + k}} for k in range(50)]
                )
                ledger.accept(ids)
                i += 50
                if i % 500 == 0:
                    await client.flush_events_now()
                    flushes += 1
                if i % 2_000 == 0 and len(cli_runs) < 6:
                    cli_runs.append(_cli_flush(settings))
                await asyncio.sleep(0.02)
        return flushes

    try:
        flushes = asyncio.run(produce_and_flush())
        outputs = [p.communicate(timeout=60) for p in cli_runs]
    finally:
        for p in cli_runs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    assert flushes == 20 and len(cli_runs) == 5
    for process, (out, err) in zip(cli_runs, outputs, strict=True):
        assert process.returncode == 0, err.decode()[-2000:]
    drive_until(
        lambda: backlog(settings) == (0, 0),
        lambda: None,
        timeout=60,
        message="beat drains the rest",
    )
    assert worker.count(r"flush_analytics_events\[[^\]]+\] succeeded") >= flushes
    _assert_disjoint(_settle(settings, fleet, ledger), ledger)
    assert rows(settings) == len(ledger.accepted)


def _drain_in_process(settings: Settings, start_at: float, queue: Any) -> None:
    from bridge.drain import drain

    time.sleep(max(0.0, start_at - time.time()))  # a common start: the four drain at once
    summary = asyncio.run(drain(settings, time_budget=120))
    queue.put(summary.as_dict())


@pytest.mark.timeout(240)
def test_11_four_concurrent_drainers_over_100k_events(fault_settings: Settings) -> None:
    settings = fault_settings.replace(analytics_batch_size=500, analytics_insert_batch_size=2_000)
    ledger = seed(settings, 100_000)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter each: no loop or socket shared
    results = context.Queue()
    start_at = time.time() + 3.0
    drainers = [
        context.Process(target=_drain_in_process, args=(settings, start_at, results)) for _ in range(4)
    ]
    for p in drainers:
        p.start()
    try:
        summaries = [results.get(timeout=180) for _ in drainers]
        for p in drainers:
            p.join(30)
            assert p.exitcode == 0
    finally:
        for p in drainers:
            if p.is_alive():
                p.kill()
                p.join(10)
    claimed = [s["claimed"] for s in summaries]
    assert sum(claimed) == 100_000, summaries
    assert sum(1 for c in claimed if c > 0) >= 2, f"the drains did not overlap: {claimed}"
    assert sum(s["duplicates"] for s in summaries) == 0, summaries
    assert sum(s["inserted"] for s in summaries) == 100_000, summaries
    asyncio.run(quiesce(settings))
    outcome = asyncio.run(collect(settings))
    outcome.check(ledger)
    _assert_disjoint(stats(settings), ledger)
