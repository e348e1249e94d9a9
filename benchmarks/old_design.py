"""The design this project replaced, emulated for comparison. It exists ONLY in the benchmarks.

The older service kept a pickled list of events under one Redis key. Every ``track_event`` took a
``threading.Lock``, GET the key, ``pickle.loads`` the list, appended the event, ``pickle.dumps`` it
and SET it back; at ``batch_size`` (100) events the list was flushed (to the database) and emptied.
Its async entry point called that synchronous code directly, so the event loop stood still during
both round trips. Here the flush only DELs the key: the database write it did is not counted, which
flatters the old design. The only bytes unpickled are those this emulation itself pickled a moment
earlier under its own unique key; nothing in analytics_sdk/ or bridge/ ever unpickles anything.
"""

from __future__ import annotations

import pickle
import threading
import uuid
from datetime import UTC, datetime
from typing import Any

import redis

BATCH_SIZE = 100


class OldDesignClient:
    def __init__(self, client: redis.Redis, key: str, batch_size: int = BATCH_SIZE) -> None:
        self._redis = client
        self._key = key
        self._batch_size = batch_size
        self._lock = threading.Lock()
        self.flushed = 0

    def track_event(self, event_type: str, **fields: Any) -> str:
        event_id = str(uuid.uuid4())
        # The old service stored naive UTC datetimes (datetime.utcnow()).
        event = {
            "event_id": event_id,
            "event_type": event_type,
            **fields,
            "created_at": datetime.now(UTC).replace(tzinfo=None),
        }
        with self._lock:
            raw: bytes | None = self._redis.get(self._key)  # type: ignore[assignment]
            events: list[dict[str, Any]] = pickle.loads(raw) if raw else []
            events.append(event)
            self._redis.set(self._key, pickle.dumps(events))
            if len(events) >= self._batch_size:
                self._redis.delete(self._key)
                self.flushed += len(events)
        return event_id

    async def track(self, event_type: str, **fields: Any) -> str:
        """The old async API: a coroutine wrapping the blocking call (the loop waits on Redis)."""
        return self.track_event(event_type, **fields)
