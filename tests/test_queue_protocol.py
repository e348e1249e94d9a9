"""The queue protocol's guarantees (DESIGN §3): fenced leases, scripts idempotent under a client's
retry, lease times from Redis's clock, released leases taken over at once, renewal.

Each test drives the real scripts against the real Redis, as two drains (or one drain and its
retrying client) would, and then reads what Redis holds.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from analytics_sdk._queue import (
    Claim,
    QueueKeys,
    ack,
    claim,
    dead_letter_entry,
    expired_leases,
    mark_reclaims,
    push,
    release,
    renew,
    split_lease,
    take_over,
)


@pytest.fixture
def keys(key_prefix: str) -> QueueKeys:
    return QueueKeys(key_prefix)


def payloads(start: int, stop: int) -> list[bytes]:
    return [f"e{i}".encode() for i in range(start, stop)]


async def redis_now_ms(client: aioredis.Redis) -> int:
    seconds, micros = await client.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def snapshot(client: aioredis.Redis, keys: QueueKeys) -> dict[str, object]:
    """Everything the protocol keeps in Redis for one prefix (to prove a call changed nothing)."""
    inflight = sorted([k async for k in client.scan_iter(match=keys.inflight("*"))])
    return {
        "queue": await client.lrange(keys.queue, 0, -1),
        "leases": await client.zrange(keys.leases, 0, -1, withscores=True),
        "owners": await client.hgetall(keys.owners),
        "reclaims": await client.hgetall(keys.reclaims),
        "dead": await client.lrange(keys.dead, 0, -1),
        "stats": await client.hgetall(keys.stats),
        "inflight": {k: await client.lrange(k, 0, -1) for k in inflight},
    }


async def stale(client: aioredis.Redis, keys: QueueKeys, batch_id: str) -> str:
    """Age a lease as a paused drain's would be (score 1 ms after the epoch); the score as seen."""
    await client.zadd(keys.leases, {batch_id: 1}, xx=True)
    return "1"


# -- fencing -----------------------------------------------------------------------------------------


async def test_take_over_replaces_the_owner_and_fences_the_old_one(
    redis_client: aioredis.Redis, keys: QueueKeys
) -> None:
    """A drain paused past its lease wakes up after another took the batch over: every one of its
    writes (ack with dead letters and counters, split, renew, release, mark) does nothing."""
    await push(redis_client, keys, payloads(0, 4), cap=100)
    old = await claim(redis_client, keys, 4, "b", token="old-owner")
    seen = await stale(redis_client, keys, "b")
    new = await take_over(redis_client, keys, "b", seen, 60, token="new-owner")
    assert new is not None and new.token == "new-owner" and new.items == old.items
    assert await redis_client.hget(keys.owners, "b") == b"new-owner"
    before = await snapshot(redis_client, keys)

    flags = await ack(
        redis_client,
        keys,
        [old],
        dead_letters={"b": [dead_letter_entry(old.items[0], "poison")]},
        stats={"inserted": 3, "duplicates": 0},
        summary=b"{}",
    )
    assert flags == [False]
    assert not await split_lease(redis_client, keys, old, [("x", old.items[:2]), ("y", old.items[2:])])
    assert await renew(redis_client, keys, [old]) == [False]
    assert await release(redis_client, keys, [old]) == 0
    assert not await mark_reclaims(redis_client, keys, old, 9)

    after = await snapshot(redis_client, keys)
    assert after == before, "the stale owner wrote nothing: no dead letter, no counter, no release"
    assert after["dead"] == [] and after["stats"] == {}
    # The new owner still acts.
    assert await ack(redis_client, keys, [new], dead_letters={"b": [b"one"]}, stats={"inserted": 3}) == [True]
    assert await redis_client.lrange(keys.dead, 0, -1) == [b"one"]
    assert await redis_client.hget(keys.stats, "dead") == b"1"


