"""`analytics-bridge` (also `python -m bridge`): operator commands for the queue and the table.

    analytics-bridge migrate [--sql | --check]     create the database (if missing), upgrade the table
    analytics-bridge status [--json] [--check]     queue, in-flight batches, dead letters, last flush, rows
    analytics-bridge flush [--json]                drain now, inline, with the code the Celery task runs
    analytics-bridge dead-letters list|replay|purge
    analytics-bridge partitions [--json] | partitions maintain [--dry-run]   time partitions, retention
    analytics-bridge demo                          the end-to-end demo (`nox -s demo`)
    analytics-bridge wire-schema                   the JSON Schema of queued events (docs/wire-format.md)

Configuration comes from the same ``ANALYTICS_*`` variables as the SDK and the worker. Logs go to
stderr, results to stdout, so ``--json`` output can be piped. Exit codes: 0 done, 1 the operation
failed (e.g. a read-only database: the events wait in flight) or ``status --check`` found the queue
stuck, 2 bad configuration (a setting, the credentials, a missing database or table: run ``migrate``;
Redis < 7.0) or a service unreachable.
"""

from __future__ import annotations

import logging
import sys

import click
import msgspec

from analytics_sdk._exceptions import ConfigurationError
from analytics_sdk._settings import Settings

from . import _handler as _cli_errors
from . import _migrate as _cli_migrate
from . import _status as _cli_status
from ._check import stuck_reasons
from ._dead_commands import dead_letters
from ._partitions import partitions
from ._wire_schema import wire_schema

__all__ = ["main"]

logger = logging.getLogger(__name__)

START_REDIS = _cli_status.START_REDIS
START_POSTGRES = _cli_status.START_POSTGRES
Unreachable = _cli_errors.Unreachable
_run = _cli_errors.run


def _settings(ctx: click.Context) -> Settings:
    settings: Settings = ctx.obj
    return settings


def _echo_json(data: object) -> None:
    click.echo(msgspec.json.format(msgspec.json.encode(data), indent=2).decode())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default="INFO",
    show_default=True,
    help="Level of the log lines written to stderr.",
)
@click.pass_context
def main(ctx: click.Context, log_level: str) -> None:
    """Operate the analytics bridge: the Redis queue, the drain and the events table.

    Configured by the ANALYTICS_* environment variables (docs/configuration.md).
    """
    logging.basicConfig(
        level=log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        ctx.obj = Settings.from_env()
    except ConfigurationError as exc:
        raise click.UsageError(f"bad configuration: {exc}") from exc


main.add_command(_cli_migrate.migrate)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--check", is_flag=True, help="Exit 1 when the queue is stuck (for probes and cron alerts).")
@click.pass_context
def status(ctx: click.Context, as_json: bool, check: bool) -> None:
    """Queue depth and age, in-flight batches, dead letters, drops, last flush, rows.

    Exits 2 when Redis or PostgreSQL is unreachable, refuses the credentials, or the database is
    missing or not migrated (the figures of the reachable one are still shown, with what to do);
    warnings alone exit 0. With --check it exits 1 when the queue is stuck: events or batches wait
    and no drain has finished or held a fresh lease within 3 flush intervals (dead letters, drops and
    a full queue do not count: alert on those with the metrics).
    """
    settings = _settings(ctx)
    result = _run(_cli_status.collect_status(settings), settings)
    failed = _cli_status.status_failed(result)
    stuck = stuck_reasons(result) if check and "queue" in result else []
    if as_json:
        extra = {"stuck": stuck} if check else {}
        _echo_json({**result, "warnings": _cli_status.warnings_for(result), **extra})
    else:
        click.echo(_cli_status.render_status(result))
        for reason in stuck:
            click.echo(f"STUCK: {reason}")
    if failed:
        ctx.exit(2)
    if stuck:
        ctx.exit(1)


@main.command()
@click.option(
    "--time-budget", type=float, default=None, help="Seconds to keep claiming (default: the setting)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the drain summary as JSON.")
@click.pass_context
def flush(ctx: click.Context, time_budget: float | None, as_json: bool) -> None:
    """Drain the queue into PostgreSQL now, inline, with the same drain() the Celery task runs."""
    from ._flush import run_flush

    settings = _settings(ctx)
    summary = _run(run_flush(settings, time_budget=time_budget, show_progress=not as_json), settings)
    if as_json:
        _echo_json(summary)
    else:
        click.echo(", ".join(f"{k} {v}" for k, v in summary.items()))
    if summary.get("dead_lettered"):
        click.echo(
            f"{summary['dead_lettered']} event(s) were dead-lettered: `analytics-bridge dead-letters list`",
            err=True,
        )


main.add_command(dead_letters)


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def demo(ctx: click.Context) -> None:
    """Run the end-to-end demo (same as `nox -s demo`); `demo --help` for its options."""
    from ..demo import main as demo_main

    demo_main.main(args=ctx.args, prog_name="analytics-bridge demo")


@main.command()
@click.option("--port", type=click.IntRange(0, 65535), default=9808, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: all).")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Seconds each backend may take per scrape before its up gauge reads 0.",
)
@click.pass_context
def metrics(ctx: click.Context, port: int, host: str, timeout: float) -> None:
    """Serve Prometheus metrics of the queue and the table on http://HOST:PORT/metrics.

    Every scrape reads Redis and PostgreSQL afresh (the figures of `status`); a backend that is down
    reads analytics_backend_up 0 and the scrape still succeeds. Runs until SIGTERM or Ctrl-C.
    """
    from ._metrics import serve  # prometheus_client: only this command needs it

    try:
        serve(_settings(ctx), host=host, port=port, timeout=timeout)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc}") from exc


main.add_command(wire_schema)
main.add_command(partitions)
