"""When a client sends the flush task: the Redis side of the backlog trigger and of the max delay.

Both are decided by one small Lua script run by the client that asks (atomic, so exactly one client
wins each decision across every process), and counted in ``{prefix}:flush:requests`` (now, trailing,
delayed) for operators and the tests. Neither runs per ``track()``: :class:`._backlog.AfterPush`
asks only when a push passes a local gate, which the reply moves forward.

- **Backlog trigger, a debounce with a trailing edge.** A push that makes the queue reach the batch
  size asks :func:`reserve_backlog_flush`. No cooldown window open: this client opens one and sends a
  flush now (the leading edge). Inside an open window with no flush scheduled: this client schedules
  one for the window's end (the trailing edge), and that flush opens the next window, so flushes stay
  at least one cooldown apart across all clients and a suppressed trigger is deferred, never dropped.
  The window's key holds ``trailing:<ms>``: the TTL left when the scheduled flush runs.
- **Max delay.** Any push asks :func:`reserve_delayed_flush` (at most once per gate): if no delayed
  flush is pending, this client schedules one ``analytics_max_delay`` seconds ahead and marks it with a
  key living exactly as long; while the key lives, every newer event is covered by that flush (it
  runs when the key expires, after them). So an event below the batch size waits at most the max
  delay for a flush to be due, whatever the rate; beat remains the safety net for a lost send.

Only the time left on keys (PTTL) is used, never a host's clock, so clients on skewed hosts agree.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any, NamedTuple

from ._keys import QueueKeys
from ._lua import Script
from ._redis import AnyRedis

__all__ = ["Decision", "Reply", "reserve_backlog_flush", "reserve_delayed_flush"]


class Decision(IntEnum):
    NOW = 0  # this client opened a cooldown window: send the flush now
    TRAILING = 1  # this client scheduled the flush at the window's end: send it with that countdown
    PENDING = 2  # a trailing flush is already scheduled by someone: send nothing


class Reply(NamedTuple):
    decision: Decision
    seconds: float  # NOW: 0; TRAILING: the countdown; PENDING: until the scheduled flush runs


# KEYS: cooldown, requests. ARGV: cooldown ms.
_BACKLOG = Script(
    """#!lua
local ttl = redis.call('PTTL', KEYS[1])
local cooldown = tonumber(ARGV[1])
if ttl <= 0 then
  -- no window open (-2), or a key without an expiry that nobody would ever clear (-1): open one
  redis.call('SET', KEYS[1], 'now', 'PX', cooldown)
  redis.call('HINCRBY', KEYS[2], 'now', 1)
  return {0, 0}
end
local value = redis.call('GET', KEYS[1])
local fires_at = 0
if string.sub(value, 1, 9) == 'trailing:' then fires_at = tonumber(string.sub(value, 10)) or 0 end
if fires_at > 0 and ttl > fires_at then return {2, ttl - fires_at} end
-- no flush scheduled for this window's end yet (or the scheduled one ran and owns this window):
-- schedule one there; it then owns the next window
redis.call('SET', KEYS[1], 'trailing:' .. cooldown, 'PX', ttl + cooldown)
redis.call('HINCRBY', KEYS[2], 'trailing', 1)
return {1, ttl}
"""
)

# KEYS: delay, requests. ARGV: delay ms. Returns 0 when this client must schedule the flush, else the
# ms until the pending one runs.
_DELAYED = Script(
    """#!lua
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then return ttl end
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
redis.call('HINCRBY', KEYS[2], 'delayed', 1)
return 0
"""
)


async def reserve_backlog_flush(client: AnyRedis, keys: QueueKeys, cooldown: float) -> Reply:
    """The backlog trigger's decision for a push that made the queue reach the batch size."""
    plain: Any = client  # Script is typed for the plain client; it runs alike on a cluster's
    decision, ms = await _BACKLOG(
        plain, [keys.flush_cooldown, keys.flush_requests], [max(1, int(cooldown * 1000))]
    )
    return Reply(Decision(int(decision)), int(ms) / 1000)


async def reserve_delayed_flush(client: AnyRedis, keys: QueueKeys, delay: float) -> float:
    """0 when the caller must send a flush ``delay`` seconds ahead; else the seconds until the
    pending delayed flush runs (every event pushed until then is covered by it)."""
    plain: Any = client
    ms = await _DELAYED(plain, [keys.flush_delay, keys.flush_requests], [max(1, int(delay * 1000))])
    return int(ms) / 1000
