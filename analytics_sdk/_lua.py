"""The Lua scripts of the queue protocol (:mod:`._queue` wraps them), and how they are run.

Rules every script here keeps, and why:

- **allow-oom** on everything the drain runs: under ``maxmemory`` + ``noeviction`` the drain is the
  only thing that frees memory, so its claim, ack, split, renew and release must still run. The push
  is the exception: it is refused under OOM (nothing written), and the caller learns it.
- **Fenced**: a lease has an owner token (``owners`` hash). Ack, split, renew, release and marking act
  only for the current owner, so a drain that was paused past its lease cannot ack, dead-letter or
  release what another drain took over.
- **Idempotent**: a script whose reply was lost may be sent again (a client retry); the second run
  does what the first did or nothing: a claim with the same batch id returns the same items and pops
  nothing; an ack of a lease already acked is a no-op; a push with the same token queues nothing new.
- **Redis's clock**: lease times come from ``TIME`` inside the scripts, never from a host's clock,
  so clock skew between worker hosts cannot make a live lease look expired.
- Lua's ``unpack`` fails past a few thousand values: every bulk write is chunked by 500.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

__all__ = [
    "ACK",
    "CLAIM",
    "EXPIRE_RELEASE",
    "MARK",
    "PUSH",
    "PUSH_AFTER_RPUSH",
    "RENEW",
    "SPLIT",
    "TAKE_OVER",
    "Script",
]

# Shared prologue: the server's time in ms, and a chunked multi-value command.
_HELPERS = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function chunked(command, key, list, first, last)
  for i = first, last, 500 do
    redis.call(command, key, unpack(list, i, math.min(i + 499, last)))
  end
end
"""


class Script:
    """A Lua script run by EVALSHA (the body crosses the wire once per server, not per call)."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()  # noqa: S324 - Redis names scripts by SHA-1

    async def __call__(self, client: aioredis.Redis, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:  # a restarted or new server: EVAL sends the body and caches it
            return await client.eval(self.source, len(keys), *keys, *args)


# KEYS: queue, dropped, guard. ARGV: cap, guard ttl ms, payloads...
# Run for pushes under _queue.MULTI_FROM_BYTES, on a cluster and by the sync client's direct lane; larger
# pushes take PUSH_AFTER_RPUSH (Lua takes ARGV in at ~1 ns per byte, so the payloads stay out of it).
# Refused under OOM before it writes anything (no allow-oom). Push, trim and the dropped count are
# one atomic step: a crash between them cannot lose the count. The guard key remembers this push's
# result for a while, so a retry of a push whose reply was lost queues nothing twice.
PUSH = Script(
    "#!lua\n"
    + _HELPERS
    + """
local done = redis.call('GET', KEYS[3])
if done then
  local sep = string.find(done, ':', 1, true)
  return {tonumber(string.sub(done, 1, sep - 1)), tonumber(string.sub(done, sep + 1)), 1}
