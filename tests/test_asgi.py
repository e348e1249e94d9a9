"""analytics_sdk.asgi.AnalyticsMiddleware under FastAPI and Starlette, against the real Redis.

A real uvicorn run is in tests/test_asgi_uvicorn.py; the client-IP rules in tests/test_proxies.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi import FastAPI, Request
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

from analytics_sdk import AnalyticsClient, Event, Settings, decode
from analytics_sdk._queue import QueueKeys
from analytics_sdk.asgi import AnalyticsMiddleware
from analytics_sdk.testing import RecordingClient
from tests.servers import start_redis

LOGGER = "analytics_sdk.asgi"


def queued(sync_redis: redis.Redis, settings: Settings) -> list[Event]:
    return [decode(raw) for raw in sync_redis.lrange(QueueKeys(settings.analytics_key_prefix).queue, 0, -1)]


def fastapi_app(**options: Any) -> FastAPI:
    app = FastAPI()
    app.add_middleware(AnalyticsMiddleware, **options)
    seen: list[Any] = []
    app.state.seen = seen  # the clients endpoints found in request.state.analytics

    @app.get("/items/{n}")
    async def item(n: int, request: Request) -> dict[str, int]:
        seen.append(request.state.analytics)
        request.state.entity = ("item", str(n))
        return {"item": n}

    @app.post("/items", status_code=201)
    async def create() -> dict[str, bool]:
        return {"created": True}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("the endpoint failed")

    @app.get("/healthz")
    async def healthz(request: Request) -> dict[str, bool]:
        return {"ready": await request.state.analytics.ping()}

    return app


@asynccontextmanager
async def lifespan(app: Any) -> AsyncIterator[dict[str, Any]]:
    """Drive the ASGI lifespan protocol as a server does; yields the lifespan state."""
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    state: dict[str, Any] = {}
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": state}
    task = asyncio.create_task(app(scope, inbox.get, outbox.put))
    await inbox.put({"type": "lifespan.startup"})
    answer = await asyncio.wait_for(outbox.get(), 10)
    assert answer["type"] == "lifespan.startup.complete", answer
    try:
        yield state
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        answer = await asyncio.wait_for(outbox.get(), 10)
        assert answer["type"] == "lifespan.shutdown.complete", answer
        await asyncio.wait_for(task, 10)


def http(app: Any, peer: str = "203.0.113.9") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(peer, 4242), raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://shop.example")


@pytest.fixture
def env_settings(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """ANALYTICS_* pointing at the test's Redis and prefix: for the no-argument middleware."""
    monkeypatch.setenv("ANALYTICS_REDIS_URL", settings.redis_dsn)
    monkeypatch.setenv("ANALYTICS_KEY_PREFIX", settings.analytics_key_prefix)
    monkeypatch.setenv("ANALYTICS_BACKLOG_TRIGGER", "0")
    return settings


def at_peer(app: Any, peer: tuple[str, int]) -> Any:
    """``app`` seen from ``peer`` (TestClient's own ``client=`` needs a newer Starlette than our floor)."""

    async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope = {**scope, "client": peer}
        await app(scope, receive, send)

    return wrapped


@pytest.fixture
def test_client_class() -> Iterator[type]:
    with warnings.catch_warnings():  # starlette 1.x asks for httpx2 on import; httpx is what we have
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient
    yield TestClient


def test_fastapi_no_arguments_one_event_per_request(
    env_settings: Settings, sync_redis: redis.Redis, test_client_class: type
) -> None:
    """add_middleware(AnalyticsMiddleware) alone: settings from ANALYTICS_*, the client made at lifespan
    startup and closed at shutdown, one event per request with every field."""
    app = fastapi_app()
    before = datetime.now(UTC)
    with test_client_class(at_peer(app, ("203.0.113.9", 4242)), raise_server_exceptions=False) as client:
        ok = client.get("/items/7", headers={"User-Agent": "pytest/1.0", "Referer": "https://news.example/"})
        assert ok.status_code == 200 and ok.json() == {"item": 7}
        assert client.post("/items").status_code == 201
        assert client.get("/missing").status_code == 404
        assert client.get("/boom").status_code == 500
        assert client.get("/healthz").json() == {"ready": True}
        made = app.state.seen[0]
        assert isinstance(made, AnalyticsClient) and not made.closed
    assert made.closed, "closed by the lifespan shutdown"
    events = queued(sync_redis, env_settings)
    assert [
        (e.event_metadata["method"], e.event_metadata["path"], e.event_metadata["status"]) for e in events
    ] == [
        ("GET", "/items/7", 200),
        ("POST", "/items", 201),
        ("GET", "/missing", 404),
        ("GET", "/boom", 500),
        ("GET", "/healthz", 200),
    ]
    first = events[0]
    assert first.event_type == "http_request"
    assert (first.user_agent, first.referrer, first.ip_address) == (
        "pytest/1.0",
        "https://news.example/",
        "203.0.113.9",
    )
    assert first.user_id is None and first.entity_type is None  # no hook: nothing guessed
    assert all(
        isinstance(e.event_metadata["duration_ms"], float) and e.event_metadata["duration_ms"] > 0
        for e in events
    )
    assert before - timedelta(seconds=1) < first.created_at < datetime.now(UTC)
    assert events[1].referrer is None and events[1].user_agent == "testclient"


