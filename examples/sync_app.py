"""Sync code (Django views, Flask, scripts, thread pools): one SyncAnalyticsClient shared by threads.

    python examples/sync_app.py

The legacy ``track_event(...)`` call of the older service works unchanged, with the same keywords.
Calls from all threads go through one background event loop, so they share Redis round trips.
Configuration comes from ``ANALYTICS_*`` environment variables.
"""

from __future__ import annotations

import threading

from analytics_sdk import SyncAnalyticsClient

THREADS = 8
EVENTS_PER_THREAD = 25


def worker(client: SyncAnalyticsClient, n: int) -> None:
    for i in range(EVENTS_PER_THREAD):
        # The older service's call, keyword for keyword; integer ids are still accepted.
        client.track_event(
            event_type="page_view",
            user_id=1000 + n,
            session_id=f"thread-{n}",
            entity_type="product",
            entity_id=i,
            event_metadata='{"source": "sync_app"}',  # a JSON string is parsed, as before
            ip_address="198.51.100.7",
        )


def main() -> None:
    # Safe to share between threads, and to keep using in a child after os.fork().
    with SyncAnalyticsClient.from_env() as client:
        threads = [threading.Thread(target=worker, args=(client, n)) for n in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        client.track("checkout", user_id="1000", event_metadata={"total": 19.99})
        print(f"tracked {THREADS * EVENTS_PER_THREAD + 1} events from {THREADS} threads")
        print(f"queue size: {client.get_queue_size()}")


if __name__ == "__main__":
    main()
