"""`analytics-bridge dead-letters list|replay|purge`, across every shard the drains visit.

Each shard keeps its own dead-letter list (a dead letter is written with its batch's ack, on the
batch's shard). The commands visit every shard of every K recorded (in shard order) and keep the
guarantees of :mod:`._dead` per shard: a replay rotates and re-queues within one shard's list and
pushes the event back into *that* shard's queue (its keys share one slot: no CROSSSLOT on a
cluster); a purge removes exactly the entries the operator confirmed, by value, from the shard it
read them on. With one shard the output is what it always was.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, cast

import click
import msgspec
import redis.asyncio as aioredis

from analytics_sdk._queue import QueueKeys
from analytics_sdk._settings import Settings
from analytics_sdk._topology import known_shards, queue_client

from . import _dead as _cli_dead
from . import _handler as _cli_errors

__all__ = ["dead_letters"]

logger = logging.getLogger(__name__)


@asynccontextmanager
async def _shards(settings: Settings) -> AsyncIterator[tuple[aioredis.Redis, tuple[QueueKeys, ...]]]:
    # The cluster client answers these commands like the plain one (see analytics_sdk._topology).
    client = cast("aioredis.Redis", queue_client(settings))
    try:
        yield client, await known_shards(client, settings)
    finally:
        await client.aclose()


def _echo_json(data: object) -> None:
    click.echo(msgspec.json.format(msgspec.json.encode(data), indent=2).decode())


def _where(shards: tuple[QueueKeys, ...]) -> str:
    return shards[0].dead if len(shards) == 1 else f"{len(shards)} shards"


async def list_across(
    client: aioredis.Redis, shards: tuple[QueueKeys, ...], offset: int, limit: int
) -> tuple[int, list[tuple[QueueKeys, dict[str, Any]]]]:
    """(total over the shards, entries offset..offset+limit-1 of the shards' lists laid end to end)."""
    total = 0
    found: list[tuple[QueueKeys, dict[str, Any]]] = []
    for keys in shards:
        want = limit - len(found)
        # LRANGE from where the offset falls in this shard (past its end: nothing); LLEN in any case.
        count, entries = await _cli_dead.list_dead(client, keys, max(0, offset - total), max(want, 1))
        if want > 0:
            found += [(keys, entry) for entry in entries[:want]]
        total += count
    return total, found


@click.group("dead-letters")
def dead_letters() -> None:
    """Events the drain could not insert: list, replay or purge them."""


@dead_letters.command("list")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--width", type=click.IntRange(min=20), default=100, show_default=True, help="Payload shown.")
@click.option("--json", "as_json", is_flag=True, help="Full entries as JSON.")
@click.pass_obj
def dead_list(settings: Settings, limit: int, offset: int, width: int, as_json: bool) -> None:
    """Show dead letters, oldest first (shard by shard): when, why, and the payload (shortened)."""

    async def fetch() -> tuple[tuple[QueueKeys, ...], int, list[tuple[QueueKeys, dict[str, Any]]]]:
        async with _shards(settings) as (client, shards):
            return (shards, *await list_across(client, shards, offset, limit))

    shards, total, entries = _cli_errors.run(fetch(), settings)
    several = len(shards) > 1
    if as_json:
        shown = [{**entry, **({"shard": keys.prefix} if several else {})} for keys, entry in entries]
        _echo_json({"total": total, "offset": offset, "entries": shown})
        return
    click.echo(f"{total} dead letter(s) in {_where(shards)}")
    for index, (keys, entry) in enumerate(entries, start=offset):
        failed_at = entry.get("failed_at")
        when = (
            datetime.fromtimestamp(failed_at, UTC).isoformat(timespec="seconds")
            if isinstance(failed_at, int | float)
            else "?"
        )
        extra = {k: v for k, v in entry.items() if k not in ("payload", "error", "failed_at")}
        shard = f" [{keys.prefix}]" if several else ""
        click.echo(f"#{index}{shard} {when} {entry.get('error', '?')}" + (f" {extra}" if extra else ""))
        click.echo(f"    {_cli_dead.shorten(str(entry.get('payload', '')), width)}")


@dead_letters.command("replay")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Examine at most this many.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
def dead_replay(settings: Settings, limit: int | None, as_json: bool) -> None:
    """Re-validate each dead letter; re-queue what passes now, keep what does not.

    Crash-safe: an entry leaves the dead list only after its event is back in the queue (see
    bridge/cli/_dead.py); each goes back into the queue of the shard it was dead-lettered on. Fix the
    cause first (e.g. raise ANALYTICS_MAX_METADATA_BYTES); events that PostgreSQL itself refused are
    re-queued and, if still refused, dead-lettered again by the drain.
    """

    async def replay() -> _cli_dead.ReplayResult:
        async with _shards(settings) as (client, shards):
            sizes = [int(await client.llen(keys.dead)) for keys in shards]
            total = min(sum(sizes), limit) if limit is not None else sum(sizes)
            result = _cli_dead.ReplayResult()
            with click.progressbar(
                length=total, label="Replaying", file=sys.stderr, hidden=as_json or total == 0
            ) as bar:

                def step(result: _cli_dead.ReplayResult) -> None:
                    bar.update(result.examined - bar.pos)

                for keys, size in zip(shards, sizes, strict=True):
                    left = total - result.examined
                    if size and left > 0:
                        await _cli_dead.replay_dead(
                            client, settings, limit=left, progress=step, keys=keys, result=result
                        )
        if result.kept:
            logger.warning("replay kept %s dead letter(s) that still fail: %s", result.kept, result.reasons)
        logger.info("replay examined %s dead letter(s), re-queued %s", result.examined, result.requeued)
        return result

    result = _cli_errors.run(replay(), settings)
    if as_json:
        _echo_json(result.as_dict())
        return
    click.echo(f"examined {result.examined}, re-queued {result.requeued}, kept {result.kept}")
    for reason, count in sorted(result.reasons.items(), key=lambda item: -item[1]):
        click.echo(f"  kept {count}: {reason}")


@dead_letters.command("purge")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def dead_purge(settings: Settings, yes: bool) -> None:
    """Delete the dead letters present now, on every shard (asks first unless --yes).

    Exactly the entries read before the prompt are deleted, by identity and on the shard they were
    read on: dead letters that arrive, or that a concurrent replay moves, while the prompt is open are
    never touched.
    """

    async def snapshot() -> tuple[tuple[QueueKeys, ...], list[tuple[QueueKeys, list[bytes]]]]:
        async with _shards(settings) as (client, shards):
            return shards, [(keys, await _cli_dead.snapshot_dead(client, keys)) for keys in shards]

    async def purge(confirmed: list[tuple[QueueKeys, list[bytes]]]) -> int:
        async with _shards(settings) as (client, _):
            return sum([await _cli_dead.purge_dead(client, keys, entries) for keys, entries in confirmed])

    shards, read = _cli_errors.run(snapshot(), settings)
    confirmed = [(keys, entries) for keys, entries in read if entries]
    n = sum(len(entries) for _, entries in confirmed)
    if not n:
        click.echo("no dead letters")
        return
    if not yes:
        where = _where(shards)
        click.confirm(f"Delete {n} dead letter(s) from {where}? They cannot be recovered", abort=True)
    removed = _cli_errors.run(purge(confirmed), settings)
    gone = n - removed
    click.echo(
        f"purged {removed} dead letter(s)"
        + (f" ({gone} of those confirmed had been re-queued by a replay meanwhile)" if gone else "")
    )
