"""`analytics-bridge partitions [--json]` and `analytics-bridge partitions maintain [--dry-run] [--json]`.

The listing reads the catalog only: each partition's range, its estimated rows (``pg_class.reltuples``,
as fresh as the last ANALYZE or autovacuum: ``?`` for a table never analysed) and its size on disk
(``pg_total_relation_size``: heap, indexes, TOAST). ``maintain`` runs, now, the maintenance beat runs
daily (:mod:`bridge.maintenance`); with ``--dry-run`` it prints what it would create, finalize and drop
and changes nothing. Exit codes are the CLI's: 1 when a partition could not be dropped, 2 when the
table is missing or not partitioned yet (run ``migrate``).
"""

from __future__ import annotations

import asyncpg
import click
import msgspec

from analytics_sdk._settings import Settings

from ..maintenance import MaintenanceReport, Partition, check_partitioned, list_partitions, maintain
from ..schema import asyncpg_dsn
from ._handler import run

__all__ = ["partitions"]


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def render_partitions(found: list[Partition]) -> str:
    if not found:
        return "no partitions"
    header = ("partition", "range", "rows (est.)", "size")
    rows = [
        (
            p.name + (" (detach pending)" if p.detach_pending else ""),
            p.range,
            "?" if p.rows is None else f"{p.rows:,}",
            _size(p.bytes),
        )
        for p in found
    ]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in (header, *rows)]
    total = sum(p.bytes for p in found)
    return "\n".join([*lines, f"{len(found)} partition(s), {_size(total)}"])


def render_report(report: MaintenanceReport) -> str:
    if report.skipped:
        return f"skipped: {report.skipped}"
    cutoff = report.cutoff.isoformat() if report.cutoff else "off (ANALYTICS_RETENTION_DAYS=0)"
    lines = [f"retention cutoff: {cutoff}"]
    for (now, done), names in (
        (("create", "created"), report.created),
        (("finalize the pending detach of", "finalized the pending detach of"), report.finalized),
        (("drop", "dropped"), report.dropped),
    ):
        lines += [(f"would {now} " if report.dry_run else f"{done} ") + name for name in names]
    lines += [f"FAILED to drop {name}: {error}" for name, error in report.failed.items()]
    lines.append(f"{len(report.kept)} existing partition(s) kept")
    return "\n".join(lines)


async def _list(settings: Settings) -> list[Partition]:
    conn = await asyncpg.connect(asyncpg_dsn(settings.database_url))
    try:
        await check_partitioned(conn)
        return await list_partitions(conn)
    finally:
        await conn.close()


def _echo_json(data: object) -> None:
    click.echo(msgspec.json.format(msgspec.json.encode(data), indent=2).decode())


@click.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def partitions(ctx: click.Context, as_json: bool) -> None:
    """List the time partitions of analytics_events: range, estimated rows, size.

    `partitions maintain` runs the daily maintenance now (create ahead, drop what is past the retention).
    """
    if ctx.invoked_subcommand is not None:
        return
    settings: Settings = ctx.obj
    found = run(_list(settings), settings)
    if as_json:
        _echo_json([p.as_dict() for p in found])
    else:
        click.echo(render_partitions(found))


@partitions.command("maintain")
@click.option("--dry-run", is_flag=True, help="Say what would be created and dropped; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def maintain_now(ctx: click.Context, dry_run: bool, as_json: bool) -> None:
    """Create the partitions ahead and drop those wholly older than ANALYTICS_RETENTION_DAYS, now."""
    settings: Settings = ctx.obj
    report = run(maintain(settings, dry_run=dry_run), settings)
    if as_json:
        _echo_json(report.as_dict())
    else:
        click.echo(render_report(report))
    if report.failed:
        ctx.exit(1)
