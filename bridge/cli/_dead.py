"""Dead letters: list, replay, purge.

Replay never takes an entry out of the dead list before its event is safely back in the queue:

1. ``LMOVE dead dead LEFT RIGHT`` rotates the head entry to the tail, atomically. The entry is in the
   list before, during and after the move, so a crash here loses nothing.
2. Its payload is re-validated with the same ``decode`` the drain uses.
3. It passes: ``push`` (the SDK's MULTI RPUSH + LTRIM) puts the event back in the queue, and only then
   ``LREM dead -1 entry`` removes that entry from the tail end. A crash between the two leaves the event
   both queued and still dead-lettered; a later replay queues it again, and the sink's
   ``ON CONFLICT (event_id) DO NOTHING`` turns the two copies into one row. At least once, never lost.
4. It fails again: it simply stays where step 1 put it, with its original reason.

Exactly as many rotations as the list held at the start are made, so each entry present then is
looked at once; dead letters a drain adds meanwhile land at the tail behind them and are not touched.
Run one replay at a time: a second concurrent one is harmless but may queue an event twice (one row).

Purge removes the entries the operator confirmed by identity (their bytes), never by position: a
replay running meanwhile moves entries and drains append new ones, so "the first n" could be dead
letters nobody has seen. A lock shared by replay and purge would also do, but it would have to span a
human prompt and a replay of any length (TTL, renewal, a crashed holder blocking the other command);
removal by value needs no state and holds against any mix of replays, drains and purges.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import redis.asyncio as aioredis

from analytics_sdk._event import decode
from analytics_sdk._exceptions import ValidationError
from analytics_sdk._queue import QueueKeys, push
from analytics_sdk._settings import Settings

__all__ = ["ReplayResult", "list_dead", "purge_dead", "replay_dead", "shorten", "snapshot_dead"]

logger = logging.getLogger(__name__)


def shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def parse_entry(raw: bytes | str) -> dict[str, Any]:
    """A dead-letter record as a dict; an unreadable one is shown as such, never dropped."""
    text = raw.decode("utf-8", "backslashreplace") if isinstance(raw, bytes) else raw
    try:
        entry = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        entry = None
    if not isinstance(entry, dict):
        return {"payload": text, "error": "unreadable dead-letter entry"}
    return entry


async def list_dead(
    client: aioredis.Redis, keys: QueueKeys, offset: int, limit: int
) -> tuple[int, list[dict[str, Any]]]:
    """(total, entries offset..offset+limit-1), oldest first."""
    async with client.pipeline(transaction=False) as pipe:
        pipe.llen(keys.dead)
        pipe.lrange(keys.dead, offset, offset + limit - 1)
        total, raws = await pipe.execute()
    return int(total), [parse_entry(raw) for raw in raws]


@dataclass
class ReplayResult:
    examined: int = 0
    requeued: int = 0
    kept: int = 0
    reasons: dict[str, int] = field(default_factory=dict)  # why the kept ones still fail

    def as_dict(self) -> dict[str, Any]:
        return {
            "examined": self.examined,
            "requeued": self.requeued,
            "kept": self.kept,
            "reasons": self.reasons,
        }


def _revalidate(entry: dict[str, Any], settings: Settings) -> tuple[bytes | None, str]:
    payload = entry.get("payload")
    if not isinstance(payload, str):
        return None, "entry has no payload"
    try:
        event = decode(payload, max_metadata_bytes=settings.analytics_max_metadata_bytes)
    except ValidationError as exc:
        return None, f"{exc.field}: {exc.reason}"
    # Re-encoded in the current wire format; the event_id is kept, so a re-queued duplicate is one row.
    return event.encode(), ""


async def replay_dead(
    client: aioredis.Redis,
    settings: Settings,
    *,
    limit: int | None = None,
    progress: Callable[[ReplayResult], None] | None = None,
    keys: QueueKeys | None = None,
    result: ReplayResult | None = None,
) -> ReplayResult:
    """Re-queue every dead letter (up to ``limit``) of the shard ``keys`` (default: the base prefix's)
    whose payload passes validation now, into that shard's queue; keep the rest. ``result`` carries
    the counts on from an earlier shard."""
    keys = keys or QueueKeys(settings.analytics_key_prefix)
    result = result or ReplayResult()
    examined_before = result.examined
    total = int(await client.llen(keys.dead))
    for _ in range(min(total, limit) if limit is not None else total):
        raw = await client.lmove(keys.dead, keys.dead, "LEFT", "RIGHT")
        if raw is None:
            break  # purged meanwhile
        result.examined += 1
        encoded, reason = _revalidate(parse_entry(raw), settings)
        if encoded is None:
            result.kept += 1
            result.reasons[reason] = result.reasons.get(reason, 0) + 1
        else:
            pushed = await push(client, keys, [encoded], settings.analytics_max_queue_size)
            if pushed.dropped:
                logger.warning(
                    "re-queued a dead letter into a full queue: the cap dropped %s event(s)", pushed.dropped
                )
            # From the tail end: where step 1 put it (newer arrivals may sit behind it, never equal).
            await client.lrem(keys.dead, -1, raw)  # type: ignore[arg-type]  # bytes are fine at runtime
            result.requeued += 1
        if progress is not None:
            progress(result)
    if result.examined > examined_before:
        logger.info("replay of %s: %s dead letter(s) examined so far", keys.dead, result.examined)
    return result


# KEYS: dead. ARGV: the entries the operator confirmed, as bytes. Each is removed once, by value and
# wherever it is now: a concurrent replay rotates entries to the tail and drains append new ones, so a
# position says nothing about what the operator saw. An entry gone already (replayed meanwhile) removes
# nothing. LREM count 1 scans from the head, where the oldest, confirmed entries normally are.
# allow-oom: purging is how an operator frees memory; it must run when Redis is full.
_PURGE = """#!lua flags=allow-oom
local removed = 0
for i = 1, #ARGV do
  removed = removed + redis.call('LREM', KEYS[1], 1, ARGV[i])
end
return removed
"""
_PURGE_CHUNK = 100  # entries per script run: bounds how long one run holds Redis (LREM scans from the head)


async def snapshot_dead(client: aioredis.Redis, keys: QueueKeys) -> list[bytes]:
    """Every dead letter present now, in one atomic read: what purge asks the operator about."""
    return [raw if isinstance(raw, bytes) else raw.encode() for raw in await client.lrange(keys.dead, 0, -1)]


async def purge_dead(client: aioredis.Redis, keys: QueueKeys, confirmed: Sequence[bytes]) -> int:
    """Delete exactly the ``confirmed`` entries (a multiset: two equal entries confirmed, two removed),
    never one that arrived or moved after they were read; returns how many were removed (fewer when a
    replay re-queued some meanwhile)."""
    removed = 0
    for start in range(0, len(confirmed), _PURGE_CHUNK):
        chunk = confirmed[start : start + _PURGE_CHUNK]
        removed += int(await client.eval(_PURGE, 1, keys.dead, *chunk))
    gone = len(confirmed) - removed
    logger.warning(
        "purged %s dead letter(s) from %s%s",
        removed,
        keys.dead,
        f"; {gone} confirmed one(s) had left the list meanwhile (a replay re-queued them)" if gone else "",
    )
    return removed
