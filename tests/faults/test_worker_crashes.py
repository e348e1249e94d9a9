"""Workers that die: 1 (after claim), 2 (after COMMIT), 3 (hard time limit mid-insert), 4 (pool process
killed while awaiting asyncpg), 13 (a batch that crashes its worker every time), 16 (50 tasks in a row
in one pool process)."""

from __future__ import annotations

import asyncio
import os
import re
import signal

import pytest
from helpers import wait_for_sync

from analytics_sdk import Settings

from .conftest import Fleet
from .ledger import Ledger, collect, event_id_of, quick, quiesce
from .tools import TableLock, backlog, db_fetchval, drive_until, in_flight, lock_waiters, rows, seed, stats

pytestmark = pytest.mark.faults

SIGKILLED = r"signal 9 \(SIGKILL\)"
LOOP_ERRORS = r"attached to a different loop|Event loop is closed|different event loop|Future .* attached"


def _settle(settings: Settings, fleet: Fleet, ledger: Ledger) -> dict[str, int]:
    """Stop every worker, quiesce, check I1-I4; returns the quiesce drains' counters."""
    fleet.close()
    totals = asyncio.run(quiesce(settings))
    outcome = asyncio.run(collect(settings))
    outcome.check(ledger)
    return totals


def _crash_then_recover(
    settings: Settings, fleet: Fleet, failpoint: str, count: int = 500
) -> tuple[Ledger, int]:
    """Seed, let a worker armed with ``failpoint`` die on its first batch, then recover with a clean
    one; returns the ledger and the rows the dead drain had committed."""
    ledger = seed(settings, count)
    doomed = fleet.worker(settings, failpoints=failpoint, name="doomed")
    fleet.send_flush(settings)
    wait_for_sync(lambda: doomed.count(SIGKILLED) >= 1, timeout=30, message=f"{failpoint} kills the pool")
    doomed.kill()
    queued, leases = backlog(settings)
    # The drain pipelines one group ahead, so one or two groups are left leased; none acked.
    assert 1 <= leases <= 2, "the dead drain's batches must still be leased"
    assert queued + in_flight(settings) == count
    committed = rows(settings)
    healthy = fleet.worker(settings, name="healthy")
    drive_until(
        lambda: backlog(settings) == (0, 0),
        lambda: fleet.send_flush(settings),
        timeout=60,
        message="the healthy worker drains and reclaims",
    )
    assert healthy.count(LOOP_ERRORS) == 0
    return ledger, committed


@pytest.mark.timeout(120)
def test_01_worker_killed_after_claim_before_insert(fault_settings: Settings, fleet: Fleet) -> None:
    settings = quick(fault_settings, 3.0).replace(analytics_insert_batch_size=100)
    ledger, committed = _crash_then_recover(settings, fleet, "after_claim=kill")
    assert committed == 0
    before = stats(settings)
    _settle(settings, fleet, ledger)
    assert rows(settings) == len(ledger.accepted)
    # Nothing was inserted before the kill: the reclaimed batch went in fresh, no ON CONFLICT.
    assert int(before.get("duplicates", 0)) == 0
    assert int(before.get("inserted", 0)) == len(ledger.accepted)


@pytest.mark.timeout(120)
def test_02_worker_killed_after_commit_before_ack(fault_settings: Settings, fleet: Fleet) -> None:
    settings = quick(fault_settings, 3.0).replace(analytics_insert_batch_size=100)
    ledger, committed = _crash_then_recover(settings, fleet, "after_commit=kill")
    assert committed == settings.analytics_insert_batch_size  # one transaction committed, not acked
    after = stats(settings)
    _settle(settings, fleet, ledger)
    assert rows(settings) == len(ledger.accepted)
    # The committed-but-unacked batch was redelivered: ON CONFLICT really skipped it, every row of it.
    assert int(after.get("duplicates", 0)) == committed
    assert int(after.get("inserted", 0)) == len(ledger.accepted) - committed


@pytest.mark.timeout(150)
def test_03_hard_time_limit_mid_insert(fault_settings: Settings, fleet: Fleet) -> None:
    # soft limit 1.5 s, hard 2.5 s, visibility 4 s; one claim of 100 per transaction.
    settings = fault_settings.replace(
        analytics_task_soft_time_limit=1.5,
        analytics_task_time_limit=2.5,
        analytics_visibility_timeout=4.0,
        analytics_insert_batch_size=100,
    )
    ledger = seed(settings, 300)

    # (a) The insert waits on our table lock past both limits. The soft limit (SIGUSR1) lands in the
    # event loop's select(): the drain is cancelled, its transaction rolled back, its batch kept.
    first = fleet.worker(settings, name="locked")
    with TableLock(settings.database_url):
        fleet.send_flush(settings)
        wait_for_sync(lambda: lock_waiters(settings) >= 1, timeout=30, message="the insert blocks")
        wait_for_sync(
            lambda: first.count(r"SoftTimeLimitExceeded") >= 1, timeout=30, message="the soft limit fires"
        )
        assert backlog(settings)[1] >= 1, "the timed-out batch must stay leased"
    assert rows(settings) == 0
    first.kill()

    # (b) The same insert stuck where no signal handler can run (a fail point that blocks SIGUSR1
    # and SIGTERM with the transaction open, rows sent): only the hard limit's SIGKILL ends it.
    hung = fleet.worker(settings, failpoints="before_commit=hang:60", name="hung")
    [pool_before] = hung.pool_pids()
    fleet.send_flush(settings)
    wait_for_sync(
        lambda: hung.count(r"Hard time limit \(2\.5s\) exceeded") >= 1,
        timeout=30,
        message="the hard time limit kills the drain mid-insert",
    )
    wait_for_sync(
        lambda: hung.pool_pids() not in ([], [pool_before]),
        timeout=30,
        message="the pool process is replaced",
    )
    hung.kill()
    assert rows(settings) == 0, "a transaction killed before COMMIT must leave no row"

    healthy = fleet.worker(settings, name="healthy")
    drive_until(
        lambda: backlog(settings) == (0, 0),
        lambda: fleet.send_flush(settings),
        timeout=60,
        message="a later drain lands the timed-out batches",
    )
    assert not re.search(LOOP_ERRORS, healthy.log()), healthy.log()[-3000:]
    final = stats(settings)
    _settle(settings, fleet, ledger)
    outcome = asyncio.run(collect(settings))
    assert outcome.dead == [], "a time limit is not a data error: nothing may be dead-lettered"
    assert int(final.get("duplicates", 0)) == 0 and int(final.get("inserted", 0)) == len(ledger.accepted)