async def test_starlette_without_lifespan_makes_the_client_at_the_first_request(
    settings: Settings, sync_redis: redis.Redis
) -> None:
    """A server that sends no lifespan (httpx's ASGITransport): the client is made on the first
    request's loop; a streamed body is timed to its last chunk; aclose() closes it."""

    async def home(request: Any) -> PlainTextResponse:
        return PlainTextResponse("hi")

    async def stream(request: Any) -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(3):
                await asyncio.sleep(0.05)
                yield b"chunk"

        return StreamingResponse(chunks())

    inner = Starlette(routes=[Route("/", home), Route("/stream", stream)])
    app = AnalyticsMiddleware(inner, settings=settings, event_type="page_view")
    async with http(app) as client:
        assert (await client.get("/")).text == "hi"
        assert (await client.get("/stream")).text == "chunk" * 3
    events = queued(sync_redis, settings)
    assert [e.event_type for e in events] == ["page_view", "page_view"]
    assert events[1].event_metadata["duration_ms"] >= 150
    made = app._clients[asyncio.get_running_loop()]
    await app.aclose()
    assert made.closed


async def test_starlette_middleware_list_and_skip_paths(settings: Settings, sync_redis: redis.Redis) -> None:
    async def ok(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    paths = ["/healthz", "/healthz/deep", "/internal/metrics", "/internal", "/shop"]
    app = Starlette(
        routes=[Route(p, ok) for p in paths],
        middleware=[
            Middleware(AnalyticsMiddleware, settings=settings, skip_paths=["/healthz", "/internal/*"])
        ],
    )
    async with lifespan(app), http(app) as client:
        for path in paths:
            assert (await client.get(path)).status_code == 200
    tracked = [e.event_metadata["path"] for e in queued(sync_redis, settings)]
    assert tracked == ["/healthz/deep", "/internal", "/shop"]  # exact match, or the prefix before "*"


async def test_hook_adds_user_session_entity_and_metadata(
    settings: Settings, sync_redis: redis.Redis
) -> None:
    def sync_hook(scope: Any) -> dict[str, Any]:
        entity = scope["state"].get("entity", (None, None))
        cookies = Request(scope).cookies
        return {
            "user_id": cookies.get("user_id"),
            "session_id": cookies.get("session_id"),
            "entity_type": entity[0],
            "entity_id": entity[1],
            "event_metadata": {"plan": "pro"},
        }

    async def async_hook(scope: Any) -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"user_id": "async-user"}

    for hook in (sync_hook, async_hook):
        app = fastapi_app(settings=settings, hook=hook)
        async with lifespan(app), http(app) as client:
            response = await client.get("/items/9", headers={"Cookie": "user_id=42; session_id=s-1"})
            assert response.status_code == 200
    with_sync, with_async = queued(sync_redis, settings)
    assert (with_sync.user_id, with_sync.session_id) == ("42", "s-1")
    assert (with_sync.entity_type, with_sync.entity_id) == ("item", "9")  # set by the endpoint
    assert with_sync.event_metadata["plan"] == "pro" and with_sync.event_metadata["status"] == 200
    assert with_async.user_id == "async-user"