async def test_partial_ack_writes_only_the_owned_batchs_dead_letters(
    redis_client: aioredis.Redis, keys: QueueKeys
) -> None:
    await push(redis_client, keys, payloads(0, 6), cap=100)
    mine = await claim(redis_client, keys, 3, "mine", token="me")
    lost = await claim(redis_client, keys, 3, "lost", token="me")
    taken = await take_over(redis_client, keys, "lost", await stale(redis_client, keys, "lost"), 60)
    assert taken is not None
    flags = await ack(
        redis_client,
        keys,
        [mine, lost],
        dead_letters={"mine": [b"dead-of-mine"], "lost": [b"dead-of-lost"]},
        stats={"inserted": 4, "duplicates": 1},
    )
    assert flags == [True, False]
    assert await redis_client.lrange(keys.dead, 0, -1) == [b"dead-of-mine"]
    stats = await redis_client.hgetall(keys.stats)
    assert stats[b"dead"] == b"1"
    assert stats[b"claimed"] == b"3", "only the owned batch's items are counted as claimed"
    assert (stats[b"inserted"], stats[b"duplicates"]) == (b"4", b"1"), "shared counters once"
    assert not await redis_client.exists(keys.inflight("mine"))
    # The batch taken over is untouched: its new owner holds it, its items and its reclaim count.
    assert await redis_client.lrange(keys.inflight("lost"), 0, -1) == payloads(3, 6)
    assert await redis_client.hget(keys.owners, "lost") == taken.token.encode()
    assert await redis_client.hget(keys.reclaims, "lost") == b"1"
    assert await redis_client.zscore(keys.leases, "lost") is not None


async def test_nothing_owned_writes_no_shared_counter(redis_client: aioredis.Redis, keys: QueueKeys) -> None:
    await push(redis_client, keys, payloads(0, 2), cap=100)
    old = await claim(redis_client, keys, 2, "b", token="old")
    assert await take_over(redis_client, keys, "b", await stale(redis_client, keys, "b"), 60) is not None
    assert await ack(redis_client, keys, [old], stats={"inserted": 2}, summary=b"{}") == [False]
    assert await redis_client.hgetall(keys.stats) == {}, "no counter and no summary from a stale drain"


# -- idempotence: a script sent again after its reply was lost ------------------------------------------


async def test_claim_run_twice_returns_the_same_items_and_pops_nothing(
    redis_client: aioredis.Redis, keys: QueueKeys
) -> None:
    await push(redis_client, keys, payloads(0, 10), cap=100)
    first = await claim(redis_client, keys, 4, "b", token="t")
    again = await claim(redis_client, keys, 4, "b", token="t")
    assert again == first
    assert await redis_client.lrange(keys.queue, 0, -1) == payloads(4, 10), "the retry popped nothing"
    assert await redis_client.lrange(keys.inflight("b"), 0, -1) == payloads(0, 4), "one batch, not two"
    # The ack then releases exactly what was claimed: nothing else disappears with it.
    assert await ack(redis_client, keys, [again]) == [True]
    assert await redis_client.lrange(keys.queue, 0, -1) == payloads(4, 10)
    # A claim of the same id by another token (a collision, or a taken-over batch) takes nothing.
    other = await claim(redis_client, keys, 4, "c", token="t1")
    assert await claim(redis_client, keys, 4, "c", token="t2") == Claim("c", [], 0, "t2", keys)
    assert await redis_client.lrange(keys.inflight("c"), 0, -1) == other.items
    assert await redis_client.llen(keys.queue) == 2


async def test_ack_run_twice_does_nothing_the_second_time(
    redis_client: aioredis.Redis, keys: QueueKeys
) -> None:
    await push(redis_client, keys, payloads(0, 5), cap=100)
    taken = await claim(redis_client, keys, 5, "b")
    args = {"dead_letters": {"b": [dead_letter_entry(b"e0", "poison")]}, "stats": {"inserted": 4}}
    assert await ack(redis_client, keys, [taken], **args) == [True]  # type: ignore[arg-type]
    before = await snapshot(redis_client, keys)
    assert await ack(redis_client, keys, [taken], **args) == [False]  # type: ignore[arg-type]
    assert await snapshot(redis_client, keys) == before
    assert await redis_client.llen(keys.dead) == 1
    assert await redis_client.hget(keys.stats, "dead") == b"1"
    assert await redis_client.hget(keys.stats, "inserted") == b"4"
    assert await redis_client.hget(keys.stats, "claimed") == b"5"


