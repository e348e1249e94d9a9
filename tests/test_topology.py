"""The shards a producer pushes to and the shards a drain visits, on the real Redis."""

from __future__ import annotations

from analytics_sdk import Settings
from analytics_sdk._keys import QueueKeys
from analytics_sdk._topology import known_shards, producer_shards, queue_client, record_shard_count


def test_one_shard_on_a_plain_redis_keeps_todays_keys(settings: Settings) -> None:
    assert producer_shards(settings) == (QueueKeys(settings.analytics_key_prefix),)
    assert producer_shards(settings)[0].queue == f"{settings.analytics_key_prefix}:events:batch"


async def test_drains_visit_every_shard_count_ever_recorded(settings: Settings) -> None:
    client = queue_client(settings)
    try:
        assert await known_shards(client, settings) == producer_shards(settings)
        for count in (4, 2):  # K raised to 4, then lowered to 2, by producers elsewhere
            await record_shard_count(client, settings.replace(analytics_queue_shards=count))
        visited = await known_shards(client, settings)
    finally:
        await client.aclose()
    expected = {
        *producer_shards(settings),
        *producer_shards(settings.replace(analytics_queue_shards=4)),
        *producer_shards(settings.replace(analytics_queue_shards=2)),
    }
    assert set(visited) == expected
    assert len(visited) == len(expected)  # each queue once
