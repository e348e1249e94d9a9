"""FastAPI: track a page_view per request, with the client's real IP, user agent and referrer.

    pip install fastapi uvicorn
    TRUSTED_PROXIES=10.0.0.0/8 uvicorn examples.fastapi_app:app

The client IP is the peer address, unless the peer is one of *our* proxies (``TRUSTED_PROXIES``,
comma-separated networks, default loopback only): then ``X-Forwarded-For`` is read right to left,
skipping our proxies, and the first address not ours is the client. Everything left of it was written
by the client and may be forged, so the raw header is never used as is. The AnalyticsClient is made in
the lifespan, on the server's event loop, and closed there. SDK settings come from ``ANALYTICS_*``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response

from analytics_sdk import AnalyticsClient, AnalyticsError

logger = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
NextHandler = Callable[[Request], Awaitable[Response]]


def parse_networks(text: str) -> list[Network]:
    return [ipaddress.ip_network(part.strip()) for part in text.split(",") if part.strip()]


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


def client_ip(peer: str | None, forwarded_for: Iterable[str], trusted: Sequence[Network]) -> str | None:
    """The client's address: the peer, or the right-most X-Forwarded-For hop that is not our proxy."""
    address = _ip(peer) if peer else None
    if address is None:
        return None
    hops = [hop for header in forwarded_for for hop in header.split(",")]
    while any(address in net for net in trusted):
        if not hops:
            return str(address)  # every hop is ours: an internal request
        address = _ip(hops.pop())
        if address is None:
            return None  # garbage where a proxy of ours would have written an address: unknown
    return str(address)


def create_app(trusted_proxies: Sequence[Network] | None = None) -> FastAPI:
    """``trusted_proxies``: our proxies' networks; ``[]`` trusts no proxy at all (the peer is the
    client), ``None`` reads ``TRUSTED_PROXIES`` (default: loopback only)."""
    if trusted_proxies is None:  # not `or`: an empty list is a choice, not a missing argument
        trusted = parse_networks(os.environ.get("TRUSTED_PROXIES", "127.0.0.1/32,::1/128"))
    else:
        trusted = list(trusted_proxies)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AnalyticsClient.from_env() as client:
            app.state.analytics = client
            yield

    app = FastAPI(lifespan=lifespan)

    @app.middleware("http")
    async def track_page_view(request: Request, call_next: NextHandler) -> Response:
        response = await call_next(request)
        client: AnalyticsClient = request.app.state.analytics
        entity = getattr(request.state, "entity", (None, None))
        try:
            await client.track(
                "page_view",
                user_id=request.cookies.get("user_id"),
                session_id=request.cookies.get("session_id"),
                entity_type=entity[0],
                entity_id=entity[1],
                event_metadata={
                    "path": request.url.path,
                    "method": request.method,
                    "status": response.status_code,
                },
                ip_address=client_ip(
                    request.client.host if request.client else None,
                    request.headers.getlist("x-forwarded-for"),
                    trusted,
                ),
                user_agent=(request.headers.get("user-agent") or "")[:2048] or None,
                referrer=(request.headers.get("referer") or "")[:2048] or None,
            )
        except AnalyticsError:
            # Analytics must never break the page (Redis down, a 300-character user_id cookie):
            # log it and serve the response anyway.
            logger.warning("page_view for %s not tracked", request.url.path, exc_info=True)
        return response

    @app.get("/")
    async def home() -> dict[str, str]:
        return {"hello": "world"}

    @app.get("/articles/{article_id}")
    async def article(article_id: int, request: Request) -> dict[str, int]:
        request.state.entity = ("article", str(article_id))  # picked up by the middleware
        return {"article": article_id}

    @app.get("/queue-size")
    async def queue_size(request: Request) -> dict[str, int]:
        return {"queue_size": await request.app.state.analytics.get_queue_size()}

    return app


app = create_app()
