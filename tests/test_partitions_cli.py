"""`analytics-bridge partitions [maintain]` and the daily task beat runs, on a partitioned table."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec
import pytest
from celery import Celery
from celery.schedules import crontab
from click.testing import CliRunner, Result

import bridge
from analytics_sdk import Settings
from bridge._maintenance_task import MAINTAIN_BEAT_ENTRY, MAINTAIN_TASK, maintain_partitions
from bridge.celery_app import app as bridge_app
from bridge.cli import main
from bridge.partitions import bounds, ensure_partitions, partition_name
from tests.conftest import run_blocking
from tests.legacy import make_legacy, scratch_database
from tests.partitioned import insert_at, partitioned_database, partitions_of

OLD = datetime(2024, 3, 1, tzinfo=UTC)


@pytest.fixture
def part_url() -> Iterator[str]:
    """A partitioned table with two old monthly partitions, 5 rows in the first, analysed."""

    async def fill(url: str) -> None:
        conn = await asyncpg.connect(url)
        try:
            await ensure_partitions(conn, "month", [OLD, datetime(2024, 4, 2, tzinfo=UTC)])
            await insert_at(conn, "e", [OLD + timedelta(hours=i) for i in range(5)])
            await conn.execute("ANALYZE analytics_events")
        finally:
            await conn.close()

    with partitioned_database() as url:
        run_blocking(fill(url))
        yield url


def invoke(url: str, *args: str, retention: int = 0) -> Result:
    env = {"ANALYTICS_DATABASE_URL": url, "ANALYTICS_RETENTION_DAYS": str(retention)}
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def attached(url: str) -> set[str]:
    async def read() -> set[str]:
        conn = await asyncpg.connect(url)
        try:
            return await partitions_of(conn)
        finally:
            await conn.close()

    return run_blocking(read())


def test_partitions_lists_range_estimated_rows_and_size(part_url: str) -> None:
    result = invoke(part_url, "partitions")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["partition", "range", "rows", "(est.)", "size"]
    assert lines[1].startswith(
        "analytics_events_p20240301  [2024-03-01T00:00:00+00:00, 2024-04-01T00:00:00+00:00)"
    )
    assert lines[1].split()[3] == "5" and lines[1].endswith("kB")
    assert lines[2].startswith("analytics_events_p20240401") and lines[-1].startswith("2 partition(s), ")

    data = msgspec.json.decode(invoke(part_url, "partitions", "--json").stdout)
    assert [(p["name"], p["lower"], p["upper"], p["rows"]) for p in data] == [
        ("analytics_events_p20240301", "2024-03-01T00:00:00+00:00", "2024-04-01T00:00:00+00:00", 5),
        ("analytics_events_p20240401", "2024-04-01T00:00:00+00:00", "2024-05-01T00:00:00+00:00", 0),
    ]
    assert all(p["bytes"] > 0 and p["detach_pending"] is False for p in data)


def test_partitions_on_a_table_not_partitioned_says_to_migrate() -> None:
    async def legacy_heap_listing() -> Any:
        async with scratch_database("analytics_heap") as url:
            await make_legacy(url, 0)  # the previous release's plain heap
            return await asyncio.to_thread(invoke, url, "partitions")

    result = run_blocking(legacy_heap_listing())
    assert result.exit_code == 2
    assert "is not partitioned yet: run `analytics-bridge migrate`" in result.output


def test_maintain_dry_run_changes_nothing_then_maintain_drops(part_url: str) -> None:
    before = attached(part_url)
    now = bounds(datetime.now(UTC), "month")[0]
    ahead = {partition_name(now), partition_name(bounds(now, "month")[1])}

    dry = invoke(part_url, "partitions", "maintain", "--dry-run", retention=30)
    assert dry.exit_code == 0, dry.output
    assert "would drop analytics_events_p20240301" in dry.stdout
    assert "would drop analytics_events_p20240401" in dry.stdout
    assert f"would create {partition_name(now)}" in dry.stdout
    assert attached(part_url) == before

    report = msgspec.json.decode(invoke(part_url, "partitions", "maintain", "--json", retention=30).stdout)
    assert report["dry_run"] is False and report["failed"] == {}
    assert report["dropped"] == ["analytics_events_p20240301", "analytics_events_p20240401"]
    assert ahead <= set(report["created"]) and attached(part_url) == set(report["created"])


def test_maintain_with_retention_off_drops_nothing(part_url: str) -> None:
    result = invoke(part_url, "partitions", "maintain")
    assert result.exit_code == 0, result.output
    assert "retention cutoff: off (ANALYTICS_RETENTION_DAYS=0)" in result.stdout
    assert "drop" not in result.stdout
    assert {"analytics_events_p20240301", "analytics_events_p20240401"} <= attached(part_url)


def test_the_maintenance_task_is_registered_with_beat_daily_on_the_analytics_queue() -> None:
    task = bridge_app.tasks[MAINTAIN_TASK]
    assert type(task).__wrapped__ is maintain_partitions and task.serializer == "json"
    assert bridge_app.amqp.router.route({}, MAINTAIN_TASK)["queue"].name == "analytics"
    entry = bridge_app.conf.beat_schedule[MAINTAIN_BEAT_ENTRY]
    # daily at a wall-clock time: an interval would restart with every beat restart
    assert entry["task"] == MAINTAIN_TASK and entry["schedule"] == crontab(minute=7, hour=3)
    assert entry["options"]["queue"] == "analytics"
    # an application's own app gets it from install too; beat=False leaves its schedule alone
    theirs = Celery("theirs", set_as_current=False)
    bridge.install(theirs)
    assert MAINTAIN_TASK in theirs.tasks and theirs.conf.beat_schedule[MAINTAIN_BEAT_ENTRY] == entry
    bare = Celery("bare", set_as_current=False)
    bridge.install(bare, beat=False)
    assert MAINTAIN_TASK in bare.tasks and bare.conf.beat_schedule == {}


def test_the_task_runs_the_maintenance(part_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANALYTICS_DATABASE_URL", part_url)
    monkeypatch.setenv("ANALYTICS_RETENTION_DAYS", "30")
    result = bridge_app.tasks[MAINTAIN_TASK].apply().get(timeout=60)
    assert result["dropped"] == ["analytics_events_p20240301", "analytics_events_p20240401"]
    assert not {"analytics_events_p20240301", "analytics_events_p20240401"} & attached(part_url)
    assert Settings.from_env().analytics_retention_days == 30
