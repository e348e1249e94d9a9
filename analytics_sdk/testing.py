"""Test doubles for applications: clients that validate like the real ones and record instead of sending.

:class:`RecordingClient` stands in for :class:`~analytics_sdk.AnalyticsClient` and
:class:`RecordingSyncClient` for :class:`~analytics_sdk.SyncAnalyticsClient`: the same methods with
the same signatures, the same validation (the very function the real clients call, so the same
:class:`~analytics_sdk.ValidationError` naming the same field), the same errors once closed. Nothing
ever connects: no Redis, no broker, no thread, no socket.

``.events`` holds what the bridge would receive: each accepted event as an :class:`~analytics_sdk.Event`
decoded from the exact bytes the real client would have queued (ids filled in, ``user_id=42`` as
``"42"``, metadata given as a JSON string parsed, ``created_at`` an aware UTC datetime), in the order
``track()`` returned. Events rejected by validation are not recorded; ``track_many`` with one bad event
records none, as the real one pushes none. ``get_queue_size()`` counts the recorded events (nothing
drains them), ``flush_events_now()`` counts its calls in ``.flush_requests`` and ``ping()`` answers
True (counted in ``.pings``). ``ANALYTICS_ENABLED`` does not apply: a recorder always records.

::

    from analytics_sdk.testing import RecordingClient

    async def test_signup_is_tracked():
        analytics = RecordingClient()
        await signup(analytics, email="a@example.com")          # your code, given the recorder
        assert [e.event_type for e in analytics.events] == ["signup"]

With the package installed, pytest also gets the fixtures ``analytics_recorder`` and
``analytics_sync_recorder`` (see :mod:`analytics_sdk.pytest_plugin`).
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from ._event import Event, decode, encode_fields
from ._exceptions import AnalyticsError, ClientClosedError
from ._keys import QueueKeys
from ._settings import Settings

if TYPE_CHECKING:
    from ._redis import AnyRedis

__all__ = ["RecordingClient", "RecordingSyncClient"]


class _Recorder:
    """What both recorders share: validation exactly as the real clients do it, and the record."""

    def __init__(self, settings: Settings | None) -> None:
        self.settings = settings or Settings()
        self.keys = QueueKeys(self.settings.analytics_key_prefix)
        #: Every accepted event, oldest first, as the bridge would decode it.
        self.events: list[Event] = []
        #: How many times flush_events_now() was called.
        self.flush_requests = 0
        #: How many times ping() was called (a readiness probe under test).
        self.pings = 0
        self._closed = False
        # Threads may track at once (the sync client is thread-safe): a track_many stays contiguous.
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<{type(self).__name__} {state} events={len(self.events)}>"

    @property
    def closed(self) -> bool:
        return self._closed

    def clear(self) -> None:
        """Forget the recorded events and flush requests (the client stays open)."""
        with self._lock:
            self.events.clear()
            self.flush_requests = self.pings = 0

    def _encode(self, fields: Mapping[str, Any]) -> tuple[str, bytes]:
        # The real clients' own hot path: same checks, same order, so the same first ValidationError.
        return encode_fields(fields, max_metadata_bytes=self.settings.analytics_max_metadata_bytes)

    def _encode_all(self, events: Iterable[Mapping[str, Any] | Event]) -> list[tuple[str, bytes]]:
        return [(e.event_id, e.encode()) if isinstance(e, Event) else self._encode(e) for e in events]

    def _record(self, payloads: list[bytes]) -> None:
        limit = self.settings.analytics_max_metadata_bytes
        decoded = [decode(raw, max_metadata_bytes=limit) for raw in payloads]
        with self._lock:
            self.events.extend(decoded)

    def _count_ping(self) -> None:
        with self._lock:
            self.pings += 1

    def _new_task_id(self) -> str:
        with self._lock:
            self.flush_requests += 1
        return str(uuid.uuid4())  # the shape of a Celery task id; no task exists


class RecordingClient(_Recorder):
    """Drop-in for :class:`~analytics_sdk.AnalyticsClient` that records instead of sending.

    Like the real client it belongs to the event loop it is first used in, and raises
    :class:`~analytics_sdk.ClientClosedError` once closed. ``redis`` is accepted for the signature's
    sake and never used.
    """

    def __init__(self, settings: Settings | None = None, *, redis: AnyRedis | None = None) -> None:
        super().__init__(settings)
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Self:
        """Configured from ``ANALYTICS_*`` like the real client (the metadata limit matters here)."""
        return cls(Settings.from_env(environ, **overrides))

    async def __aenter__(self) -> Self:
        self._check_open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def track(self, event_type: str, **fields: Any) -> str:
        """Validate one event and record it; returns its event_id."""
        fields["event_type"] = event_type
        event_id, raw = self._encode(fields)
        self._check_open()
        self._record([raw])
        return event_id

    async def track_event(
        self,
        event_type: str,
        user_id: str | int | None = None,
        session_id: str | None = None,
        entity_type: str | None = None,
        entity_id: str | int | None = None,
        event_metadata: Mapping[str, Any] | str | None = None,
        ip_address: str | None = None,
        user_agent: str | None = None,
        referrer: str | None = None,
        created_at: datetime | str | None = None,
    ) -> str:
        """The older service's call, with its signature (positional too); same as :meth:`track`."""
        return await self.track(
            event_type,
            user_id=user_id,
            session_id=session_id,
            entity_type=entity_type,
            entity_id=entity_id,
            event_metadata=event_metadata,
            ip_address=ip_address,
            user_agent=user_agent,
            referrer=referrer,
            created_at=created_at,
        )

    async def track_many(self, events: Iterable[Mapping[str, Any] | Event]) -> list[str]:
        """Validate every event first (one bad event records none), then record all."""
        self._check_open()
        encoded = self._encode_all(events)
        self._record([raw for _, raw in encoded])
        return [event_id for event_id, _ in encoded]

    async def get_queue_size(self) -> int:
        """The number of recorded events (nothing drains them)."""
        self._check_open()
        return len(self.events)

    async def flush_events_now(self) -> str | None:
        """Count the request in ``flush_requests``; returns a made-up task id."""
        self._check_open()
        return self._new_task_id()

    async def ping(self) -> bool:
        """True: a recorder is always ready (nothing to reach). Counted in ``pings``."""
        self._check_open()
        self._count_ping()
        return True

    async def aclose(self) -> None:
        """Close (idempotent); the record stays readable."""
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosedError("this AnalyticsClient is closed; create a new one")
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:  # the real client refuses this too: keep tests honest
            raise AnalyticsError(
                "this AnalyticsClient belongs to another event loop; create one client per loop "
                "(or use SyncAnalyticsClient from threads)"
            )


