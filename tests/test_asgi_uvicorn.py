"""The FastAPI example (examples/fastapi_app.py, over analytics_sdk.asgi) under a real uvicorn process.

uvicorn runs as our child on a free port, stopped by its own PID (SIGTERM, as a process manager does),
so its lifespan shutdown closes the middleware's client for real.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import redis

from analytics_sdk import Settings, decode
from analytics_sdk._queue import QueueKeys
from tests.helpers import wait_for_sync
from tests.hung_server import HungServer
from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(90)
UVICORN_ARGS = ("--host", "127.0.0.1", "--no-proxy-headers")


@contextmanager
def uvicorn(env: dict[str, str], log: Path) -> Iterator[str]:
    """``uvicorn examples.fastapi_app:app`` on a free port; yields its base URL once it serves."""
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            # --no-proxy-headers: the middleware reads X-Forwarded-For itself, not uvicorn
            [sys.executable, "-m", "uvicorn", "examples.fastapi_app:app", *UVICORN_ARGS, "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:

        def serving() -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                return httpx.get(base + "/", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for_sync(serving, timeout=30, message="uvicorn serving")
        yield base
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            pytest.fail(f"uvicorn did not stop on SIGTERM within 30s:\n{log.read_text()}")


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANALYTICS_")}
    env.update(
        PYTHONPATH=str(ROOT),
        ANALYTICS_REDIS_URL=settings.redis_dsn,
        ANALYTICS_KEY_PREFIX=settings.analytics_key_prefix,
        ANALYTICS_BACKLOG_TRIGGER="0",
        TRUSTED_PROXIES="127.0.0.1",
        **extra,
    )
    return env


def test_uvicorn_runs_the_example_and_its_events_land(
    settings: Settings, sync_redis: redis.Redis, tmp_path: Path
) -> None:
    log = tmp_path / "uvicorn.log"
    with uvicorn(_env(settings), log) as base, httpx.Client(base_url=base, timeout=10) as http:
        response = http.get(
            "/articles/7",
            headers={
                "X-Forwarded-For": "6.6.6.6, 203.0.113.9",
                "User-Agent": "pytest-browser/1.0",
                "Referer": "https://news.example/",
                "Cookie": "user_id=42; session_id=s-9",
            },
        )
        assert response.status_code == 200 and response.json() == {"article": 7}
        assert http.get("/healthz").json() == {"redis": True}  # ping() on the middleware's client
    output = log.read_text()
    assert "Application startup complete" in output and "Application shutdown complete" in output, output
    assert "Traceback" not in output and "ERROR" not in output, output
    raws = sync_redis.lrange(QueueKeys(settings.analytics_key_prefix).queue, 0, -1)
    events = [decode(raw) for raw in raws]
    paths = [e.event_metadata["path"] for e in events]
    assert paths.count("/") >= 1 and "/healthz" not in paths  # the readiness polls, not the probe
    article = next(e for e in events if e.event_metadata["path"] == "/articles/7")
    assert article.event_type == "page_view"
    assert article.ip_address == "203.0.113.9"  # through our loopback proxy, not the forgeable 6.6.6.6
    assert (article.user_agent, article.referrer) == ("pytest-browser/1.0", "https://news.example/")
    assert (article.user_id, article.session_id, article.entity_type, article.entity_id) == (
        "42",
        "s-9",
        "article",
        "7",
    )
    assert article.event_metadata["method"] == "GET" and article.event_metadata["status"] == 200


def test_a_hung_redis_does_not_hold_the_response(settings: Settings, tmp_path: Path) -> None:
    """Redis accepts connections and never answers: the response still arrives at once, because the event
    is tracked after the last body chunk was sent; the failed tracking is logged once it gives up."""
    log = tmp_path / "uvicorn.log"
    with HungServer() as hung:
        env = _env(settings.replace(redis_url=hung.url), ANALYTICS_PUBLISH_TIMEOUT="3")
        with uvicorn(env, log) as base, httpx.Client(base_url=base, timeout=10) as http:
            started = time.monotonic()
            response = http.get("/articles/1")
            elapsed = time.monotonic() - started
            assert response.status_code == 200 and response.json() == {"article": 1}
            assert elapsed < 1.0, f"the response waited {elapsed:.2f}s for the Redis round trip"
            assert hung.accepted, "the tracking did try Redis"
            wait_for_sync(lambda: "not tracked" in log.read_text(), timeout=15, message="the warning")
    output = log.read_text()
    # The readiness poll's GET / and the article failed together: one line, rate-limited.
    assert output.count("not tracked (PublishError") == 1, output
