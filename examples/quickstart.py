"""Quick start: track a few events from an asyncio app and read the queue size.

    python examples/quickstart.py

Configuration comes from ANALYTICS_* environment variables (ANALYTICS_REDIS_URL, ANALYTICS_KEY_PREFIX,
...); with none set it uses Redis on 127.0.0.1:6379. The events wait in Redis until a bridge worker
(`celery -A bridge worker -B -Q analytics`) or `analytics-bridge flush` moves them to PostgreSQL.
"""

from __future__ import annotations

import asyncio

from analytics_sdk import AnalyticsClient, ValidationError


async def main() -> None:
    # One client per event loop; `async with` closes its Redis connection at the end.
    async with AnalyticsClient.from_env() as client:
        # track() returns once Redis has acknowledged the event: it survives a crash of this process.
        event_id = await client.track(
            "page_view",
            user_id="42",
            session_id="s-1",
            entity_type="article",
            entity_id="7",
            event_metadata={"path": "/articles/7", "scroll": 0.8},
            ip_address="203.0.113.9",
            user_agent="Mozilla/5.0 (X11; Linux x86_64)",
            referrer="https://example.com/",
        )
        print(f"tracked page_view {event_id}")

        # Concurrent calls on one client share one Redis round trip (group commit).
        ids = await asyncio.gather(
            *(client.track("click", user_id="42", event_metadata={"button": f"b{n}"}) for n in range(3))
        )
        print(f"tracked {len(ids)} clicks")

        # track_many validates all first: one bad event pushes none.
        await client.track_many(
            [{"event_type": "search", "user_id": "42", "event_metadata": {"q": "redis"}}] * 2
        )

        # Bad input raises ValidationError naming the field, before anything is sent.
        try:
            await client.track("page_view", ip_address="not-an-ip")
        except ValidationError as exc:
            print(f"rejected: {exc}")

        print(f"queue size: {await client.get_queue_size()}")


if __name__ == "__main__":
    asyncio.run(main())