async def test_take_over_retried_with_the_same_token_counts_once(
    redis_client: aioredis.Redis, keys: QueueKeys
) -> None:
    await push(redis_client, keys, payloads(0, 3), cap=100)
    await claim(redis_client, keys, 3, "b")
    seen = await stale(redis_client, keys, "b")
    first = await take_over(redis_client, keys, "b", seen, 60, token="taker")
    again = await take_over(redis_client, keys, "b", seen, 60, token="taker")
    assert first is not None and again == first
    assert first.reclaims == 1
    assert await redis_client.hget(keys.reclaims, "b") == b"1", "counted once"
    assert await take_over(redis_client, keys, "b", seen, 60, token="someone-else") is None


async def test_push_with_the_same_token_queues_once(redis_client: aioredis.Redis, keys: QueueKeys) -> None:
    first = await push(redis_client, keys, payloads(0, 3), cap=100, token="push-1")
    again = await push(redis_client, keys, payloads(0, 3), cap=100, token="push-1")
    assert first == (3, 0, False)
    assert again == (3, 0, True), "the first result, marked as a repeat"
    assert await redis_client.lrange(keys.queue, 0, -1) == payloads(0, 3)
    ttl = await redis_client.pttl(keys.push_guard("push-1"))
    assert 0 < ttl <= 60_000, "the guard expires: it is not kept for ever"


async def test_push_retried_at_the_cap_counts_its_drops_once(
    redis_client: aioredis.Redis, keys: QueueKeys
) -> None:
    await push(redis_client, keys, payloads(0, 10), cap=10)
    first = await push(redis_client, keys, payloads(10, 14), cap=10, token="at-cap")
    again = await push(redis_client, keys, payloads(10, 14), cap=10, token="at-cap")
    assert first == (14, 4, False)
    assert again == (14, 4, True)
    assert await redis_client.get(keys.dropped) == b"4", "the retry dropped and counted nothing more"
    assert await redis_client.lrange(keys.queue, 0, -1) == payloads(4, 14)


# -- lease clocks: Redis's, never a host's -------------------------------------------------------------


