"""The Redis protocol shared by the SDK (push) and the bridge (claim, ack, reclaim, dead letters).

Key names are built in :mod:`._keys` (re-exported here as :class:`QueueKeys`) and nowhere else.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, NamedTuple, cast

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ._keys import QueueKeys

__all__ = [
    "ACK_STATS",
    "Claim",
    "PushResult",
    "QueueKeys",
    "ack",
    "claim",
    "dead_letter_entry",
    "expire_leases",
    "expired_leases",
    "push",
    "set_reclaims",
    "split_lease",
    "take_over",
]

logger = logging.getLogger(__name__)


class PushResult(NamedTuple):
    length: int  # queue length right after the RPUSH, before the trim
    dropped: int  # how many of the oldest events the LTRIM removed


async def push(client: aioredis.Redis, keys: QueueKeys, payloads: Sequence[bytes], cap: int) -> PushResult:
    """Append ``payloads`` atomically: ``MULTI; RPUSH; LTRIM -cap -1; EXEC``.

    The MULTI makes the RPUSH reply the exact length the LTRIM then cut to ``cap``, so this push
    trimmed exactly ``max(0, length - cap)`` of the oldest (more than it added when the cap was
    lowered since); that is added to the dropped counter after EXEC (LTRIM reports nothing, and MULTI
    cannot branch on a reply).
    """
    async with client.pipeline(transaction=True) as pipe:
        pipe.rpush(keys.queue, *payloads)
        pipe.ltrim(keys.queue, -cap, -1)
        length, _ = await pipe.execute()
    dropped = max(0, int(length) - cap)
    if dropped:
        try:
            await client.incrby(keys.dropped, dropped)
        except RedisError as exc:
            # The events are queued: raising now would make the caller (or its retry) push them
            # again. Only the count is lost, and said so.
            logger.error("queue %s: could not count %s dropped event(s): %s", keys.queue, dropped, exc)
    return PushResult(int(length), dropped)


# allow-oom: under maxmemory + noeviction a claim must still run, or the drain (the only thing that
# frees memory) would stop exactly when Redis is full. The copy is freed again by the ack.
# RPUSH is chunked: Lua's unpack() fails past a few thousand values.
_CLAIM = """#!lua flags=allow-oom
local items = redis.call('LPOP', KEYS[1], ARGV[1])
if not items then return {} end
for i = 1, #items, 500 do
  redis.call('RPUSH', KEYS[3], unpack(items, i, math.min(i + 499, #items)))
end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
return items
"""

# Take over an expired lease only if its score is still the one the caller saw: two drains that saw
# the same expired lease race here, and exactly one wins.
_TAKE_OVER = """#!lua flags=allow-oom
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or score ~= ARGV[2] then return false end
redis.call('ZADD', KEYS[1], 'XX', ARGV[3], ARGV[1])
local count = redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
return {count, redis.call('LRANGE', KEYS[3], 0, -1)}
"""


class Claim(NamedTuple):
    batch_id: str
    items: list[bytes]
    reclaims: int  # 0 for a fresh claim; n for the n-th take-over of an expired lease


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


async def claim(client: aioredis.Redis, keys: QueueKeys, count: int, batch_id: str) -> Claim:
    """Atomically pop up to ``count`` events into the in-flight list ``batch_id`` and lease it."""
    items = await client.eval(
        _CLAIM, 3, keys.queue, keys.leases, keys.inflight(batch_id), count, batch_id, _now_ms()
    )
    return Claim(batch_id, list(items or []), 0)


async def expired_leases(
    client: aioredis.Redis, keys: QueueKeys, visibility_timeout: float, limit: int = 100
) -> list[tuple[str, str]]:
    """(batch_id, score as Redis prints it) of leases older than the visibility timeout."""
    cutoff = _now_ms() - int(visibility_timeout * 1000)
    rows = cast(
        "list[tuple[bytes | str, float]]",
        await client.zrangebyscore(keys.leases, "-inf", cutoff, start=0, num=limit, withscores=True),
    )
    return [
        (member.decode() if isinstance(member, bytes) else str(member), _lua_number(score))
        for member, score in rows
    ]


def _lua_number(score: float) -> str:
    # ZSCORE inside Lua returns the score as Redis formats it; ms timestamps are integers.
    return str(int(score)) if float(score).is_integer() else repr(score)


async def take_over(client: aioredis.Redis, keys: QueueKeys, batch_id: str, seen: str) -> Claim | None:
    """Take over an expired lease; ``None`` when another drain got it first or it was acked."""
    reply = await client.eval(
        _TAKE_OVER, 3, keys.leases, keys.reclaims, keys.inflight(batch_id), batch_id, seen, _now_ms()
    )
    if not reply:
        return None
    count, items = reply
    return Claim(batch_id, list(items), int(count))


ACK_STATS = ("claimed", "inserted", "duplicates", "dead")


def dead_letter_entry(payload: bytes | str, error: str, **extra: Any) -> bytes:
    """One dead-letter record: JSON with the payload kept as text (lossless for valid UTF-8)."""
    text = payload.decode("utf-8", errors="backslashreplace") if isinstance(payload, bytes) else payload
    record = {"payload": text, "error": error, "failed_at": time.time(), **extra}
    return orjson.dumps(record)


# One script, not a MULTI: under maxmemory + noeviction Redis refuses a MULTI holding RPUSH, HINCRBY
# or HSET as a whole (EXECABORT), so the ack, the only thing that frees the in-flight copies,
# would fail exactly when Redis is full and the drain would stall for good. A script is as atomic
# and, with allow-oom, still runs. Release comes last: if a write before it fails, the batch stays
# in flight and is retried (a repeated dead letter beats a lost one).
_ACK = """#!lua flags=allow-oom
local function chunked(list, first, last, command, key)
  for i = first, last, 500 do
    if key then
      redis.call(command, key, unpack(list, i, math.min(i + 499, last)))
    else
      redis.call(command, unpack(list, i, math.min(i + 499, last)))
    end
  end
end
local n_ids = tonumber(ARGV[1])
local at = 2 + n_ids
local n_dead = tonumber(ARGV[at])
at = at + 1
chunked(ARGV, at, at + n_dead - 1, 'RPUSH', KEYS[1])
at = at + n_dead
local n_stats = tonumber(ARGV[at])
at = at + 1
for _ = 1, n_stats do
  redis.call('HINCRBY', KEYS[2], ARGV[at], ARGV[at + 1])
  at = at + 2
end
if ARGV[at] == '1' then
  redis.call('HSET', KEYS[2], 'last_flush_at', ARGV[at + 1], 'last_summary', ARGV[at + 2])
end
chunked(KEYS, 5, 4 + n_ids, 'DEL')
chunked(ARGV, 2, 1 + n_ids, 'ZREM', KEYS[3])
chunked(ARGV, 2, 1 + n_ids, 'HDEL', KEYS[4])
return n_ids
"""


async def ack(
    client: aioredis.Redis,
    keys: QueueKeys,
    batch_id: str | Sequence[str],
    *,
    dead_letters: Sequence[bytes] = (),
    stats: dict[str, int] | None = None,
    summary: bytes | None = None,
) -> None:
    """After COMMIT: dead-letter what failed, count, and release the batch, atomically.

    One atomic script (see ``_ACK`` for why not a MULTI), so a crash never leaves a dead letter whose
    batch is still in flight (it would be dead-lettered twice on reclaim) nor a released batch whose
    dead letters were not written; and it runs when Redis is at maxmemory. ``batch_id`` may be several
    ids: a drain that committed several claims in one transaction releases them together.
    """
    batch_ids = [batch_id] if isinstance(batch_id, str) else list(batch_id)
    counters = [(name, value) for name, value in (stats or {}).items() if value]
    args: list[bytes | str | int] = [len(batch_ids), *batch_ids, len(dead_letters), *dead_letters]
    args.append(len(counters))
    for name, value in counters:
        args += [name, value]
    if summary is None:
        args.append("0")
    else:
        args += ["1", repr(time.time()), summary]
    script_keys = [keys.dead, keys.stats, keys.leases, keys.reclaims, *map(keys.inflight, batch_ids)]
    await client.eval(_ACK, len(script_keys), *script_keys, *args)


# allow-oom for the same reason as _ACK: the poison split must run when Redis is full. It moves items
# between lists (no net growth) and the old lease goes last, so a failure leaves it to be retried.
_SPLIT = """#!lua flags=allow-oom
local n_parts = tonumber(ARGV[3])
local at = 4
for part = 1, n_parts do
  local count = tonumber(ARGV[at + 1])
  for i = at + 2, at + 1 + count, 500 do
    redis.call('RPUSH', KEYS[3 + part], unpack(ARGV, i, math.min(i + 499, at + 1 + count)))
  end
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[at])
  at = at + 2 + count
end
redis.call('DEL', KEYS[3])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return n_parts
"""


async def split_lease(
    client: aioredis.Redis, keys: QueueKeys, batch_id: str, parts: Sequence[tuple[str, Sequence[bytes]]]
) -> None:
    """Replace the lease ``batch_id`` by one new lease per ``(new_batch_id, items)``, atomically.

    The drain splits a batch that keeps killing its worker (a poison event) into leases it can try
    one at a time; a crash while one of them is processed then incriminates only that one. The
    caller holds the lease (it just took it over), so nobody else is reading the old list. One
    allow-oom script (see ``_SPLIT``); parts without items get no lease.
    """
    kept = [(new_id, items) for new_id, items in parts if items]
    args: list[bytes | str | int] = [batch_id, _now_ms(), len(kept)]
    for new_id, items in kept:
        args += [new_id, len(items), *items]
    script_keys = [keys.leases, keys.reclaims, keys.inflight(batch_id), *(keys.inflight(n) for n, _ in kept)]
    await client.eval(_SPLIT, len(script_keys), *script_keys, *args)


_EXPIRE = """#!lua flags=allow-oom
for i, batch_id in ipairs(ARGV) do
  redis.call('ZADD', KEYS[1], 'XX', 0, batch_id)
  redis.call('HDEL', KEYS[2], batch_id)
end
return #ARGV
"""


async def expire_leases(client: aioredis.Redis, keys: QueueKeys, batch_ids: Sequence[str]) -> None:
    """Make leases expired now and forget their take-over counts: for batches a drain could not
    store through no fault of theirs (PostgreSQL down, table missing), so that the next drain
    retries them at once instead of after the visibility timeout, and the outage never counts
    towards the poison limit. The items stay in flight throughout."""
    if batch_ids:
        await client.eval(_EXPIRE, 2, keys.leases, keys.reclaims, *batch_ids)


_SET_RECLAIMS = """#!lua flags=allow-oom
return redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
"""


async def set_reclaims(client: aioredis.Redis, keys: QueueKeys, batch_id: str, count: int) -> None:
    """Set the take-over count of a lease (the drain marks the split lease it is about to try).

    A script only for allow-oom: a plain HSET is refused when Redis is at maxmemory.
    """
    await client.eval(_SET_RECLAIMS, 1, keys.reclaims, batch_id, count)
