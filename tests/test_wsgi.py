"""analytics_sdk.wsgi.AnalyticsMiddleware under a real WSGI server (wsgiref, threaded), real Redis."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import httpx
import pytest
import redis

from analytics_sdk import Event, Settings, SyncAnalyticsClient, decode
from analytics_sdk._queue import QueueKeys
from analytics_sdk.testing import RecordingSyncClient
from analytics_sdk.wsgi import AnalyticsMiddleware
from tests.helpers import wait_for_sync
from tests.servers import start_redis

LOGGER = "analytics_sdk.wsgi"

pytestmark = pytest.mark.timeout(60)


def queued(sync_redis: redis.Redis, settings: Settings) -> list[Event]:
    return [decode(raw) for raw in sync_redis.lrange(QueueKeys(settings.analytics_key_prefix).queue, 0, -1)]


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
    """A minimal WSGI app: a few routes, a lazy generator body, a failure."""
    path = environ["PATH_INFO"]
    if path == "/boom":
        raise RuntimeError("the view failed")
    if path == "/stream":

        def body() -> Iterator[bytes]:  # start_response called lazily, on the first iteration
            start_response("206 Partial Content", [("Content-Type", "text/plain")])
            for _ in range(3):
                time.sleep(0.05)
                yield b"part"

        return body()
    if path.startswith("/articles/"):
        environ["myapp.entity"] = ("article", path.rsplit("/", 1)[1])  # for the hook
    status = "404 Not Found" if path == "/missing" else "200 OK"
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Threaded(ThreadingMixIn, WSGIServer):
    daemon_threads = True


@contextmanager
def serve(wsgi_app: Any) -> Iterator[httpx.Client]:
    """A threaded wsgiref server on a free port; yields an httpx client pointed at it."""
    server = make_server("127.0.0.1", 0, wsgi_app, server_class=_Threaded, handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.server_port}", timeout=10) as client:
            yield client
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def entity_hook(environ: dict[str, Any]) -> dict[str, Any]:
    entity_type, entity_id = environ.get("myapp.entity", (None, None))
    return {"entity_type": entity_type, "entity_id": entity_id, "user_id": environ.get("HTTP_X_USER")}


def test_one_event_per_request_with_every_field(settings: Settings, sync_redis: redis.Redis) -> None:
    middleware = AnalyticsMiddleware(app, settings=settings, hook=entity_hook, skip_paths=["/healthz"])
    assert isinstance(middleware.client, SyncAnalyticsClient)
    before = datetime.now(UTC)
    with serve(middleware) as http:
        headers = {
            "User-Agent": "wsgi-test/1.0",
            "Referer": "https://news.example/",
            "X-Forwarded-For": "6.6.6.6, 203.0.113.9",  # the peer is loopback: trusted by default
            "X-User": "42",
        }
        assert http.get("/articles/7", headers=headers).text == "ok"
        assert http.post("/missing").status_code == 404
        assert http.get("/stream").text == "part" * 3
        assert http.get("/boom").status_code == 500
        assert http.get("/healthz").status_code == 200
        assert http.get("/caf%C3%A9").status_code == 200
    middleware.close()
    assert middleware.client.closed
    events = queued(sync_redis, settings)
    assert [
        (e.event_metadata["method"], e.event_metadata["path"], e.event_metadata["status"]) for e in events
    ] == [
        ("GET", "/articles/7", 200),
        ("POST", "/missing", 404),
        ("GET", "/stream", 206),
        ("GET", "/boom", 500),
        ("GET", "/café", 200),  # UTF-8 path, not WSGI's latin-1 mojibake
    ]
    article = events[0]
    assert article.event_type == "http_request"
    assert (article.ip_address, article.user_agent, article.referrer) == (
        "203.0.113.9",
        "wsgi-test/1.0",
        "https://news.example/",
    )
    assert (article.entity_type, article.entity_id, article.user_id) == ("article", "7", "42")
    assert events[1].ip_address == "127.0.0.1" and events[1].entity_type is None
    assert events[2].event_metadata["duration_ms"] >= 150  # timed to the last chunk of the body
    assert before - timedelta(seconds=1) < article.created_at < datetime.now(UTC)


def test_empty_trusted_list_and_a_given_client() -> None:
    recorder = RecordingSyncClient()
    middleware = AnalyticsMiddleware(app, client=recorder, trusted_proxies=[], event_type="page_view")
    with serve(middleware) as http:
        http.get("/", headers={"X-Forwarded-For": "6.6.6.6"})
    middleware.close()
    assert not recorder.closed, "a given client is the caller's to close"
    assert [(e.event_type, e.ip_address) for e in recorder.events] == [("page_view", "127.0.0.1")]


def test_redis_stopped_serves_every_page_with_one_warning(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = start_redis(tmp_path)
    middleware = AnalyticsMiddleware(app, settings=settings.replace(redis_url=server.url))
    caplog.set_level(logging.WARNING)
    try:
        with serve(middleware) as http:
            assert http.get("/").status_code == 200
            queue = QueueKeys(settings.analytics_key_prefix).queue
            with server.client() as direct:  # tracked after the response: wait until it is in Redis
                wait_for_sync(lambda: direct.llen(queue) == 1, timeout=10, message="the first event")
            server.stop()
            for attempt in range(5):
                started = time.monotonic()
                response = http.get("/articles/1")
                elapsed = time.monotonic() - started
                assert response.status_code == 200 and response.text == "ok"
                # The response is written before the event is tracked: not even the first one waits.
                assert elapsed < 1.0, (attempt, elapsed)
            # Each request's tracking runs after its response, in the server's thread: wait for all five.
            wait_for_sync(lambda: middleware.failures.failures == 5, timeout=15, message="5 failures")
            assert middleware.client.ping() is False
    finally:
        middleware.close()
        server.stop()
    ours = [r for r in caplog.records if r.name == LOGGER]
    assert len(ours) == 1 and ours[0].levelno == logging.WARNING, [r.getMessage() for r in ours]
    assert "GET /articles/1 not tracked (PublishError" in ours[0].getMessage()


def test_a_failing_hook_never_changes_the_response(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, LOGGER)

    def buggy(environ: dict[str, Any]) -> dict[str, Any]:
        raise KeyError("user")

    recorder = RecordingSyncClient()
    with serve(AnalyticsMiddleware(app, client=recorder, hook=buggy)) as http:
        assert http.get("/articles/2").text == "ok"
    ours = [r for r in caplog.records if r.name == LOGGER]
    assert len(ours) == 1 and ours[0].exc_info is not None
    assert recorder.events == []
