"""Stalls, shutdowns and leases: 21 (Redis paused for seconds under a draining worker), 22 (a worker
SIGTERMed under a large backlog), 23 (a worker SIGKILLed: its batches back within a short visibility
timeout), 24 (a transaction longer than the visibility timeout keeps its lease: the heartbeat)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from helpers import wait_for_sync

from analytics_sdk import Settings
from analytics_sdk._queue import QueueKeys

from .conftest import Fleet
from .ledger import Ledger, collect, quiesce
from .producer import Production, produce
from .test_protocol_faults import _cli_flush, _summary_of
from .tools import TableLock, backlog, drive_until, in_flight, lock_waiters, rows, seed, stats

pytestmark = pytest.mark.faults

SUCCEEDED = r"flush_analytics_events\[[^\]]+\] succeeded"


def _leases(settings: Settings) -> dict[str, float]:
    keys = QueueKeys(settings.analytics_key_prefix)
    with redis.Redis.from_url(settings.redis_dsn, socket_timeout=10) as r:
        return {m.decode(): s for m, s in r.zrange(keys.leases, 0, -1, withscores=True)}


def _drain_all(settings: Settings, timeout: float) -> None:
    """Run the product's drain (with the scenario's own visibility timeout, not a shortened one)
    until nothing is queued or leased."""
    from bridge.drain import drain

    deadline = time.monotonic() + timeout
    while backlog(settings) != (0, 0):
        assert time.monotonic() < deadline, f"not drained within {timeout}s: {backlog(settings)}"
        asyncio.run(drain(settings))


def _check(settings: Settings, ledger: Ledger) -> None:
    asyncio.run(quiesce(settings))
    outcome = asyncio.run(collect(settings))
    outcome.check(ledger)
    assert outcome.dead == [], "no fault here is the events': nothing may be dead-lettered"


@pytest.fixture
def cli_processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait(10)


@pytest.mark.timeout(240)
def test_21_redis_paused_under_a_draining_worker(fault_settings: Settings, fleet: Fleet) -> None:
    """`CLIENT PAUSE 3000 ALL` three times while producers track and a worker drains a backlog. The
    drain's acks and releases fail during a pause; they must be finished as soon as Redis answers,
    so that nothing waits out the visibility timeout (120 s here): within a minute of the last pause
    nothing is queued or in flight."""
    settings = fault_settings.replace(
        analytics_visibility_timeout=120.0,
        analytics_task_time_limit=100.0,
        analytics_task_soft_time_limit=90.0,
        analytics_drain_time_budget=5.0,
        analytics_redis_timeout=1.0,
        analytics_publish_retries=2,
        analytics_insert_batch_size=1_000,
    )
    ledger = seed(settings, 60_000, chunk=5_000)
    worker = fleet.worker(settings)
    fleet.beat(settings.replace(analytics_flush_interval=1.0))
    wait_for_sync(lambda: rows(settings) > 0, timeout=30, message="the worker starts draining")

    production: list[Production] = []
    producing = threading.Thread(
        target=lambda: production.append(asyncio.run(produce(settings, coroutines=4, duration=14.0))),
        name="producers",
    )
    producing.start()
    pauses = 0
    admin = redis.Redis.from_url(settings.redis_dsn, socket_timeout=10)
    try:
        for _ in range(3):
            wait_for_sync(lambda: backlog(settings)[1] > 0, timeout=20, message="a drain holds leases")
            admin.execute_command("CLIENT", "PAUSE", 3000, "ALL")
            pauses += 1
            admin.ping()  # answered once the pause ends
            time.sleep(1.0)  # let the drains run a moment between pauses
    finally:
        admin.close()
        producing.join(60)
    answering_again = time.monotonic()
    assert pauses == 3
    [made] = production
    assert not made.errors, made.errors[:5]
    ledger.accept(made.accepted)
    ledger.refuse(made.refused)

    wait_for_sync(
        lambda: backlog(settings) == (0, 0),
        timeout=60,
        interval=0.5,
        message="nothing queued or in flight within a minute of Redis answering again "
        f"(leases {_leases(settings)})",
    )
    settled_after = time.monotonic() - answering_again
    assert worker.alive()
    hit = worker.count(r"Redis did not answer|TimeoutError|Timeout reading")
    assert hit, f"no pause caught a drain at work: the scenario did not run\n{worker.log()[-3000:]}"
    fleet.close()
    _check(settings, ledger)
    print(f"scenario 21: quiet {settled_after:.1f}s after the last pause; {len(made.accepted)} tracked")


@pytest.mark.timeout(180)
def test_22_sigterm_under_a_large_backlog(fault_settings: Settings, fleet: Fleet) -> None:
    """SIGTERM (a container's stop) while a worker drains 200k events with a budget that would let it
    drain them all: it stops claiming, commits and acks the transaction in hand, releases what it
    claimed ahead and exits within its bound; a new drain takes the released batches at once,
    whatever the visibility timeout."""
    total = 200_000
    settings = fault_settings.replace(
        analytics_visibility_timeout=400.0,
        analytics_task_time_limit=300.0,
        analytics_task_soft_time_limit=240.0,
        analytics_drain_time_budget=200.0,
    )
    step = settings.analytics_insert_batch_size
    ledger = seed(settings, total, chunk=5_000)
    worker = fleet.worker(settings)
    fleet.send_flush(settings)
    wait_for_sync(lambda: rows(settings) >= step, timeout=30, message="the worker drains")
    before = rows(settings)
    os.kill(worker.pid, signal.SIGTERM)  # the main process, as docker stop / kubelet do
    stopped = time.monotonic()
    try:
        worker.process.wait(30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker did not exit within 30 s of SIGTERM:\n{worker.log()[-3000:]}")
    took = time.monotonic() - stopped
    after = rows(settings)
    queued, _ = backlog(settings)
    leases = _leases(settings)
    print(f"scenario 22: exited {took:.1f}s after SIGTERM; rows {before} -> {after}; queued {queued}")
    assert after - before <= 3 * step, f"it kept claiming after SIGTERM: rows {before} -> {after}"
    assert queued > 0
    assert all(score == 0 for score in leases.values()), f"leases left to expire: {leases}"
    assert after + queued + in_flight(settings) == total
    assert "drains stop claiming" in worker.log()
    # The released batches come back at once: no shortened visibility timeout needed.
    _drain_all(settings, timeout=90)
    _check(settings, ledger)
    assert rows(settings) == total


@pytest.mark.timeout(180)
def test_23_sigkill_batches_back_within_a_short_visibility_timeout(
    fault_settings: Settings, fleet: Fleet
) -> None:
    """A worker killed mid-drain (OOM killer, a node lost). With a visibility timeout of 3 s (and a
    task time limit of a minute: the heartbeat, not the time limit, keeps live leases), another
    worker has its batches back within that timeout plus a few seconds."""
    visibility = 3.0
    settings = fault_settings.replace(
        analytics_visibility_timeout=visibility,
        analytics_redis_timeout=1.0,
        analytics_task_time_limit=60.0,
        analytics_task_soft_time_limit=50.0,
        analytics_insert_batch_size=1_000,
    )
    ledger = seed(settings, 40_000, chunk=5_000)
    doomed = fleet.worker(settings, name="doomed")
    fleet.send_flush(settings)
    wait_for_sync(lambda: rows(settings) >= 2_000, timeout=30, message="the worker drains")
    doomed.kill()  # SIGKILL, main process and pool
    killed = time.monotonic()
    orphans = {batch for batch, score in _leases(settings).items() if score > 0}
    assert orphans, "the kill must leave leases behind for the scenario to mean anything"

    fleet.worker(settings, name="rescuer")
    drive_until(
        lambda: not orphans & set(_leases(settings)),
        lambda: fleet.send_flush(settings),
        timeout=visibility + 15,
        every=0.5,
        message=f"the killed worker's {len(orphans)} lease(s) are taken over and landed",
    )
    back_after = time.monotonic() - killed
    print(f"scenario 23: {len(orphans)} orphaned lease(s) landed {back_after:.1f}s after the kill")
    drive_until(
        lambda: backlog(settings) == (0, 0),
        lambda: fleet.send_flush(settings),
        timeout=60,
        every=1.0,
        message="the rescuer drains the rest",
    )
    fleet.close()
    _check(settings, ledger)
    assert rows(settings) == 40_000


@pytest.mark.timeout(120)
def test_24_heartbeat_keeps_the_lease_of_a_long_transaction(
    fault_settings: Settings, tmp_path: Path, cli_processes: list[subprocess.Popen[bytes]]
) -> None:
    """A drain whose INSERT waits on a table lock for more than twice the visibility timeout (3 s):
    its event loop is free, so its heartbeat renews the lease, and drains running meanwhile take
    nothing over: no reclaim, nothing dead-lettered, one insert of every row."""
    visibility = 3.0
    settings = fault_settings.replace(
        analytics_visibility_timeout=visibility,
        analytics_redis_timeout=1.0,
        analytics_insert_batch_size=1_000,
    )
    ledger = seed(settings, 300)
    keys = QueueKeys(settings.analytics_key_prefix)
    from bridge.drain import drain

    lock = TableLock(settings.database_url)
    with lock:
        log = tmp_path / "long-drain.log"
        slow = _cli_flush(settings, log)
        cli_processes.append(slow)
        wait_for_sync(lambda: lock_waiters(settings) >= 1, timeout=30, message="the insert waits on the lock")
        assert len(_leases(settings)) == 3, "three claims of 100, one transaction"
        # Release the lock from a timer: a drain that (wrongly) takes the batch over blocks on it too.
        timer = threading.Timer(2.5 * visibility, lock.release)
        timer.start()
        try:
            attempts = []
            while timer.is_alive():
                attempts.append(asyncio.run(drain(settings)).as_dict())
                time.sleep(0.25)
        finally:
            timer.cancel()
            lock.release()
    assert len(attempts) >= 10, attempts
    assert all(a["reclaimed"] == 0 and a["claimed"] == 0 for a in attempts), attempts
    assert slow.wait(30) == 0, log.read_text()
    first = _summary_of(log)
    assert first["inserted"] == 300 and first["batches"] == 3, first  # its three acks all landed
    assert "taken over" not in log.read_text()
    with redis.Redis.from_url(settings.redis_dsn) as r:
        assert r.hgetall(keys.reclaims) == {}, "nothing was ever taken over"
        assert r.hgetall(keys.owners) == {}, "all acked by their first owner"
    final = stats(settings)
    assert int(final["inserted"]) == 300 and int(final.get("duplicates", 0)) == 0, final
    _check(settings, ledger)
