"""ASGI middleware: one analytics event per HTTP request, for any ASGI framework.

::

    from analytics_sdk.asgi import AnalyticsMiddleware

    app = FastAPI()                                 # or Starlette, Litestar, Django's get_asgi_application()
    app.add_middleware(AnalyticsMiddleware)         # settings from ANALYTICS_*
    # or, for any ASGI app:  app = AnalyticsMiddleware(app, skip_paths=["/healthz"])

Plain ASGI (nothing imported from a framework). Each request becomes one event (``event_type``
``"http_request"`` unless told otherwise) with the method, path, status and duration in its metadata,
the user agent, the referrer and the client's IP address (:mod:`._proxies`: the peer, or through our
trusted proxies the forwarded address read right to left). ``hook(scope)`` may add fields
(``user_id``, ``session_id``, ``entity_type``, ``entity_id``, more ``event_metadata``); it runs once the
response is sent, so it sees what the endpoint left in ``scope["state"]`` (Starlette's
``request.state``).

When: the event is tracked after the application has sent the last body chunk and returned, so the
response is on its way before the Redis round trip starts; the request's task waits for that round trip
(bounded by ``ANALYTICS_PUBLISH_TIMEOUT``, and free while Redis is known down) instead of leaving a
task behind that shutdown would have to chase. Its ``created_at`` is the request's arrival.

The client: an :class:`~analytics_sdk.AnalyticsClient` made on the server's event loop when the lifespan
starts (or at the first request if the server sends no lifespan), closed when the lifespan shuts down.
An application that does not speak the lifespan protocol (Django) gets it answered by the middleware.
``client=`` uses one of yours instead (a :class:`~analytics_sdk.testing.RecordingClient` in tests),
which the middleware never closes. Endpoints find the client in ``scope["state"]["analytics"]``
(Starlette/FastAPI: ``request.state.analytics``), for events of their own and for a readiness probe
(``await request.state.analytics.ping()``).

A tracking failure (Redis down, a field the hook got wrong, a bug in the hook) never changes the
response: it is logged as a WARNING, at most one per 10 seconds, counting the requests missed.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from datetime import datetime
from typing import Any, Protocol

from ._client import AnalyticsClient
from ._proxies import ForwardedHeader, Network
from ._settings import Settings
from ._tracking import DEFAULT_EVENT_TYPE, FailureLog, RequestFacts, Tracking, now_utc

__all__ = ["STATE_KEY", "AnalyticsMiddleware", "Hook"]

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
#: ``hook(scope)`` -> fields to add to the event (or None); may be a coroutine function.
Hook = Callable[[Scope], Mapping[str, Any] | Awaitable[Mapping[str, Any] | None] | None]

#: Where endpoints find the client: ``scope["state"]["analytics"]``, Starlette's ``request.state.analytics``.
STATE_KEY = "analytics"
_FINAL = ("http.response.pathsend", "http.response.zerocopysend")  # extensions that end a response too


class _Client(Protocol):
    """What the middleware needs of a client: AnalyticsClient, or the test kit's RecordingClient."""

    async def track(self, event_type: str, **fields: Any) -> str: ...

    async def aclose(self) -> None: ...


