"""``analytics-bridge migrate``: upgrade the table to head, print the SQL, or check the revision.

- ``migrate`` creates the database if the server says it is missing, adopts a database made by a
  release before versioned migrations, runs every revision up to head and creates the partitions of
  the current and the next two intervals (``ANALYTICS_PARTITION_INTERVAL``). Safe to run twice and
  from two processes at once.
- ``migrate --sql`` prints the SQL of the revisions without connecting to any database (for DBAs
  who apply it themselves); ``--from 0001`` for a database made by such an earlier release.
- ``migrate --check`` exits 0 when the database is at head and 1 when it is behind (no database, no
  table, no version table, an older revision), for deploy pipelines: ``migrate --check || migrate``.
  An unreachable server or refused credentials exit 2, as every command does.
"""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
import click

from analytics_sdk._settings import Settings, redact_url

from ..migrations import HEAD
from ..partitions import Interval
from ..schema import TABLE_NAME, asyncpg_dsn, revision_problem
from ._handler import run

__all__ = ["BEHIND", "check_revision", "migrate"]

logger = logging.getLogger(__name__)

#: The exit code of ``migrate --check`` when the database is behind.
BEHIND = 1


def _interval(settings: Settings) -> Interval:
    interval: Interval = settings.analytics_partition_interval  # type: ignore[assignment]  # validated
    return interval


def print_sql(settings: Settings, start: str | None) -> None:
    from ..migrations._run import offline_sql

    click.echo(offline_sql(_interval(settings), start=start), nl=False)


async def check_revision(settings: Settings) -> str | None:
    """Why the database is behind head, or None when it is at head."""
    try:
        conn: asyncpg.Connection[Any] = await asyncpg.connect(asyncpg_dsn(settings.database_url), timeout=10)
    except asyncpg.InvalidCatalogNameError:
        return "the database does not exist: run `analytics-bridge migrate` (it creates it)"
    try:
        if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", TABLE_NAME):
            return f"table {TABLE_NAME} does not exist: run `analytics-bridge migrate`"
        return await revision_problem(conn)
    finally:
        await conn.close()


async def run_migrate(settings: Settings) -> list[str]:
    from ..schema import migrate

    return await migrate(settings.database_url, interval=_interval(settings))


def report_check(settings: Settings, problem: str | None) -> int:
    shown = redact_url(settings.database_url)
    if problem is None:
        click.echo(f"{shown} is at head (revision {HEAD})")
        return 0
    click.echo(f"{shown} is behind revision {HEAD}: {problem}")
    return BEHIND


def report_migrated(settings: Settings, made: list[str]) -> None:
    shown = redact_url(settings.database_url)
    logger.info("migrated %s", shown)
    click.echo(f"migrated {shown} to revision {HEAD}")
    if made:
        click.echo(f"created partitions: {', '.join(made)}")


@click.command()
@click.option("--sql", is_flag=True, help="Print the SQL instead of running it (no database is touched).")
@click.option(
    "--from",
    "start",
    type=click.Choice(["0001"]),
    help="With --sql: the database's revision (0001: made by a release before versioned migrations).",
)
@click.option("--check", is_flag=True, help="Exit 0 at head, 1 when the database is behind; change nothing.")
@click.pass_context
def migrate(ctx: click.Context, sql: bool, start: str | None, check: bool) -> None:
    """Create the database if missing, then upgrade the table to head (idempotent).

    Adopts a database made by a release before versioned migrations, and creates the partitions of
    the current and the next two intervals. Exit codes of --check: 0 at head, 1 behind.
    """
    settings: Settings = ctx.obj
    if sql:
        print_sql(settings, start)
    elif check:
        ctx.exit(report_check(settings, run(check_revision(settings), settings)))
    else:
        report_migrated(settings, run(run_migrate(settings), settings))
