"""claim_many: a transaction's claims in one round trip, each the same idempotent claim script."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from analytics_sdk._queue import QueueKeys, claim_many, new_token, push
from tests.servers import RedisServer, start_redis


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    """Our own redis-server: exact command counts and SCRIPT FLUSH are safe there."""
    with start_redis(tmp_path) as srv:
        yield srv


@pytest.fixture
async def own_redis(server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(server.url)
    yield client
    await client.aclose()


KEYS = QueueKeys("cm")


def _attempts(n: int, tag: str = "b") -> list[tuple[str, str]]:
    return [(f"{tag}{i}", new_token()) for i in range(n)]


async def test_claims_in_order_until_the_queue_is_empty(own_redis: aioredis.Redis) -> None:
    payloads = [f"e{i}".encode() for i in range(250)]
    await push(own_redis, KEYS, payloads, cap=1000)
    attempts = _attempts(5)
    claims = await claim_many(own_redis, KEYS, 100, attempts)
    assert [c.batch_id for c in claims] == [b for b, _ in attempts]
    assert [c.token for c in claims] == [t for _, t in attempts]
    assert [len(c.items) for c in claims] == [100, 100, 50, 0, 0]
    assert [raw for c in claims for raw in c.items] == payloads  # oldest first, none twice
    # Leases (and owners) only for the claims that took something.
    leased = {m.decode() for m in await own_redis.zrange(KEYS.leases, 0, -1)}
    assert leased == {"b0", "b1", "b2"}
    assert await own_redis.llen(KEYS.queue) == 0


async def test_the_same_attempts_again_pop_nothing_more(own_redis: aioredis.Redis) -> None:
    """A pipeline whose reply was lost is sent again: each claim hands back what it took."""
    await push(own_redis, KEYS, [f"e{i}".encode() for i in range(150)], cap=1000)
    attempts = _attempts(3)
    first = await claim_many(own_redis, KEYS, 100, attempts)
    await push(own_redis, KEYS, [b"later"], cap=1000)
    again = await claim_many(own_redis, KEYS, 100, attempts)
    assert [c.items for c in again[:2]] == [c.items for c in first[:2]]
    # The third took nothing the first time (no lease): now it claims what arrived since.
    assert again[2].items == [b"later"]
    assert await own_redis.llen(KEYS.queue) == 0


async def test_one_round_trip_and_a_restarted_servers_empty_script_cache(own_redis: aioredis.Redis) -> None:
    await push(own_redis, KEYS, [f"e{i}".encode() for i in range(400)], cap=1000)
    await claim_many(own_redis, KEYS, 100, _attempts(1, "warm"))  # loads the script
    await own_redis.config_resetstat()
    claims = await claim_many(own_redis, KEYS, 100, _attempts(2))
    stats = await own_redis.info("commandstats")
    assert int(stats["cmdstat_evalsha"]["calls"]) == 2
    assert [len(c.items) for c in claims] == [100, 100]
    await own_redis.script_flush()  # as after a restart or a failover: EVALSHA answers NOSCRIPT
    [last] = await claim_many(own_redis, KEYS, 100, _attempts(1, "after"))
    assert len(last.items) == 100
    assert await own_redis.llen(KEYS.queue) == 0