class AnalyticsMiddleware:
    """Track one event per HTTP request; see the module docstring.

    ``skip_paths``: exact paths or prefixes ending in ``*`` not tracked (health checks).
    ``trusted_proxies``: networks of our reverse proxies (``"10.0.0.0/8, ::1"`` or a list); ``None``
    trusts loopback only, an empty list trusts nobody. ``forwarded_header``: the one header they write,
    ``"x-forwarded-for"`` or ``"forwarded"`` (RFC 7239). ``settings``: instead of ``ANALYTICS_*``.
    """

    def __init__(
        self,
        app: ASGIApp,
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
        self._given = client
        # Read now, when the app is built: a bad ANALYTICS_* value fails the start, not every request.
        self._settings = settings if settings is not None or client is not None else Settings.from_env()
        self._clients: dict[asyncio.AbstractEventLoop, AnalyticsClient] = {}  # ours, one per loop
        self.failures = FailureLog(logger)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
        else:  # websocket and anything newer: not ours
            await self.app(scope, receive, send)

    # -- the client's life ------------------------------------------------------------------------

    async def _client(self) -> _Client:
        if self._given is not None:
            return self._given
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            # A loop that ended (a test client running each request in its own loop) took its
            # client's connections with it: close what is left of those clients without waiting.
            for gone in [other for other in self._clients if other.is_closed()]:
                await self._clients.pop(gone).aclose()
            client = self._clients[loop] = AnalyticsClient(self._settings)
        return client

    async def aclose(self) -> None:
        """Close the client this loop's requests used (a server without lifespan, a test); the
        lifespan shutdown does this by itself. Idempotent; a client given with ``client=`` stays open."""
        await self._close()

    async def _close(self) -> None:
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()  # waits for events already handed over (bounded by the deadline)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        startup_received = startup_answered = False

        async def receive_() -> Message:
            nonlocal startup_received
            message = await receive()
            if message["type"] == "lifespan.startup":
                startup_received = True
                client = await self._client()  # made here, on the server's loop, before serving
                if isinstance(scope.get("state"), dict):  # lifespan state: copied into every request
                    scope["state"][STATE_KEY] = client
            return message

        async def send_(message: Message) -> None:
            nonlocal startup_answered
            if message["type"].startswith("lifespan.startup."):
                startup_answered = True
            elif message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await self._close()
            await send(message)

        try:
            await self.app(scope, receive_, send_)
        except Exception as exc:
            if startup_answered:  # the app speaks lifespan and failed in it: its failure stands
                raise
            logger.info(
                "the application does not support the ASGI lifespan protocol (%s: %s); "
                "AnalyticsMiddleware answers it to open and close its analytics client",
                type(exc).__name__,
                exc,
            )
        if startup_answered:
            return
        # The app ignored or refused the lifespan (Django raises for it): answer it ourselves.
        if not startup_received:
            await receive_()
        await send_({"type": "lifespan.startup.complete"})
        while (await receive())["type"] != "lifespan.shutdown":
            pass
        await send_({"type": "lifespan.shutdown.complete"})

    # -- one request ------------------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started_at, start = now_utc(), time.perf_counter()
        scope.setdefault("state", {})[STATE_KEY] = await self._client()  # skipped paths too: probes
        if self._tracking.skips(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        status: int | None = None
        ended: float | None = None

        async def send_(message: Message) -> None:
            nonlocal status, ended
            kind = message["type"]
            if kind == "http.response.start":
                status = int(message["status"])
            await send(message)
            if ended is None and (
                (kind == "http.response.body" and not message.get("more_body", False)) or kind in _FINAL
            ):
                ended = time.perf_counter()

        try:
            await self.app(scope, receive, send_)
        except Exception:
            # Nothing sent yet: the server answers 500. Tracked, then the error goes on its way.
            await self._track(scope, status or 500, started_at, (ended or time.perf_counter()) - start)
            raise
        # An app that returned without a response gets a 500 from the server.
        await self._track(scope, status or 500, started_at, (ended or time.perf_counter()) - start)

    async def _track(self, scope: Scope, status: int, started_at: datetime, duration: float) -> None:
        method, path = str(scope.get("method", "")), str(scope.get("path", ""))
        try:
            extra = self._hook(scope) if self._hook is not None else None
            if inspect.isawaitable(extra):
                extra = await extra
            wanted = self._tracking.forwarded_header.encode()
            user_agent = referrer = None
            forwarded: list[str] = []
            for name, value in scope.get("headers", ()):
                if name == b"user-agent":
                    user_agent = value.decode("latin-1")
                elif name == b"referer":
                    referrer = value.decode("latin-1")
                elif name == wanted:
                    forwarded.append(value.decode("latin-1"))
            peer = scope.get("client")
            facts = RequestFacts(
                method=method,
                path=path,
                status=status,
                started_at=started_at,
                duration=duration,
                peer=str(peer[0]) if peer else None,
                user_agent=user_agent,
                referrer=referrer,
                forwarded=forwarded,
            )
            client = await self._client()
            await client.track(**self._tracking.fields(facts, extra))
        except Exception as exc:  # never the response's problem: logged, rate-limited
            self.failures.failed(method, path, exc)
