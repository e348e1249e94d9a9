"""`analytics-bridge migrate`: an empty database, twice, two processes at once, our own version table,
adopting the previous release's table, `--sql` (touches nothing) and `--check` (exit codes)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
from click.testing import CliRunner, Result

from analytics_sdk import Settings
from bridge.cli import main
from bridge.cli._migrate import BEHIND
from bridge.migrations import HEAD, VERSION_TABLE
from bridge.migrations._run import MIGRATE_LOCK
from bridge.partitions import bounds, partition_name
from tests.conftest import PG_ADMIN_URL, _admin
from tests.helpers import wait_for
from tests.legacy import catalog, fetch, make_legacy, scratch_database, upgrade_to

ROOT = Path(__file__).resolve().parent.parent


def invoke(url: str, *args: str, **env: str) -> Result:
    environ = {"ANALYTICS_DATABASE_URL": url, "ANALYTICS_BACKLOG_TRIGGER": "0", **env}
    return CliRunner().invoke(main, ["migrate", *args], env=environ, catch_exceptions=False)


async def _state(url: str) -> tuple[str | None, list[str]]:
    """(our revision, the partitions of analytics_events)."""
    conn = await asyncpg.connect(url)
    try:
        version = None
        if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", VERSION_TABLE):
            version = await conn.fetchval(f"SELECT version_num FROM {VERSION_TABLE}")
        parts = await conn.fetch(
            "SELECT inhrelid::regclass::text AS name FROM pg_inherits "
            "WHERE inhparent = 'analytics_events'::regclass ORDER BY 1"
        )
        return version, [r["name"] for r in parts]
    finally:
        await conn.close()


def _ahead(interval: str = "month") -> list[str]:
    """The partitions migrate makes: the current interval and the next two."""
    moment, names = datetime.now(UTC), []
    for _ in range(3):
        lower, moment = bounds(moment, interval)  # type: ignore[arg-type]
        names.append(partition_name(lower))
    return names


async def test_migrate_creates_the_database_then_is_a_no_op() -> None:
    async with scratch_database("analytics_cli_empty", create=False) as url:
        first = await _run_cli(url)
        assert first.exit_code == 0, first.output
        assert f"to revision {HEAD}" in first.output and "created partitions" in first.output
        assert await _state(url) == (HEAD, sorted(_ahead()))
        before = await catalog(url)
        second = await _run_cli(url)
        assert second.exit_code == 0, second.output
        assert "created partitions" not in second.output
        assert await _state(url) == (HEAD, sorted(_ahead()))
        assert await catalog(url) == before


async def _run_cli(url: str, *args: str, **env: str) -> Result:
    # the command runs asyncio.run: keep it off this test's event loop
    return await asyncio.to_thread(invoke, url, *args, **env)


async def test_partition_interval_setting_shapes_the_partitions_made() -> None:
    async with scratch_database("analytics_cli_week", create=False) as url:
        result = await _run_cli(url, ANALYTICS_PARTITION_INTERVAL="week")
        assert result.exit_code == 0, result.output
        assert await _state(url) == (HEAD, sorted(_ahead("week")))


async def test_two_migrate_processes_at_once_both_succeed_on_a_previous_release_database() -> None:
    """Two real processes (two deploy jobs) on a database with rows to upgrade. The test holds the
    migrate lock until both are waiting for it, so they really run at once: one upgrades, the other
    waits, then finds everything done; every row is kept, once."""
    async with scratch_database("analytics_cli_two") as url:
        await make_legacy(url, 10_000)
        holder = await asyncpg.connect(url)
        try:
            assert await holder.fetchval("SELECT pg_try_advisory_lock($1)", MIGRATE_LOCK)
            env = {**os.environ, "ANALYTICS_DATABASE_URL": url, "ANALYTICS_BACKLOG_TRIGGER": "0"}
            procs = [
                subprocess.Popen(
                    [sys.executable, "-m", "bridge", "migrate"],
                    cwd=ROOT,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for _ in range(2)
            ]
            waiting = (
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND query LIKE 'SELECT pg_try_advisory_lock%' AND pid <> pg_backend_pid()"
            )

            async def both_wait() -> bool:
                return int(await holder.fetchval(waiting)) == 2

            await wait_for(both_wait, timeout=60, message="both migrate processes wait for the lock")
            await holder.execute("SELECT pg_advisory_unlock($1)", MIGRATE_LOCK)
            outputs = [await asyncio.to_thread(p.communicate, timeout=120) for p in procs]
        finally:
            await holder.close()
        for proc, (out, err) in zip(procs, outputs, strict=True):
            assert proc.returncode == 0, out + err
            assert f"to revision {HEAD}" in out and "waiting for it to finish" in err
        assert sum("Running upgrade 0001 -> 0002" in err for _, err in outputs) == 1
        version, parts = await _state(url)
        assert version == HEAD and "analytics_events_legacy" in parts
        (row,) = await fetch(url, "SELECT count(*) AS n, count(DISTINCT id) AS ids FROM analytics_events")
        assert (row["n"], row["ids"]) == (10_000, 10_000)


async def test_an_applications_own_alembic_history_is_never_touched() -> None:
    async with scratch_database("analytics_cli_app") as url:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(
                "CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY);"
                "INSERT INTO alembic_version VALUES ('app_rev_42')"
            )
        finally:
            await conn.close()
        assert (await _run_cli(url)).exit_code == 0
        assert [tuple(r) for r in await fetch(url, "SELECT version_num FROM alembic_version")] == [
            ("app_rev_42",)
        ]
        assert (await _state(url))[0] == HEAD


async def test_sql_prints_the_upgrade_and_touches_nothing() -> None:
    async with scratch_database("analytics_cli_sql", create=False) as missing:
        result = await _run_cli(missing, "--sql")
        assert result.exit_code == 0, result.output
        sql = result.output
        assert f"CREATE TABLE {VERSION_TABLE}" in sql and "PARTITION BY RANGE (created_at)" in sql
        assert "CREATE UNIQUE INDEX CONCURRENTLY" in sql and "ATTACH PARTITION analytics_events_legacy" in sql
        name = missing.rsplit("/", 1)[1]
        assert not await fetch(PG_ADMIN_URL, "SELECT 1 FROM pg_database WHERE datname = $1", name)
    async with scratch_database("analytics_cli_sql_old") as old:
        await make_legacy(old, 100)
        before = await catalog(old)
        result = await _run_cli(old, "--sql", "--from", "0001")
        assert result.exit_code == 0, result.output
        assert f"INSERT INTO {VERSION_TABLE} (version_num) VALUES ('0001')" in result.output
        assert "CREATE TABLE analytics_events (\n    id BIGINT" in result.output  # the new table only
        assert await catalog(old) == before and (await _state_or_none(old)) is None


async def _state_or_none(url: str) -> str | None:
    rows = await fetch(url, "SELECT to_regclass($1)::text AS t", VERSION_TABLE)
    return rows[0]["t"]


async def test_the_sql_printed_upgrades_a_previous_release_database(tmp_path: Path) -> None:
    """What a DBA applies by hand (psql -f) does what migrate does: every row kept, at head."""
    async with scratch_database("analytics_cli_dba") as url:
        await make_legacy(url, 500)
        script = tmp_path / "upgrade.sql"
        script.write_text((await _run_cli(url, "--sql", "--from", "0001")).output)
        applied = subprocess.run(
            ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, "-f", str(script)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert applied.returncode == 0, applied.stderr
        version, parts = await _state(url)
        assert version == HEAD and parts == ["analytics_events_legacy"]
        assert (await fetch(url, "SELECT count(*) AS n FROM analytics_events"))[0]["n"] == 500


async def test_check_exits_1_when_behind_and_0_at_head() -> None:
    async with scratch_database("analytics_cli_check", create=False) as url:
        missing = await _run_cli(url, "--check")
        assert missing.exit_code == BEHIND == 1 and "does not exist" in missing.output
        await _admin_create(url)
        empty = await _run_cli(url, "--check")
        assert empty.exit_code == 1 and "analytics-bridge migrate" in empty.output
        await upgrade_to(url, "0001")
        behind = await _run_cli(url, "--check")
        assert behind.exit_code == 1, behind.output
        assert "is behind revision 0002" in behind.output and "at revision 0001" in behind.output
        assert (await _state(url))[0] == "0001"  # --check changed nothing
        assert (await _run_cli(url)).exit_code == 0
        at_head = await _run_cli(url, "--check")
        assert at_head.exit_code == 0 and f"at head (revision {HEAD})" in at_head.output


async def test_check_says_a_previous_release_database_is_behind() -> None:
    async with scratch_database("analytics_cli_check_old") as url:
        await make_legacy(url, 10)
        result = await _run_cli(url, "--check")
        assert result.exit_code == 1
        assert "release before versioned migrations" in result.output


async def _admin_create(url: str) -> None:
    await _admin(f'CREATE DATABASE "{url.rsplit("/", 1)[1]}"')


def test_migrate_reads_settings_from_the_environment(settings: Settings) -> None:
    result = invoke(settings.database_url, "--sql", ANALYTICS_PARTITION_INTERVAL="fortnight")
    assert result.exit_code == 2 and "ANALYTICS_PARTITION_INTERVAL" in result.output