class RecordingSyncClient(_Recorder):
    """Drop-in for :class:`~analytics_sdk.SyncAnalyticsClient` that records instead of sending.

    Thread-safe; raises :class:`~analytics_sdk.ClientClosedError` once closed.
    """

    def __init__(self, settings: Settings | None = None) -> None:
        super().__init__(settings)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Self:
        return cls(Settings.from_env(environ, **overrides))

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def track(self, event_type: str, **fields: Any) -> str:
        """Validate one event and record it; returns its event_id."""
        fields["event_type"] = event_type
        event_id, raw = self._encode(fields)
        self._check_open()
        self._record([raw])
        return event_id

    def track_event(
        self,
        event_type: str,
        user_id: str | int | None = None,
        session_id: str | None = None,
        entity_type: str | None = None,
        entity_id: str | int | None = None,
        event_metadata: Mapping[str, Any] | str | None = None,
        ip_address: str | None = None,
        user_agent: str | None = None,
        referrer: str | None = None,
        created_at: datetime | str | None = None,
    ) -> str:
        """The older service's call, with its keyword signature; same as :meth:`track`."""
        return self.track(
            event_type,
            user_id=user_id,
            session_id=session_id,
            entity_type=entity_type,
            entity_id=entity_id,
            event_metadata=event_metadata,
            ip_address=ip_address,
            user_agent=user_agent,
            referrer=referrer,
            created_at=created_at,
        )

    def track_many(self, events: Iterable[Mapping[str, Any] | Event]) -> list[str]:
        """Validate all, then record all; one bad event records none."""
        self._check_open()
        encoded = self._encode_all(events)
        self._record([raw for _, raw in encoded])
        return [event_id for event_id, _ in encoded]

    def get_queue_size(self) -> int:
        """The number of recorded events (nothing drains them)."""
        self._check_open()
        return len(self.events)

    def flush_events_now(self) -> str | None:
        """Count the request in ``flush_requests``; returns a made-up task id."""
        self._check_open()
        return self._new_task_id()

    def ping(self) -> bool:
        """True: a recorder is always ready (nothing to reach). Counted in ``pings``."""
        self._check_open()
        self._count_ping()
        return True

    def close(self) -> None:
        """Close (idempotent); the record stays readable."""
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosedError("this SyncAnalyticsClient is closed; create a new one")