@pytest.mark.timeout(120)
def test_04_pool_process_killed_while_awaiting_asyncpg(fault_settings: Settings, fleet: Fleet) -> None:
    settings = quick(fault_settings, 4.0)
    ledger = seed(settings, 300)
    worker = fleet.worker(settings)
    with TableLock(settings.database_url):
        [victim] = worker.pool_pids()
        fleet.send_flush(settings)
        wait_for_sync(lambda: lock_waiters(settings) >= 1, timeout=30, message="the insert awaits asyncpg")
        os.kill(victim, signal.SIGKILL)  # a pool process of the worker this test started
        wait_for_sync(
            lambda: worker.pool_pids() and victim not in worker.pool_pids(),
            timeout=30,
            message="the worker replaces its pool process",
        )
    log_mark = len(worker.log())
    drive_until(
        lambda: backlog(settings) == (0, 0),
        lambda: fleet.send_flush(settings),
        timeout=60,
        message="the next task, on a new process, drains and reclaims",
    )
    # The queue is empty as soon as the last ack lands; the task logs its success a moment later.
    wait_for_sync(
        lambda: re.search(r"flush_analytics_events\[[^\]]+\] succeeded", worker.log()[log_mark:]),
        timeout=30,
        message="the task on the new process succeeds",
    )
    later = worker.log()[log_mark:]
    assert not re.search(LOOP_ERRORS, later), later[-3000:]
    assert not re.search(r"ERROR", later), later[-3000:]
    _settle(settings, fleet, ledger)
    assert rows(settings) == len(ledger.accepted)


@pytest.mark.timeout(180)
def test_13_batch_that_crashes_its_worker_every_time(fault_settings: Settings, fleet: Fleet) -> None:
    settings = quick(fault_settings, 2.0)
    ledger = seed(settings, 300)
    # The poison: the 150th event, in the middle of the second batch of 100.
    with_ids = sorted(ledger.accepted)  # UUIDv7 sort = push order within one millisecond's randomness
    poison = sorted(with_ids)[150]
    worker = fleet.worker(settings, failpoints=f"crash_on_event={poison}")
    drive_until(
        lambda: backlog(settings) == (0, 0),
        lambda: fleet.send_flush(settings),
        timeout=120,
        every=1.0,
        message="the poison batch is bisected and its event dead-lettered",
    )
    crashes = worker.count(SIGKILLED)
    assert crashes >= 2, "the fail point never fired: the scenario did not run"
    assert crashes <= 30, f"{crashes} crashes: a poison loop"
    _settle(settings, fleet, ledger)
    outcome = asyncio.run(collect(settings))
    assert [event_id_of(d["payload"]) for d in outcome.dead] == [poison]
    assert rows(settings) == len(ledger.accepted) - 1


@pytest.mark.timeout(180)
def test_16_fifty_tasks_in_one_pool_process(fault_settings: Settings, fleet: Fleet) -> None:
    settings = fault_settings
    worker = fleet.worker(settings, concurrency=1)
    [pool_pid] = worker.pool_pids()
    ledger = Ledger()
    connections = []
    count_sql = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    for n in range(50):
        ledger.merge(seed(settings, 20, event_type=f"round-{n}"))
        fleet.send_flush(settings)
        wait_for_sync(
            lambda n=n: worker.count(r"flush_analytics_events\[[^\]]+\] succeeded") >= n + 1,
            timeout=30,
            message=f"task {n + 1} of 50 succeeds",
        )
        connections.append(int(db_fetchval(settings, count_sql)))
    assert worker.pool_pids() == [pool_pid], "the pool process was replaced: not one process for all"
    log = worker.log()
    assert not re.search(LOOP_ERRORS, log), log[-3000:]
    assert not re.search(r"Traceback|ERROR", log), log[-3000:]
    # Each task closes its connection before it returns: none accumulates across tasks.
    assert max(connections) <= 1, connections
    assert connections[-1] == 0 or connections[-1] <= connections[0], connections
    assert backlog(settings) == (0, 0)
    _settle(settings, fleet, ledger)
    assert rows(settings) == 50 * 20