end
local cap = tonumber(ARGV[1])
local length = 0
for i = 3, #ARGV, 500 do
  length = redis.call('RPUSH', KEYS[1], unpack(ARGV, i, math.min(i + 499, #ARGV)))
end
redis.call('LTRIM', KEYS[1], -cap, -1)
local dropped = math.max(0, length - cap)
if dropped > 0 then redis.call('INCRBY', KEYS[2], dropped) end
redis.call('SET', KEYS[3], length .. ':' .. dropped, 'PX', ARGV[2])
return {length, dropped, 0}
"""
)

# KEYS: queue, dropped, guard. ARGV: cap, guard ttl ms, how many the RPUSH before it appended.
# PUSH with the payloads left out: it runs in a MULTI right after their RPUSH (see _queue.push), so the
# two are one atomic step and the payloads never become Lua strings. A retry of a push that ran takes
# back what its own RPUSH appended (the last ARGV[3] items: nothing ran in between) and returns the
# first result. Sent by EVAL (its body is short): a NOSCRIPT would come after the RPUSH had run.
PUSH_AFTER_RPUSH = Script(
    """#!lua
local done = redis.call('GET', KEYS[3])
if done then
  redis.call('LTRIM', KEYS[1], 0, -tonumber(ARGV[3]) - 1)
  local sep = string.find(done, ':', 1, true)
  return {tonumber(string.sub(done, 1, sep - 1)), tonumber(string.sub(done, sep + 1)), 1}
end
local length = redis.call('LLEN', KEYS[1])
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[1]), -1)
local dropped = math.max(0, length - tonumber(ARGV[1]))
if dropped > 0 then redis.call('INCRBY', KEYS[2], dropped) end
redis.call('SET', KEYS[3], length .. ':' .. dropped, 'PX', ARGV[2])
return {length, dropped, 0}
"""
)

# KEYS: queue, leases, inflight(batch), owners. ARGV: count, batch_id, token.
CLAIM = Script(
    "#!lua flags=allow-oom\n"
    + _HELPERS
    + """
local owner = redis.call('HGET', KEYS[4], ARGV[2])
if owner then
  -- this claim ran already (its reply was lost): hand back what it took, pop nothing more
  if owner == ARGV[3] then return redis.call('LRANGE', KEYS[3], 0, -1) end
  return {}
end
-- a lease with no owner was released: its id is spent (popping onto its list would mix two batches)
if redis.call('ZSCORE', KEYS[2], ARGV[2]) then return {} end
local items = redis.call('LPOP', KEYS[1], ARGV[1])
if not items then return {} end
chunked('RPUSH', KEYS[3], items, 1, #items)
redis.call('ZADD', KEYS[2], now_ms(), ARGV[2])
redis.call('HSET', KEYS[4], ARGV[2], ARGV[3])
return items
"""
)

# KEYS: leases, reclaims, inflight(batch), owners. ARGV: batch_id, score seen, new token, visibility ms.
# Two drains that saw the same expired lease race here and exactly one wins (the score must still be
# the one it saw). Expiry is judged by Redis's clock. A lease its owner released (score 0) is taken
# over without counting: only a drain that died or ran out of time counts towards the poison limit.
TAKE_OVER = Script(
    "#!lua flags=allow-oom\n"
    + _HELPERS
    + """
local owner = redis.call('HGET', KEYS[4], ARGV[1])
if owner == ARGV[3] then
  return {tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0'), redis.call('LRANGE', KEYS[3], 0, -1)}
end
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or score ~= ARGV[2] then return false end
local now = now_ms()
local released = tonumber(score) == 0
if not released and now - tonumber(score) < tonumber(ARGV[4]) then return false end
redis.call('ZADD', KEYS[1], 'XX', now, ARGV[1])
redis.call('HSET', KEYS[4], ARGV[1], ARGV[3])
local count
if released then
  count = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
else
  count = redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
end
return {count, redis.call('LRANGE', KEYS[3], 0, -1)}
"""
)

# KEYS: dead, stats, leases, reclaims, owners, inflight(batch 1..n).
# ARGV: n, then per batch: id, token, items, n_dead, dead entries...; then n_stats, (name, value)...;
# then '0' or '1', last_flush_at, last_summary. Returns one flag per batch: 1 acked, 0 not ours.
# Per batch, its dead letters and counts are written and then it is released, only if the caller
# still owns it; the shared counters (inserted, duplicates) once if any batch was ours. Release comes
# after the writes: a failure before it leaves the batch in flight (a repeated dead letter beats a
# lost one). Not a MULTI: Redis refuses a MULTI with writes as a whole under OOM.
ACK = Script(
    "#!lua flags=allow-oom\n"
    + _HELPERS
    + """
local n = tonumber(ARGV[1])
local at = 2
local flags = {}
local acked = 0
for b = 1, n do
  local id, token, items, n_dead = ARGV[at], ARGV[at + 1], tonumber(ARGV[at + 2]), tonumber(ARGV[at + 3])
  local first = at + 4
  at = first + n_dead
  if redis.call('HGET', KEYS[5], id) == token then
    if n_dead > 0 then
      chunked('RPUSH', KEYS[1], ARGV, first, first + n_dead - 1)
      redis.call('HINCRBY', KEYS[2], 'dead', n_dead)
    end
    redis.call('HINCRBY', KEYS[2], 'claimed', items)
    redis.call('DEL', KEYS[5 + b])
    redis.call('ZREM', KEYS[3], id)
    redis.call('HDEL', KEYS[4], id)
    redis.call('HDEL', KEYS[5], id)
    flags[b] = 1
    acked = acked + 1
  else
    flags[b] = 0
  end
end
local n_stats = tonumber(ARGV[at])
at = at + 1
if acked > 0 then
  for _ = 1, n_stats do
    redis.call('HINCRBY', KEYS[2], ARGV[at], ARGV[at + 1])
    at = at + 2
  end
  if ARGV[at] == '1' then
    redis.call('HSET', KEYS[2], 'last_flush_at', ARGV[at + 1], 'last_summary', ARGV[at + 2])
  end
end
return flags
"""
)

# KEYS: leases, reclaims, owners, inflight(old), inflight(part 1..n).
# ARGV: batch_id, token, n_parts, then per part: new_id, count, items...
# Moves items between lists (no net growth); the parts are owned by the same token.
SPLIT = Script(
    "#!lua flags=allow-oom\n"
    + _HELPERS
    + """
if redis.call('HGET', KEYS[3], ARGV[1]) ~= ARGV[2] then return 0 end
local now = now_ms()
local n_parts = tonumber(ARGV[3])
local at = 4
for part = 1, n_parts do
  local count = tonumber(ARGV[at + 1])
  chunked('RPUSH', KEYS[4 + part], ARGV, at + 2, at + 1 + count)
  redis.call('ZADD', KEYS[1], now, ARGV[at])
  redis.call('HSET', KEYS[3], ARGV[at], ARGV[2])
  at = at + 2 + count
end
redis.call('DEL', KEYS[4])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return n_parts
"""
)

# KEYS: leases, owners. ARGV: pairs of (batch_id, token). Returns one flag per pair: 1 still ours.
# The heartbeat: a drain at work keeps its leases fresh, so the visibility timeout can be short.
RENEW = Script(
    "#!lua flags=allow-oom\n"
    + _HELPERS
    + """
local now = now_ms()
local flags = {}
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[2], ARGV[i]) == ARGV[i + 1] then
    redis.call('ZADD', KEYS[1], 'XX', now, ARGV[i])
    flags[#flags + 1] = 1
  else
    flags[#flags + 1] = 0
  end
end
return flags
"""
)

# KEYS: leases, owners. ARGV: pairs of (batch_id, token). Returns how many were released.
# For batches their drain could not finish through no fault of theirs (PostgreSQL or Redis said no, a
# shutdown): score 0 makes them due at once, and the next take-over does not count as a death. The
# owner token goes, so the releasing drain's own late ack does nothing.
EXPIRE_RELEASE = Script(
    "#!lua flags=allow-oom\n"
    + """
local released = 0
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[2], ARGV[i]) == ARGV[i + 1] then
    redis.call('ZADD', KEYS[1], 'XX', 0, ARGV[i])
    redis.call('HDEL', KEYS[2], ARGV[i])
    released = released + 1
  end
end
return released
"""
)

# KEYS: reclaims, owners. ARGV: batch_id, token, count. Sets a lease's take-over count (the drain
# marks a split part before trying it), only for its owner.
MARK = Script(
    "#!lua flags=allow-oom\n"
    + """
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"""
)
