"""The Redis protocol (analytics_sdk._queue) against the real Redis, and a throwaway one for exact counts.

Fencing, idempotence and lease clocks have their own file: test_queue_protocol.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis
from redis.exceptions import OutOfMemoryError, ResponseError
from servers import RedisServer, start_redis

from analytics_sdk import _lua
from analytics_sdk._queue import (
    MULTI_FROM_BYTES,
    PUSH_GUARD_TTL_MS,
    Claim,
    QueueKeys,
    ack,
    claim,
    claim_many,
    dead_letter_entry,
    expired_leases,
    mark_reclaims,
    new_token,
    push,
    split_lease,
    take_over,
)


@pytest.fixture
def keys(key_prefix: str) -> QueueKeys:
    return QueueKeys(key_prefix)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of our own: CONFIG RESETSTAT, MONITOR and exact command counts are safe there."""
    with start_redis(tmp_path) as srv:
        yield srv


@pytest.fixture
async def own_redis(server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(server.url)
    yield client
    await client.aclose()


async def command_counts(client: aioredis.Redis) -> dict[str, int]:
    stats = await client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(row["calls"]) for name, row in stats.items()}


async def redis_now_ms(client: aioredis.Redis) -> int:
    seconds, micros = await client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def payloads(start: int, stop: int) -> list[bytes]:
    return [f"e{i}".encode() for i in range(start, stop)]


# -- key names ---------------------------------------------------------------------------------------


def test_key_names() -> None:
    keys = QueueKeys("{app}")
    assert keys.queue == "{app}:events:batch"
    assert keys.inflight("b1") == "{app}:events:inflight:b1"
    assert keys.leases == "{app}:events:inflight"
    assert keys.owners == "{app}:events:owners"
    assert keys.push_guard("t1") == "{app}:events:pushed:t1"
    assert keys.reclaims == "{app}:events:reclaims"
    assert keys.dead == "{app}:events:dead"
    assert keys.dropped == "{app}:events:dropped"
    assert keys.stats == "{app}:stats"
    assert keys.flush_cooldown == "{app}:flush:cooldown"
    assert keys.flush_delay == "{app}:flush:delay"
    assert keys.flush_requests == "{app}:flush:requests"
    assert QueueKeys().queue == "analytics:events:batch"


# -- push --------------------------------------------------------------------------------------------


async def test_push_is_one_script_call(own_redis: aioredis.Redis) -> None:
    """RPUSH, LTRIM and the guard run inside one EVALSHA: no MULTI/EXEC, nothing else on the wire."""
    keys = QueueKeys("p")
    await push(own_redis, keys, [b"warm-up"], cap=100)  # loads the script: later pushes are EVALSHA only
    await own_redis.delete(keys.queue)
    await own_redis.config_resetstat()
    result = await push(own_redis, keys, payloads(0, 5), cap=100)
    counts = await command_counts(own_redis)
    assert result == (5, 0, False)
    assert counts.get("evalsha") == 1
    assert "eval" not in counts, "the script was cached: its body does not cross the wire again"
    assert "multi" not in counts and "exec" not in counts
    assert counts.get("rpush") == 1
    assert counts.get("ltrim") == 1
    assert "incrby" not in counts, "nothing dropped, nothing counted"
    assert await own_redis.lrange(keys.queue, 0, -1) == payloads(0, 5)


async def test_push_at_the_cap_counts_its_drops_inside_the_script(
    server: RedisServer, own_redis: aioredis.Redis
) -> None:
    """The dropped counter is written by the same script as the trim (never a separate INCRBY that a
    lost reply or a crash could skip): MONITOR shows the client sending one EVALSHA, and INCRBY run
    by Lua."""
    keys = QueueKeys("p")
    await push(own_redis, keys, payloads(0, 8), cap=100)
    seen: list[tuple[str, str]] = []  # (who, command) for everything the server ran
    watcher = aioredis.Redis.from_url(server.url)
    async with watcher, watcher.monitor() as monitor:
        result = await push(own_redis, keys, payloads(8, 12), cap=10)
        while ("lua", "SET") not in seen:  # the guard's SET is the script's last command
            entry = await asyncio.wait_for(monitor.next_command(), 5)
            who = "lua" if entry["client_type"] == "lua" else "client"
            seen.append((who, entry["command"].split()[0].upper()))
    assert result == (12, 2, False)
    assert [command for who, command in seen if who == "client"] == ["EVALSHA"]
    assert [command for who, command in seen if who == "lua"] == ["GET", "RPUSH", "LTRIM", "INCRBY", "SET"]
    assert await own_redis.get(keys.dropped) == b"2"