async def test_lease_times_come_from_redis_not_from_a_skewed_host(
    redis_client: aioredis.Redis, keys: QueueKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """This host's clock runs an hour ahead (clock skew between worker hosts): the lease it takes is
    scored by Redis's clock, and a drain judging expiry does so by Redis's clock too."""
    skew = 3600.0
    real_time, real_time_ns = time.time, time.time_ns
    monkeypatch.setattr(time, "time", lambda: real_time() + skew)
    monkeypatch.setattr(time, "time_ns", lambda: real_time_ns() + int(skew * 1e9))
    await push(redis_client, keys, payloads(0, 3), cap=100)
    before = await redis_now_ms(redis_client)
    taken = await claim(redis_client, keys, 3, "b")
    after = await redis_now_ms(redis_client)
    score = await redis_client.zscore(keys.leases, "b")
    assert before <= score <= after
    assert await expired_leases(redis_client, keys, 60) == [], "live by Redis's clock"
    # Seen with its real score, the live lease is still refused: the script checks Redis's clock.
    assert await take_over(redis_client, keys, "b", str(int(score)), 60) is None
    assert await redis_client.hget(keys.owners, "b") == taken.token.encode()
    # Expiry: a lease whose score is 5 s behind Redis's clock is live at 60 s, expired at 1 s.
    await redis_client.zadd(keys.leases, {"b": after - 5_000})
    assert await take_over(redis_client, keys, "b", str(after - 5_000), 60) is None
    assert await expired_leases(redis_client, keys, 1) == [("b", str(after - 5_000))]
    assert await take_over(redis_client, keys, "b", str(after - 5_000), 1) is not None


async def test_a_lease_renewed_just_now_is_not_taken_over(
    redis_client: aioredis.Redis, keys: QueueKeys
) -> None:
    await push(redis_client, keys, payloads(0, 3), cap=100)
    mine = await claim(redis_client, keys, 3, "b")
    seen = await stale(redis_client, keys, "b")  # the drain was slow: its lease looks expired...
    assert await expired_leases(redis_client, keys, 60) == [("b", seen)]
    before = await redis_now_ms(redis_client)
    assert await renew(redis_client, keys, [mine]) == [True]  # ...but its heartbeat lands first
    assert await redis_client.zscore(keys.leases, "b") >= before
    assert await take_over(redis_client, keys, "b", seen, 60) is None, "the score it saw is gone"
    renewed = str(int(await redis_client.zscore(keys.leases, "b")))
    assert await take_over(redis_client, keys, "b", renewed, 60) is None, "and the renewed lease is live"
    assert await redis_client.hget(keys.reclaims, "b") is None
    assert await ack(redis_client, keys, [mine]) == [True]


async def test_renewal_keeps_a_lease_from_expiring(redis_client: aioredis.Redis, keys: QueueKeys) -> None:
    """Over three visibility timeouts, a heartbeat every quarter of it keeps the lease; once the
    heartbeats stop, the lease expires within one timeout."""
    visibility = 0.4
    await push(redis_client, keys, payloads(0, 3), cap=100)
    mine = await claim(redis_client, keys, 3, "b")
    loop = asyncio.get_running_loop()
    end = loop.time() + 3 * visibility
    while loop.time() < end:
        await asyncio.sleep(visibility / 4)
        assert await renew(redis_client, keys, [mine]) == [True]
        assert await expired_leases(redis_client, keys, visibility) == []
    deadline = loop.time() + 5 * visibility
    while not (leases := await expired_leases(redis_client, keys, visibility)):
        assert loop.time() < deadline, "an unrenewed lease must expire"
        await asyncio.sleep(visibility / 8)
    ((batch_id, seen),) = leases
    taken = await take_over(redis_client, keys, batch_id, seen, visibility)
    assert taken is not None and taken.reclaims == 1
    assert await renew(redis_client, keys, [mine]) == [False], "the old owner learns it lost the lease"


# -- release -----------------------------------------------------------------------------------------


async def test_released_lease_is_taken_over_at_once_without_counting(
    redis_client: aioredis.Redis, keys: QueueKeys
) -> None:
    """A drain that could not store its batch through no fault of the batch (PostgreSQL read-only, a
    Redis stall, a shutdown) releases it: the next drain takes it over at once, whatever the
    visibility timeout, and the take-over does not count towards the poison limit."""
    await push(redis_client, keys, payloads(0, 3), cap=100)
    mine = await claim(redis_client, keys, 3, "b", token="first")
    assert await mark_reclaims(redis_client, keys, mine, 2)  # it had been taken over twice before
    assert await release(redis_client, keys, [mine]) == 1
    assert await redis_client.zscore(keys.leases, "b") == 0
    assert not await redis_client.hexists(keys.owners, "b"), "the releaser owns it no more"
    assert await redis_client.lrange(keys.inflight("b"), 0, -1) == payloads(0, 3), "items kept"
    assert await expired_leases(redis_client, keys, 900) == [("b", "0")]
    taken = await take_over(redis_client, keys, "b", "0", 900, token="second")
    assert taken is not None
    assert taken.items == payloads(0, 3)
    assert taken.reclaims == 2, "not a death: the count stays"
    assert await redis_client.hget(keys.reclaims, "b") == b"2"
    assert await redis_client.zscore(keys.leases, "b") > 0, "live again, under its new owner"
    # The releaser's own late ack (or a second release) does nothing.
    assert await ack(redis_client, keys, [mine], dead_letters={"b": [b"x"]}) == [False]
    assert await release(redis_client, keys, [mine]) == 0
    assert await redis_client.llen(keys.dead) == 0
    assert await ack(redis_client, keys, [taken]) == [True]


async def test_release_is_idempotent_and_per_owner(redis_client: aioredis.Redis, keys: QueueKeys) -> None:
    await push(redis_client, keys, payloads(0, 4), cap=100)
    a = await claim(redis_client, keys, 2, "a", token="ta")
    b = await claim(redis_client, keys, 2, "b", token="tb")
    forged = Claim("b", [], 0, "not-tb")
    assert await release(redis_client, keys, [a, forged]) == 1
    assert await release(redis_client, keys, [a]) == 0, "released already: nothing more"
    assert await redis_client.zscore(keys.leases, "a") == 0
    assert await redis_client.zscore(keys.leases, "b") > 0
    assert await redis_client.hget(keys.owners, "b") == b"tb"
    assert await renew(redis_client, keys, [a, b]) == [False, True], "a released lease is not renewed"
    assert await redis_client.zscore(keys.leases, "a") == 0
