"""FastAPI: a page_view per request, with the visitor's real IP, user agent, referrer and cookies.

    pip install fastapi uvicorn
    TRUSTED_PROXIES=10.0.0.0/8 uvicorn examples.fastapi_app:app

The middleware (analytics_sdk.asgi) does the work; see docs/middleware.md. SDK settings come from
``ANALYTICS_*``; ``TRUSTED_PROXIES`` (our proxies' networks; unset: loopback only, empty: nobody).
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import FastAPI, Request, Response

from analytics_sdk.asgi import AnalyticsMiddleware


def visitor(scope: Any) -> dict[str, Any]:
    """The hook: who asked, and what the endpoint said the page was about (``request.state.entity``)."""
    cookies = Request(scope).cookies
    entity_type, entity_id = scope["state"].get("entity", (None, None))
    return {
        "user_id": cookies.get("user_id"),
        "session_id": cookies.get("session_id"),
        "entity_type": entity_type,
        "entity_id": entity_id,
    }


def create_app(trusted_proxies: str | list[str] | None = None) -> FastAPI:
    app = FastAPI()
    app.add_middleware(
        AnalyticsMiddleware,
        event_type="page_view",
        skip_paths=["/healthz"],
        hook=visitor,
        trusted_proxies=os.environ.get("TRUSTED_PROXIES") if trusted_proxies is None else trusted_proxies,
    )

    @app.get("/")
    async def home() -> dict[str, str]:
        return {"hello": "world"}

    @app.get("/articles/{article_id}")
    async def article(article_id: int, request: Request) -> dict[str, int]:
        request.state.entity = ("article", str(article_id))  # picked up by the hook
        return {"article": article_id}

    @app.get("/healthz")
    async def healthz(request: Request, response: Response) -> dict[str, bool]:
        ready = await request.state.analytics.ping()  # the middleware's client; False if Redis is down
        response.status_code = 200 if ready else 503
        return {"redis": ready}

    return app


app = create_app()