async def test_a_failing_hook_never_changes_the_response(
    settings: Settings, sync_redis: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """A hook that raises, or gives a field validation refuses: the response is the app's, the event
    is not tracked, one WARNING (a traceback for the bug, none for the ValidationError)."""
    caplog.set_level(logging.WARNING, LOGGER)

    def buggy(scope: Any) -> dict[str, Any]:
        raise KeyError("user")

    def too_long(scope: Any) -> dict[str, Any]:
        return {"user_id": "u" * 10_000}

    for hook in (buggy, too_long):
        caplog.clear()
        app = fastapi_app(settings=settings, hook=hook)
        async with lifespan(app), http(app) as client:
            response = await client.get("/items/3")
        assert response.status_code == 200 and response.json() == {"item": 3}
        ours = [r for r in caplog.records if r.name == LOGGER]
        assert len(ours) == 1 and ours[0].levelno == logging.WARNING
        assert "GET /items/3 not tracked" in ours[0].getMessage()
        assert (ours[0].exc_info is not None) == (hook is buggy), ours[0].getMessage()
    assert queued(sync_redis, settings) == []


async def test_trusted_proxies(settings: Settings, sync_redis: redis.Redis) -> None:
    headers = {"X-Forwarded-For": "6.6.6.6, 203.0.113.9", "Forwarded": 'for=7.7.7.7, for="198.51.100.4"'}
    cases = [
        ({"trusted_proxies": ["10.0.0.0/8"]}, "10.0.0.5", "203.0.113.9"),  # our proxy: its hop
        ({"trusted_proxies": "10.0.0.0/8"}, "192.0.2.1", "192.0.2.1"),  # not ours: headers ignored
        ({}, "127.0.0.1", "203.0.113.9"),  # default: a loopback proxy is trusted
        ({"trusted_proxies": []}, "127.0.0.1", "127.0.0.1"),  # [] trusts nobody, not even loopback
        ({"trusted_proxies": ["10.0.0.0/8"], "forwarded_header": "forwarded"}, "10.0.0.5", "198.51.100.4"),
    ]
    for options, peer, _ in cases:
        app = fastapi_app(settings=settings, **options)
        async with lifespan(app), http(app, peer=peer) as client:
            assert (await client.get("/items/1", headers=headers)).status_code == 200
    assert [e.ip_address for e in queued(sync_redis, settings)] == [expected for _, _, expected in cases]


async def test_redis_stopped_serves_every_page_with_one_warning(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis stopped under a running app: every response is still the app's 200; the first waits at most
    the publish timeout, the next ones not at all (the breaker); one WARNING for all of them."""
    server = start_redis(tmp_path)
    try:
        app = fastapi_app(settings=settings.replace(redis_url=server.url))
        caplog.set_level(logging.WARNING)
        async with lifespan(app), http(app) as client:
            assert (await client.get("/items/1")).status_code == 200
            assert caplog.records == []
            server.stop()
            for attempt in range(5):
                started = time.monotonic()
                response = await client.get("/items/2")
                elapsed = time.monotonic() - started
                assert response.status_code == 200 and response.json() == {"item": 2}
                limit = settings.analytics_publish_timeout + 0.75 if attempt == 0 else 0.25
                assert elapsed < limit, (attempt, elapsed)
            assert (await client.get("/healthz")).json() == {"ready": False}  # ping: False, no raise
        ours = [r for r in caplog.records if r.name == LOGGER]
        assert len(ours) == 1 and ours[0].levelno == logging.WARNING, [r.getMessage() for r in ours]
        assert "GET /items/2 not tracked (PublishError" in ours[0].getMessage()
    finally:
        server.stop()


async def test_an_app_without_lifespan_support_gets_it_answered(
    settings: Settings, sync_redis: redis.Redis
) -> None:
    """Django's ASGI handler raises for a lifespan scope: the middleware answers the protocol itself, so
    its client is still made at startup and closed at shutdown."""

    async def django_like(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    app = AnalyticsMiddleware(django_like, settings=settings)
    async with lifespan(app) as state:
        made = state["analytics"]
        assert isinstance(made, AnalyticsClient) and not made.closed
        async with http(app) as client:
            assert (await client.get("/x")).status_code == 204
    assert made.closed
    assert [e.event_metadata["status"] for e in queued(sync_redis, settings)] == [204]


async def test_a_startup_failure_of_the_app_is_not_hidden(settings: Settings) -> None:
    @asynccontextmanager
    async def failing(app: Any) -> AsyncIterator[None]:
        raise RuntimeError("database migration failed")
        yield

    app = AnalyticsMiddleware(FastAPI(lifespan=failing), settings=settings)
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await inbox.put({"type": "lifespan.startup"})
    with pytest.raises(RuntimeError, match="database migration failed"):
        await asyncio.wait_for(app({"type": "lifespan", "asgi": {"version": "3.0"}}, inbox.get, send), 10)
    assert [m["type"] for m in sent] == ["lifespan.startup.failed"]
    await app.aclose()


async def test_a_given_client_is_used_and_never_closed() -> None:
    recorder = RecordingClient()
    app = fastapi_app(client=recorder, event_type="page_view")
    async with lifespan(app), http(app) as client:
        await client.get("/items/5")
    assert not recorder.closed
    assert [(e.event_type, e.event_metadata["path"]) for e in recorder.events] == [("page_view", "/items/5")]


def test_bad_options_fail_when_the_app_is_built() -> None:
    from analytics_sdk import ConfigurationError, ValidationError

    with pytest.raises(ConfigurationError, match=r"trusted_proxies='10\.0\.0\.1/8'"):
        AnalyticsMiddleware(FastAPI(), trusted_proxies="10.0.0.1/8", client=RecordingClient())
    with pytest.raises(ConfigurationError, match="forwarded_header"):
        AnalyticsMiddleware(FastAPI(), forwarded_header="x-real-ip", client=RecordingClient())  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="event_type"):
        AnalyticsMiddleware(FastAPI(), event_type="", client=RecordingClient())


async def test_websocket_and_other_scopes_pass_through(settings: Settings) -> None:
    received: list[str] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        received.append(scope["type"])

    app = AnalyticsMiddleware(inner, settings=settings)
    await app({"type": "websocket", "path": "/ws"}, None, None)  # type: ignore[arg-type]
    assert received == ["websocket"]
    assert app._clients == {}  # nothing made for it