def large(start: int, stop: int) -> list[bytes]:
    """Payloads of a quarter of MULTI_FROM_BYTES each: four or more make a push a MULTI."""
    return [f"e{n}".encode().ljust(MULTI_FROM_BYTES // 4, b".") for n in range(start, stop)]


async def test_a_large_push_is_one_multi_with_the_payloads_outside_lua(own_redis: aioredis.Redis) -> None:
    """From MULTI_FROM_BYTES on: the RPUSH of the payloads and one short script (guard, trim, count) in
    one MULTI. The payloads never become a script's ARGV (Lua takes them in at ~1 ns per byte)."""
    keys = QueueKeys("p")
    await own_redis.config_resetstat()
    result = await push(own_redis, keys, large(0, 4), cap=100)
    counts = await command_counts(own_redis)
    assert result == (4, 0, False)
    assert counts.pop("config|resetstat") == 1
    assert counts == {"multi": 1, "rpush": 1, "eval": 1, "get": 1, "llen": 1, "ltrim": 1, "set": 1, "exec": 1}
    assert await own_redis.lrange(keys.queue, 0, -1) == large(0, 4)


async def test_a_large_push_at_the_cap_counts_its_drops_inside_the_transaction(
    server: RedisServer, own_redis: aioredis.Redis
) -> None:
    """The trim and the dropped counter are written by the script that runs in the same MULTI as the
    RPUSH, right after it: MONITOR shows the client's MULTI, RPUSH and EVAL, then Lua's commands."""
    keys = QueueKeys("p")
    await push(own_redis, keys, large(0, 8), cap=100)
    seen: list[tuple[str, str]] = []  # (who, command) for everything the server ran
    watcher = aioredis.Redis.from_url(server.url)
    async with watcher, watcher.monitor() as monitor:
        result = await push(own_redis, keys, large(8, 12), cap=10)
        while ("lua", "SET") not in seen:  # the guard's SET is the script's last command
            entry = await asyncio.wait_for(monitor.next_command(), 5)
            who = "lua" if entry["client_type"] == "lua" else "client"
            seen.append((who, entry["command"].split()[0].upper()))
    assert result == (12, 2, False)
    assert [command for who, command in seen if who == "client"] == ["MULTI", "RPUSH", "EVAL"]
    assert [command for who, command in seen if who == "lua"] == ["GET", "LLEN", "LTRIM", "INCRBY", "SET"]
    assert await own_redis.get(keys.dropped) == b"2"
    assert await own_redis.lrange(keys.queue, 0, -1) == large(2, 12)


async def test_a_retried_large_push_takes_back_its_own_rpush_only(
    redis_client: aioredis.Redis, keys: QueueKeys
) -> None:
    """A retry of a push that ran appends its payloads in the MULTI and the script takes back exactly
    those: what others pushed in between stays, in order. A push that ran as the one script (a small
    push, a cluster, the sync client's direct lane) is recognised by the same guard."""
    assert await push(redis_client, keys, large(0, 4), cap=100, token="t") == (4, 0, False)
    await push(redis_client, keys, payloads(4, 6), cap=100)  # another producer's, after it
    assert await push(redis_client, keys, large(0, 4), cap=100, token="t") == (4, 0, True)
    guard = keys.push_guard("by-script")
    args = [100, PUSH_GUARD_TTL_MS, *large(6, 10)]
    assert await _lua.PUSH(redis_client, [keys.queue, keys.dropped, guard], args) == [10, 0, 0]
    assert await push(redis_client, keys, large(6, 10), cap=100, token="by-script") == (10, 0, True)
    assert await redis_client.lrange(keys.queue, 0, -1) == large(0, 4) + payloads(4, 6) + large(6, 10)
    assert await redis_client.get(keys.dropped) is None


async def test_cap_drops_exactly_the_oldest_and_counts_them(
    redis_client: aioredis.Redis, keys: QueueKeys
) -> None:
    cap = 100
    sizes = [30, 1, 69, 50, 7, 93]  # 250 events in uneven batches
    assert sum(sizes) == 250
    start = 0
    reported = 0
    for size in sizes:
        result = await push(redis_client, keys, payloads(start, start + size), cap=cap)
        assert result.length == min(start, cap) + size
        assert result.dropped == max(0, result.length - cap)
        assert not result.repeated
        reported += result.dropped
        start += size
    survivors = await redis_client.lrange(keys.queue, 0, -1)
    assert survivors == payloads(150, 250), "the newest 100, oldest first"
    assert int(await redis_client.get(keys.dropped)) == 150
    assert reported == 150


async def test_cap_lowered_counts_everything_trimmed(redis_client: aioredis.Redis, keys: QueueKeys) -> None:
    await push(redis_client, keys, payloads(0, 100), cap=1000)
    result = await push(redis_client, keys, payloads(100, 101), cap=10)
    assert result.dropped == 91
    assert await redis_client.lrange(keys.queue, 0, -1) == payloads(91, 101)
    assert int(await redis_client.get(keys.dropped)) == 91


async def test_push_beyond_lua_unpack_limit(redis_client: aioredis.Redis, keys: QueueKeys) -> None:
    result = await push(redis_client, keys, payloads(0, 10_001), cap=10_000)
    assert result == (10_001, 1, False)
    assert await redis_client.lrange(keys.queue, 0, 0) == [b"e1"]
    assert await redis_client.llen(keys.queue) == 10_000


async def test_concurrent_pushes_count_drops_exactly(redis_available: str, keys: QueueKeys) -> None:
    clients = [aioredis.Redis.from_url(redis_available) for _ in range(8)]
    try:

        async def producer(index: int, client: aioredis.Redis) -> int:
            dropped = 0
            for batch in range(25):
                first = (index * 25 + batch) * 10
                dropped += (await push(client, keys, payloads(first, first + 10), cap=300)).dropped
            return dropped

        results = await asyncio.gather(*(producer(i, c) for i, c in enumerate(clients)))
        total = 8 * 25 * 10
        assert sum(results) == total - 300
        assert int(await clients[0].get(keys.dropped)) == total - 300
        assert await clients[0].llen(keys.queue) == 300
    finally:
        for client in clients:
            await client.aclose()


async def test_push_is_all_or_nothing(redis_client: aioredis.Redis, keys: QueueKeys) -> None:
    """A push whose RPUSH fails (WRONGTYPE) leaves no trace: nothing trimmed, counted or remembered."""
    await redis_client.set(keys.queue, b"not a list")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await push(redis_client, keys, payloads(0, 3), cap=1, token="t-wrongtype")
    assert await redis_client.get(keys.queue) == b"not a list"
    assert await redis_client.get(keys.dropped) is None
    assert not await redis_client.exists(keys.push_guard("t-wrongtype")), "a failed push is not 'done'"


# -- claim -------------------------------------------------------------------------------------------


async def test_claim_moves_items_to_inflight_and_leases(
    redis_client: aioredis.Redis, keys: QueueKeys
) -> None:
    await push(redis_client, keys, payloads(0, 10), cap=100)
    before = await redis_now_ms(redis_client)
    got = await claim(redis_client, keys, 4, "batch-a", token="owner-a")
    after = await redis_now_ms(redis_client)
    assert got == Claim("batch-a", payloads(0, 4), 0, "owner-a", keys), "the oldest first"
    assert await redis_client.lrange(keys.inflight("batch-a"), 0, -1) == payloads(0, 4)
    assert await redis_client.lrange(keys.queue, 0, -1) == payloads(4, 10)
    score = await redis_client.zscore(keys.leases, "batch-a")
    assert before <= score <= after, "the lease is scored by Redis's clock"
    assert await redis_client.hget(keys.owners, "batch-a") == b"owner-a"
    rest = await claim(redis_client, keys, 100, "batch-b")
    assert rest.items == payloads(4, 10)
    assert len(rest.token) == 32, "a fresh owner token when none is given"
    assert await redis_client.hget(keys.owners, "batch-b") == rest.token.encode()
    assert not await redis_client.exists(keys.queue)


async def test_claim_of_empty_queue_takes_no_lease(redis_client: aioredis.Redis, keys: QueueKeys) -> None:
    got = await claim(redis_client, keys, 10, "empty")
    assert got.items == []
    assert await redis_client.zcard(keys.leases) == 0
    assert not await redis_client.exists(keys.inflight("empty"))
    assert not await redis_client.exists(keys.owners), "no owner for a lease that was never taken"


async def test_claim_beyond_lua_unpack_limit(redis_client: aioredis.Redis, keys: QueueKeys) -> None:
    await push(redis_client, keys, payloads(0, 10_000), cap=100_000)
    got = await claim(redis_client, keys, 10_000, "big")
    assert len(got.items) == 10_000
    assert await redis_client.llen(keys.inflight("big")) == 10_000


async def test_concurrent_claims_never_share_an_item(redis_available: str, keys: QueueKeys) -> None:
    clients = [aioredis.Redis.from_url(redis_available) for _ in range(4)]
    try:
        await push(clients[0], keys, payloads(0, 2000), cap=10_000)

        async def drain(client: aioredis.Redis, name: str) -> list[bytes]:
            taken: list[bytes] = []
            for n in range(1000):
                got = await claim(client, keys, 37, f"{name}-{n}")
                if not got.items:
                    return taken
                taken += got.items
            return taken

        results = await asyncio.gather(*(drain(c, f"d{i}") for i, c in enumerate(clients)))
        everything = [item for items in results for item in items]
        assert sorted(everything) == sorted(payloads(0, 2000))
        assert len(set(everything)) == 2000
    finally:
        for client in clients:
            await client.aclose()


async def test_push_refused_whole_under_oom_while_claim_and_ack_run(tmp_path: Path) -> None:
    """maxmemory + noeviction refuses the push (nothing of it written), but the claim and the ack
    (allow-oom) still run and free the queue."""
    with start_redis(tmp_path, "--maxmemory", "4mb", "--maxmemory-policy", "noeviction") as srv:
        client = aioredis.Redis.from_url(srv.url)
        try:
            keys = QueueKeys("oom")
            blob = b"x" * 10_000
            accepted = 0
            with pytest.raises(OutOfMemoryError, match="maxmemory"):
                for n in range(2000):
                    await push(client, keys, [blob] * 10, cap=1_000_000, token=f"t{n}")
                    accepted += 1
            refused = f"t{accepted}"
            queued = await client.llen(keys.queue)
            assert queued == accepted * 10, "the refused push wrote none of its events"
            assert not await client.exists(keys.push_guard(refused)), "nor its guard"
            assert await client.get(keys.dropped) is None
            got = await claim(client, keys, 100, "under-oom")
            assert len(got.items) == 100
            # The ack must run too, dead letters, counters and summary included: it is what frees
            # memory. (A MULTI with RPUSH/HINCRBY/HSET is refused whole under OOM.)
            flags = await ack(
                client,
                keys,
                [got],
                dead_letters={"under-oom": [dead_letter_entry(got.items[0], "bad")]},
                stats={"inserted": 99},
                summary=b"{}",
            )
            assert flags == [True]
            assert not await client.exists(keys.inflight("under-oom"))
            assert await client.zcard(keys.leases) == 0
            assert not await client.hexists(keys.owners, "under-oom")
            assert await client.llen(keys.dead) == 1
            assert await client.hget(keys.stats, "inserted") == b"99"
            assert await client.hget(keys.stats, "dead") == b"1"
            assert await client.hget(keys.stats, "claimed") == b"100"
            assert await client.llen(keys.queue) == queued - 100
        finally:
            await client.aclose()


# -- leases and take-over ------------------------------------------------------------------------------


async def test_expired_leases(redis_client: aioredis.Redis, keys: QueueKeys) -> None:
    await push(redis_client, keys, payloads(0, 3), cap=100)
    await claim(redis_client, keys, 3, "lease-1")
    assert await expired_leases(redis_client, keys, visibility_timeout=60) == [], "a fresh lease"
    await redis_client.zadd(keys.leases, {"lease-1": 1_000})
    assert await expired_leases(redis_client, keys, visibility_timeout=60) == [("lease-1", "1000")]


async def test_take_over_needs_the_score_seen(redis_client: aioredis.Redis, keys: QueueKeys) -> None:
    await push(redis_client, keys, payloads(0, 3), cap=100)
    fresh = await claim(redis_client, keys, 3, "fresh")
    assert await take_over(redis_client, keys, "fresh", "1000") is None, "not the lease's score"
    assert await take_over(redis_client, keys, "missing", "1000") is None
    assert await redis_client.hlen(keys.reclaims) == 0
    assert await redis_client.hget(keys.owners, "fresh") == fresh.token.encode(), "still the claimer's"


async def test_take_over_of_expired_lease_succeeds_once_when_two_race(
    redis_available: str, redis_client: aioredis.Redis, keys: QueueKeys
) -> None:
    await push(redis_client, keys, payloads(0, 5), cap=100)
    await claim(redis_client, keys, 5, "stale")
    await redis_client.zadd(keys.leases, {"stale": 5_000})
    ((batch_id, seen),) = await expired_leases(redis_client, keys, visibility_timeout=1)
    assert batch_id == "stale"
    racers = [aioredis.Redis.from_url(redis_available) for _ in range(2)]
    try:
        results = await asyncio.gather(
            *(take_over(r, keys, batch_id, seen, 1, token=f"racer-{i}") for i, r in enumerate(racers))
        )
    finally:
        for racer in racers:
            await racer.aclose()
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    assert winners[0].items == payloads(0, 5)
    assert winners[0].reclaims == 1
    assert await redis_client.hget(keys.owners, "stale") == winners[0].token.encode()
    new_score = await redis_client.zscore(keys.leases, "stale")
    assert new_score > 5_000, "the winner renewed the lease"
    assert await expired_leases(redis_client, keys, visibility_timeout=60) == []
    # A second expiry is taken over again, and counted again.
    await redis_client.zadd(keys.leases, {"stale": 6_000})
    again = await take_over(redis_client, keys, "stale", "6000", 1)
    assert again is not None
    assert again.reclaims == 2
    assert await take_over(redis_client, keys, "stale", "6000", 1) is None


# -- ack -----------------------------------------------------------------------------------------------


async def test_ack_releases_and_records_in_one_atomic_call(own_redis: aioredis.Redis) -> None:
    """One script (atomic like MULTI, and unlike MULTI allowed under OOM): one command, one round trip."""
    keys = QueueKeys("ack")
    await push(own_redis, keys, payloads(0, 6), cap=100)
    await claim(own_redis, keys, 6, "b1")
    await own_redis.zadd(keys.leases, {"b1": 1})
    taken = await take_over(own_redis, keys, "b1", "1", 1)
    assert taken is not None
    dead = [dead_letter_entry(b"e1", "ValidationError: bad", field="event_type")]
    summary = msgspec.json.encode({"claimed": 6})
    await ack(own_redis, keys, [], stats={})  # loads the script: the counted ack is EVALSHA only
    await own_redis.config_resetstat()
    flags = await ack(
        own_redis,
        keys,
        [taken],
        dead_letters={"b1": dead},
        stats={"inserted": 4, "duplicates": 1},
        summary=summary,
    )
    counts = await command_counts(own_redis)
    assert flags == [True]
    assert counts["evalsha"] == 1, "one call; the commands inside the script are counted too"
    assert "eval" not in counts and "multi" not in counts
    assert counts["del"] == counts["zrem"] == 1
    assert counts["hdel"] == 2, "the reclaim count and the owner token"
    assert not await own_redis.exists(keys.inflight("b1"))
    assert await own_redis.zscore(keys.leases, "b1") is None
    assert not await own_redis.hexists(keys.reclaims, "b1")
    assert not await own_redis.hexists(keys.owners, "b1")
    assert await own_redis.lrange(keys.dead, 0, -1) == dead
    stats = await own_redis.hgetall(keys.stats)
    assert {k: stats[k.encode()] for k in ("claimed", "inserted", "duplicates", "dead")} == {
        "claimed": b"6",
        "inserted": b"4",
        "duplicates": b"1",
        "dead": b"1",
    }
    assert stats[b"last_summary"] == summary
    assert abs(float(stats[b"last_flush_at"]) - time.time()) < 60
    # Counters add up across acks; zero counts are not written.
    await push(own_redis, keys, payloads(6, 8), cap=100)
    second = await claim(own_redis, keys, 2, "b2")
    assert await ack(own_redis, keys, [second], stats={"inserted": 2, "duplicates": 0}) == [True]
    stats = await own_redis.hgetall(keys.stats)
    assert (stats[b"claimed"], stats[b"inserted"], stats[b"dead"]) == (b"8", b"6", b"1")
    assert stats[b"duplicates"] == b"1"
    assert await own_redis.zcard(keys.leases) == 0


async def test_ack_of_several_batches(redis_client: aioredis.Redis, keys: QueueKeys) -> None:
    await push(redis_client, keys, payloads(0, 2000), cap=10_000)
    claims = [await claim(redis_client, keys, 3, f"b{i}") for i in range(600)]  # > one unpack() chunk
    for c in claims[:5]:
        await redis_client.hset(keys.reclaims, c.batch_id, 1)
    # 1,200 dead letters, two per batch of the first 600: each written with its own batch
    dead = {c.batch_id: [dead_letter_entry(raw, "bad") for raw in c.items[:2]] for c in claims}
    flags = await ack(redis_client, keys, claims, dead_letters=dead, stats={"inserted": 600})
    assert flags == [True] * 600
    assert await redis_client.zcard(keys.leases) == 0
    assert await redis_client.hlen(keys.reclaims) == 0
    assert await redis_client.hlen(keys.owners) == 0
    assert not any([await redis_client.exists(keys.inflight(c.batch_id)) for c in claims])
    assert await redis_client.lrange(keys.dead, 0, -1) == [e for c in claims for e in dead[c.batch_id]]
    assert await redis_client.hget(keys.stats, "claimed") == b"1800"
    assert await redis_client.hget(keys.stats, "dead") == b"1200"
    assert await redis_client.llen(keys.queue) == 200
    assert await ack(redis_client, keys, [], stats={}) == []  # nothing to release: a no-op, not an error


async def test_split_lease(redis_client: aioredis.Redis, keys: QueueKeys) -> None:
    await push(redis_client, keys, payloads(0, 1203), cap=10_000)
    poison = await claim(redis_client, keys, 1203, "poison", token="owner")
    await redis_client.hset(keys.reclaims, "poison", 3)
    parts = [("p1", payloads(0, 1)), ("p2", payloads(1, 2)), ("empty", []), ("rest", payloads(2, 1203))]
    assert await split_lease(redis_client, keys, poison, parts)
    assert not await redis_client.exists(keys.inflight("poison"))
    assert not await redis_client.hexists(keys.reclaims, "poison")
    leases = {member.decode() for member in await redis_client.zrange(keys.leases, 0, -1)}
    assert leases == {"p1", "p2", "rest"}, "no lease for an empty part, none left for the old batch"
    owners = {k.decode(): v.decode() for k, v in (await redis_client.hgetall(keys.owners)).items()}
    assert owners == {"p1": "owner", "p2": "owner", "rest": "owner"}, "the parts stay the splitter's"
    assert await redis_client.lrange(keys.inflight("p2"), 0, -1) == payloads(1, 2)
    assert await redis_client.lrange(keys.inflight("rest"), 0, -1) == payloads(2, 1203)
    assert await mark_reclaims(redis_client, keys, Claim("p1", [], 0, "owner"), 5)
    assert await redis_client.hget(keys.reclaims, "p1") == b"5"


async def test_split_and_mark_run_under_oom(tmp_path: Path) -> None:
    with start_redis(tmp_path, "--maxmemory-policy", "noeviction") as srv:
        client = aioredis.Redis.from_url(srv.url)
        try:
            keys = QueueKeys("oom")
            await push(client, keys, [b"x" * 10_000] * 200, cap=1_000_000)
            taken = await claim(client, keys, 10, "b")
            await client.config_set("maxmemory", int((await client.info("memory"))["used_memory"]) // 2)
            with pytest.raises(OutOfMemoryError):
                await client.hset(keys.reclaims, "b", 1)
            assert await split_lease(
                client, keys, taken, [("b1", [b"x" * 10_000] * 5), ("b2", [b"x" * 10_000] * 5)]
            )
            assert await mark_reclaims(client, keys, taken._replace(batch_id="b1"), 9)
            assert await client.llen(keys.inflight("b2")) == 5
            assert await client.hget(keys.reclaims, "b1") == b"9"
        finally:
            await client.aclose()


def test_dead_letter_entry() -> None:
    entry = msgspec.json.decode(dead_letter_entry(b'{"v": 1, "x": "\xc3\xa9"}', "bad", sqlstate="22P02"))
    assert entry["payload"] == '{"v": 1, "x": "é"}'
    assert entry["error"] == "bad"
    assert entry["sqlstate"] == "22P02"
    assert abs(entry["failed_at"] - time.time()) < 60
    raw = msgspec.json.decode(dead_letter_entry(b"\x80\x04pickle", "not JSON"))
    assert raw["payload"] == "\\x80\x04pickle", "undecodable bytes kept visibly, never lost"
    assert msgspec.json.decode(dead_letter_entry("text", "e"))["payload"] == "text"


async def test_batch_ids_are_free_form(redis_client: aioredis.Redis, keys: QueueKeys) -> None:
    """Ids with separators, hash-tag braces and non-ASCII go through claim, take-over and ack intact."""
    odd = "a:b {c} é/1"
    await push(redis_client, keys, payloads(0, 2), cap=100)
    first = await claim(redis_client, keys, 2, odd)
    assert await redis_client.lrange(keys.inflight(odd), 0, -1) == payloads(0, 2)
    await redis_client.zadd(keys.leases, {odd: 1})
    assert await expired_leases(redis_client, keys, 60) == [(odd, "1")]
    taken = await take_over(redis_client, keys, odd, "1", 60)
    assert taken is not None and taken.items == first.items
    assert await ack(redis_client, keys, [taken]) == [True]
    assert not await redis_client.exists(keys.inflight(odd), keys.leases, keys.owners)


# -- claim_many: a transaction's claims in one round trip, each the same idempotent claim script ---------


CM = QueueKeys("cm")


def _attempts(n: int, tag: str = "b") -> list[tuple[str, str]]:
    return [(f"{tag}{i}", new_token()) for i in range(n)]


async def test_claims_in_order_until_the_queue_is_empty(own_redis: aioredis.Redis) -> None:
    payloads = [f"e{i}".encode() for i in range(250)]
    await push(own_redis, CM, payloads, cap=1000)
    attempts = _attempts(5)
    claims = await claim_many(own_redis, CM, 100, attempts)
    assert [c.batch_id for c in claims] == [b for b, _ in attempts]
    assert [c.token for c in claims] == [t for _, t in attempts]
    assert [len(c.items) for c in claims] == [100, 100, 50, 0, 0]
    assert [raw for c in claims for raw in c.items] == payloads  # oldest first, none twice
    # Leases (and owners) only for the claims that took something.
    leased = {m.decode() for m in await own_redis.zrange(CM.leases, 0, -1)}
    assert leased == {"b0", "b1", "b2"}
    assert await own_redis.llen(CM.queue) == 0


async def test_the_same_attempts_again_pop_nothing_more(own_redis: aioredis.Redis) -> None:
    """A pipeline whose reply was lost is sent again: each claim hands back what it took."""
    await push(own_redis, CM, [f"e{i}".encode() for i in range(150)], cap=1000)
    attempts = _attempts(3)
    first = await claim_many(own_redis, CM, 100, attempts)
    await push(own_redis, CM, [b"later"], cap=1000)
    again = await claim_many(own_redis, CM, 100, attempts)
    assert [c.items for c in again[:2]] == [c.items for c in first[:2]]
    # The third took nothing the first time (no lease): now it claims what arrived since.
    assert again[2].items == [b"later"]
    assert await own_redis.llen(CM.queue) == 0


async def test_one_round_trip_and_a_restarted_servers_empty_script_cache(own_redis: aioredis.Redis) -> None:
    await push(own_redis, CM, [f"e{i}".encode() for i in range(400)], cap=1000)
    await claim_many(own_redis, CM, 100, _attempts(1, "warm"))  # loads the script
    await own_redis.config_resetstat()
    claims = await claim_many(own_redis, CM, 100, _attempts(2))
    stats = await own_redis.info("commandstats")
    assert int(stats["cmdstat_evalsha"]["calls"]) == 2
    assert [len(c.items) for c in claims] == [100, 100]
    await own_redis.script_flush()  # as after a restart or a failover: EVALSHA answers NOSCRIPT
    [last] = await claim_many(own_redis, CM, 100, _attempts(1, "after"))
    assert len(last.items) == 100
    assert await own_redis.llen(CM.queue) == 0
