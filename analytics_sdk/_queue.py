"""The Redis protocol shared by the SDK (push) and the bridge (claim, ack, renew, release, reclaim).

Key names are built in :mod:`._keys` (re-exported here) and nowhere else; the Lua scripts and their
rules (fenced by owner token, idempotent, Redis's clock, allow-oom) live in :mod:`._lua`."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, cast

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError

from . import _lua
from ._keys import QueueKeys
from ._redis import AnyRedis

__all__ = [
    "MULTI_FROM_BYTES",
    "PUSH_GUARD_TTL_MS",
    "Claim",
    "PushResult",
    "QueueKeys",
    "ack",
    "claim",
    "claim_many",
    "dead_letter_entry",
    "expired_leases",
    "mark_reclaims",
    "new_token",
    "push",
    "redis_time",
    "release",
    "renew",
    "split_lease",
    "take_over",
]

#: How long a push's result is remembered for a retry of the same push: longer than a caller's retries
#: take (they end within its publish deadline), short enough that the guards of a busy producer cost
#: little memory (one small key per push, not per event: ~2.5 MB at 1,000 pushes/s).
PUSH_GUARD_TTL_MS = 15_000
#: From this many payload bytes on, a push is a MULTI of the RPUSH and a short script instead of the one
#: script: redis.asyncio's MULTI costs the client ~30 us more per push, Lua's ARGV costs Redis ~1 ns per
#: byte; they cross between 64 and 128 events of 600 bytes (measured: docs/benchmarks.md).
MULTI_FROM_BYTES = 64 * 1024


class PushResult(NamedTuple):
    length: int  # queue length right after the RPUSH, before the trim
    dropped: int  # how many of the oldest events the LTRIM removed
    repeated: bool = False  # True when this was a retry of a push that had already run


async def push(
    client: aioredis.Redis,
    keys: QueueKeys,
    payloads: Sequence[bytes],
    cap: int,
    *,
    token: str | None = None,
) -> PushResult:
    """Append ``payloads``, trim the queue to ``cap`` (dropping the oldest) and count what was dropped,
    in one atomic step (the script :data:`._lua.PUSH`; from :data:`MULTI_FROM_BYTES` on, except on a
    cluster, a MULTI of the RPUSH and :data:`._lua.PUSH_AFTER_RPUSH`), so the count is exact even if
    this process dies right after.

    Pass the same ``token`` when retrying a push whose outcome is unknown (a timeout): if the first
    attempt ran, the retry queues nothing and returns the first result. With the RPUSH reply being
    the length before the trim, this push trimmed exactly ``max(0, length - cap)`` of the oldest (more
    than it added when the cap was lowered since).
    """
    guard = keys.push_guard(token or uuid.uuid4().hex)
    script_keys = [keys.queue, keys.dropped, guard]
    if isinstance(client, RedisCluster) or sum(map(len, payloads)) < MULTI_FROM_BYTES:
        # One EVALSHA: on a cluster the client follows it to a slot's new owner on MOVED, where a
        # MULTI would fail once (tests/test_cluster_client.py); and for a small push it is the
        # cheaper round trip.
        reply = await _lua.PUSH(client, script_keys, [cap, PUSH_GUARD_TTL_MS, *payloads])
    else:
        # The payloads stay out of Lua: taking them in as a script's ARGV costs Redis ~1 ns per byte
        # (1,000 events: ~0.9 ms against ~0.2 ms for this MULTI). EVAL, not EVALSHA: a NOSCRIPT would
        # come after the RPUSH had run. Refused whole under OOM, as the script is: nothing queued runs.
        after = _lua.PUSH_AFTER_RPUSH.source
        async with client.pipeline(transaction=True) as multi:
            multi.rpush(keys.queue, *payloads)
            multi.eval(after, 3, *script_keys, cap, PUSH_GUARD_TTL_MS, len(payloads))
            reply = (await multi.execute())[1]
    length, dropped, repeated = reply
    return PushResult(int(length), int(dropped), bool(repeated))


class Claim(NamedTuple):
    batch_id: str
    items: list[bytes]
    reclaims: int  # 0 for a fresh claim; n for the n-th take-over of a lease whose drain died
    token: str = ""  # the owner token: ack, split, renew and release act only while it is current
    #: The keys of the shard the batch came from: its ack, split, renewal, release and dead letters
    #: go to that shard (None only for a Claim built by hand; the drain always sets it).
    keys: QueueKeys | None = None


def _stakes(claims: Sequence[Claim]) -> list[str]:
    args: list[str] = []
    for c in claims:
        args += [c.batch_id, c.token]
    return args


def new_token() -> str:
    return uuid.uuid4().hex


async def claim(
    client: aioredis.Redis, keys: QueueKeys, count: int, batch_id: str, token: str | None = None
) -> Claim:
    """Atomically pop up to ``count`` events into the in-flight list ``batch_id`` and lease it to
    ``token`` (a new one if not given). Run again with the same id and token (a lost reply), it returns
    the same items and pops nothing."""
    token = token or new_token()
    items = await _lua.CLAIM(
        client, [keys.queue, keys.leases, keys.inflight(batch_id), keys.owners], [count, batch_id, token]
    )
    return Claim(batch_id, list(items or []), 0, token, keys)


async def claim_many(
    client: aioredis.Redis, keys: QueueKeys, count: int, attempts: Sequence[tuple[str, str]]
) -> list[Claim]:
    """:func:`claim` once per ``(batch_id, token)`` in ``attempts``, all in one round trip (a pipeline:
    Redis runs the scripts one after another); one :class:`Claim` each, in order, those after the queue
    ran empty without items (and without a lease). Each is the same idempotent script as :func:`claim`:
    after an error, run the same attempts again or release them."""
    async with client.pipeline(transaction=False) as pipe:
        for batch_id, token in attempts:
            script_keys = [keys.queue, keys.leases, keys.inflight(batch_id), keys.owners]
            # execute_command, not pipe.evalsha: redis-py's cluster pipeline blocks the evalsha
            # method (not the command); the keys of one shard share a slot, so a node runs each.
            pipe.execute_command(
                "EVALSHA", _lua.CLAIM.sha, len(script_keys), *script_keys, count, batch_id, token
            )
        replies = await pipe.execute(raise_on_error=False)
    claims: list[Claim] = []
    for (batch_id, token), reply in zip(attempts, replies, strict=True):
        if isinstance(reply, NoScriptError):  # a restarted server: claim() sends the body (idempotent)
            claims.append(await claim(client, keys, count, batch_id, token))
        elif isinstance(reply, BaseException):
            raise reply
        else:
            claims.append(Claim(batch_id, list(reply or []), 0, token, keys))
    return claims


async def expired_leases(
    client: aioredis.Redis, keys: QueueKeys, visibility_timeout: float, limit: int = 100
) -> list[tuple[str, str]]:
    """(batch_id, score as Redis prints it) of leases older than the visibility timeout by Redis's
    clock, or released by their owner (score 0). :func:`take_over` checks again, atomically.

    The clock is the one of the node that owns ``keys.leases`` (the node whose scripts score the
    leases): on a cluster TIME would otherwise go to a default node, whose clock may differ."""
    seconds, micros = await redis_time(client, keys.leases)
    cutoff = int(seconds) * 1000 + int(micros) // 1000 - int(visibility_timeout * 1000)
    rows = cast(
        "list[tuple[bytes | str, float]]",
        await client.zrangebyscore(keys.leases, "-inf", cutoff, start=0, num=limit, withscores=True),
    )
    return [
        (member.decode() if isinstance(member, bytes) else str(member), _lua_number(score))
        for member, score in rows
    ]


async def redis_time(client: AnyRedis, key: str) -> tuple[int, int]:
    """TIME on the node that owns ``key`` (the only node on a plain Redis): (seconds, microseconds)."""
    if isinstance(client, RedisCluster):
        reply: Any = await client.execute_command("TIME", target_nodes=client.get_node_from_key(key))
    else:
        reply = await client.time()
    seconds, micros = reply
    return int(seconds), int(micros)


def _lua_number(score: float) -> str:
    # ZSCORE inside Lua returns the score as Redis formats it; ms timestamps are integers.
    return str(int(score)) if float(score).is_integer() else repr(score)


async def take_over(
    client: aioredis.Redis,
    keys: QueueKeys,
    batch_id: str,
    seen: str,
    visibility_timeout: float = 0.0,
    token: str | None = None,
) -> Claim | None:
    """Take over a lease that expired (by Redis's clock, ``visibility_timeout`` seconds without a
    renewal) or was released; ``None`` when another drain got it first, it was acked, or it is live."""
    token = token or new_token()
    reply = await _lua.TAKE_OVER(
        client,
        [keys.leases, keys.reclaims, keys.inflight(batch_id), keys.owners],
        [batch_id, seen, token, int(visibility_timeout * 1000)],
    )
    if not reply:
        return None
    count, items = reply
    return Claim(batch_id, list(items), int(count), token, keys)


def dead_letter_entry(payload: bytes | str, error: str, **extra: Any) -> bytes:
    """One dead-letter record: JSON with the payload kept as text (lossless for valid UTF-8)."""
    text = payload.decode("utf-8", errors="backslashreplace") if isinstance(payload, bytes) else payload
    record = {"payload": text, "error": error, "failed_at": time.time(), **extra}
    return msgspec.json.encode(record)


async def ack(
    client: aioredis.Redis,
    keys: QueueKeys,
    claims: Sequence[Claim],
    *,
    dead_letters: Mapping[str, Sequence[bytes]] | None = None,
    stats: dict[str, int] | None = None,
    summary: bytes | None = None,
) -> list[bool]:
    """After COMMIT: for each claim its owner still holds, write its dead letters, count it and
    release it; then the shared counters (``stats``, e.g. inserted, duplicates) once. Atomic, allowed
    at maxmemory, fenced and idempotent (see :mod:`._lua`). ``dead_letters`` maps batch ids to their
    entries. Returns one flag per claim: False for a claim another drain had taken over (its dead
    letters were not written: the new owner writes them) or that was acked already."""
    dead = dead_letters or {}
    args: list[bytes | str | int] = [len(claims)]
    for c in claims:
        entries = dead.get(c.batch_id, ())
        args += [c.batch_id, c.token, len(c.items), len(entries), *entries]
    counters = [(name, value) for name, value in (stats or {}).items() if value]
    args.append(len(counters))
    for name, value in counters:
        args += [name, value]
    if summary is None:
        args.append("0")
    else:
        args += ["1", repr(time.time()), summary]
    script_keys = [keys.dead, keys.stats, keys.leases, keys.reclaims, keys.owners]
    script_keys += [keys.inflight(c.batch_id) for c in claims]
    flags = await _lua.ACK(client, script_keys, args)
    return [bool(flag) for flag in flags]


async def split_lease(
    client: aioredis.Redis, keys: QueueKeys, taken: Claim, parts: Sequence[tuple[str, Sequence[bytes]]]
) -> bool:
    """Replace the lease ``taken`` by one lease per ``(new_batch_id, items)``, owned by the same
    token, atomically; False (nothing done) when ``taken`` is no longer the caller's.

    The drain splits a batch that keeps killing its worker (a poison event) into leases it can try
    one at a time; a crash while one of them is processed then incriminates only that one. Parts
    without items get no lease."""
    kept = [(new_id, items) for new_id, items in parts if items]
    args: list[bytes | str | int] = [taken.batch_id, taken.token, len(kept)]
    for new_id, items in kept:
        args += [new_id, len(items), *items]
    script_keys = [keys.leases, keys.reclaims, keys.owners, keys.inflight(taken.batch_id)]
    script_keys += [keys.inflight(n) for n, _ in kept]
    return bool(await _lua.SPLIT(client, script_keys, args))


async def renew(client: aioredis.Redis, keys: QueueKeys, stakes: Sequence[Claim]) -> list[bool]:
    """The heartbeat: refresh the leases still owned (one flag per stake: False = taken over)."""
    if not stakes:
        return []
    flags = await _lua.RENEW(client, [keys.leases, keys.owners], _stakes(stakes))
    return [bool(flag) for flag in flags]


async def release(client: aioredis.Redis, keys: QueueKeys, stakes: Sequence[Claim]) -> int:
    """Give leases back for the next drain at once (score 0), keeping their items in flight: for
    batches a drain could not store through no fault of theirs (PostgreSQL or Redis said no, a
    shutdown). The next take-over does not count towards the poison limit. Returns how many were
    still ours."""
    if not stakes:
        return 0
    return int(await _lua.EXPIRE_RELEASE(client, [keys.leases, keys.owners], _stakes(stakes)))


async def mark_reclaims(client: aioredis.Redis, keys: QueueKeys, stake: Claim, count: int) -> bool:
    """Set the take-over count of a lease the caller owns (the drain marks a split part before it
    tries it, so a crash on it incriminates that part alone)."""
    return bool(await _lua.MARK(client, [keys.reclaims, keys.owners], [stake.batch_id, stake.token, count]))
