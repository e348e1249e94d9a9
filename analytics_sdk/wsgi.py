"""WSGI middleware: one analytics event per HTTP request, for Flask, Django and any WSGI app.

::

    from analytics_sdk.wsgi import AnalyticsMiddleware

    app.wsgi_app = AnalyticsMiddleware(app.wsgi_app)          # Flask
    application = AnalyticsMiddleware(get_wsgi_application())  # Django's wsgi.py

The twin of :mod:`analytics_sdk.asgi` (same options, same event, same failure policy) over one
:class:`~analytics_sdk.SyncAnalyticsClient`, which is thread-safe and fork-safe: made with the app,
it starts its loop thread and connections in each worker process on first use (gunicorn's
``--preload`` included). ``hook(environ)`` may add fields; it runs after the response body was sent,
when a framework's request object is gone, so let the view leave what the hook needs in the environ
(Flask ``request.environ["myapp.user_id"] = ...``, Django ``request.META[...]``).

When: the event is tracked when the server closes the response iterable (PEP 3333 requires it
to, after the last byte was written), so the response is sent before the Redis round trip; the
worker thread then waits for that round trip, bounded by ``ANALYTICS_PUBLISH_TIMEOUT`` and free while
Redis is known down. ``close()`` closes the client (a process that exits without it loses nothing:
every event was acknowledged before its request's thread went on).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime
from types import TracebackType
from typing import Any, Protocol

from ._proxies import ForwardedHeader, Network
from ._settings import Settings
from ._sync import SyncAnalyticsClient
from ._tracking import DEFAULT_EVENT_TYPE, FailureLog, RequestFacts, Tracking, now_utc

__all__ = ["AnalyticsMiddleware", "Hook"]

logger = logging.getLogger(__name__)

Environ = dict[str, Any]
ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]
StartResponse = Callable[..., Callable[[bytes], object]]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]
#: ``hook(environ)`` -> fields to add to the event (or None).
Hook = Callable[[Environ], Mapping[str, Any] | None]


class _Client(Protocol):
    """What the middleware needs of a client: SyncAnalyticsClient, or RecordingSyncClient."""

    def track(self, event_type: str, **fields: Any) -> str: ...

    def close(self) -> None: ...


def _native(environ: Environ, key: str) -> str:
    # WSGI hands bytes over as latin-1 "native strings": undo that, then read them as UTF-8.
    return str(environ.get(key, "")).encode("latin-1", "replace").decode("utf-8", "replace")


class _Body:
    """The app's response iterable, with ``close()`` (called by the server once it is sent) tracking."""

    def __init__(self, body: Iterable[bytes], on_close: Callable[[], None]) -> None:
        self._body = body
        self._on_close = on_close

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._body)

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._on_close()


class AnalyticsMiddleware:
    """Track one event per HTTP request; options as :class:`analytics_sdk.asgi.AnalyticsMiddleware`."""

    def __init__(
        self,
        app: WSGIApp,
        *,
        event_type: str = DEFAULT_EVENT_TYPE,
        skip_paths: Iterable[str] = (),
        hook: Hook | None = None,
        trusted_proxies: str | Iterable[str | Network] | None = None,
        forwarded_header: ForwardedHeader = "x-forwarded-for",
        settings: Settings | None = None,
        client: _Client | None = None,
    ) -> None:
        self.app = app
        self._tracking = Tracking(
            event_type=event_type,
            skip_paths=skip_paths,
            trusted_proxies=trusted_proxies,
            forwarded_header=forwarded_header,
        )
        self._hook = hook
        self._owns_client = client is None
        # Made now, connected lazily in each process that uses it: nothing is opened at import.
        self.client: _Client = (
            client if client is not None else SyncAnalyticsClient(settings or Settings.from_env())
        )
        self._forwarded_key = "HTTP_" + forwarded_header.upper().replace("-", "_")
        self.failures = FailureLog(logger)

    def close(self) -> None:
        """Close the client the middleware made (not one it was given). Idempotent."""
        if self._owns_client:
            self.client.close()

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        path = _native(environ, "SCRIPT_NAME") + _native(environ, "PATH_INFO")
        if self._tracking.skips(path):
            return self.app(environ, start_response)
        started_at, start = now_utc(), time.perf_counter()
        status: list[int] = []

        def start_response_(status_line: str, headers: Any, exc_info: ExcInfo | None = None) -> Any:
            status[:] = [int(status_line.split(" ", 1)[0])]
            if exc_info is None:
                return start_response(status_line, headers)
            return start_response(status_line, headers, exc_info)

        def track() -> None:
            # No status: the app failed before start_response, so the server answers 500.
            self._track(environ, path, status[-1] if status else 500, started_at, time.perf_counter() - start)

        try:
            body = self.app(environ, start_response_)
        except Exception:
            track()
            raise
        return _Body(body, track)

    def _track(self, environ: Environ, path: str, status: int, started_at: datetime, duration: float) -> None:
        method = str(environ.get("REQUEST_METHOD", ""))
        try:
            extra = self._hook(environ) if self._hook is not None else None
            forwarded = environ.get(self._forwarded_key)
            facts = RequestFacts(
                method=method,
                path=path,
                status=status,
                started_at=started_at,
                duration=duration,
                peer=environ.get("REMOTE_ADDR") or None,
                user_agent=_native(environ, "HTTP_USER_AGENT") or None,
                referrer=_native(environ, "HTTP_REFERER") or None,
                forwarded=[forwarded] if forwarded else [],  # the server joined repeated headers with ","
            )
            self.client.track(**self._tracking.fields(facts, extra))
        except Exception as exc:  # never the response's problem: logged, rate-limited
            self.failures.failed(method, path, exc)
