"""Smoke tests of examples/: each one runs against the real Redis (and PostgreSQL and a real worker for
verify_setup), isolated by this test's key prefix passed as ANALYTICS_KEY_PREFIX."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis

from analytics_sdk import Settings, decode, validate
from analytics_sdk._queue import QueueKeys
from bridge.demo._worker import Worker
from tests.servers import start_redis

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
#: The broker database of the verify_setup worker: neither the default (0) that other tests' workers
#: listen on, nor the demo's (15), so no other worker takes its flush task.
TEST_BROKER_DB = 13


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANALYTICS_")}
    env.update(
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
        ANALYTICS_REDIS_URL=settings.redis_dsn,
        ANALYTICS_KEY_PREFIX=settings.analytics_key_prefix,
        ANALYTICS_BACKLOG_TRIGGER="0",
        ANALYTICS_DATABASE_URL=settings.database_url,
        **extra,
    )
    return env


def _run(script: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def aioredis_from(settings: Settings) -> aioredis.Redis:
    return aioredis.Redis.from_url(settings.redis_dsn)


def decode_ok_payload() -> bytes:
    return validate({"event_type": "replayed", "user_id": "9"}).encode()


def _queued(sync_redis: redis.Redis, settings: Settings) -> list[dict[str, object]]:
    raws = sync_redis.lrange(QueueKeys(settings.analytics_key_prefix).queue, 0, -1)
    return [decode(raw)._asdict() for raw in raws]


def test_quickstart(settings: Settings, sync_redis: redis.Redis) -> None:
    proc = _run("quickstart.py", _env(settings))
    assert "queue size: 6" in proc.stdout
    assert "rejected: ip_address=" in proc.stdout
    events = _queued(sync_redis, settings)
    assert [e["event_type"] for e in events].count("click") == 3
    assert len(events) == 6


def test_sync_app(settings: Settings, sync_redis: redis.Redis) -> None:
    proc = _run("sync_app.py", _env(settings))
    assert "tracked 201 events from 8 threads" in proc.stdout
    events = _queued(sync_redis, settings)
    assert len(events) == 201
    assert len({e["event_id"] for e in events}) == 201
    legacy = [e for e in events if e["event_type"] == "page_view"]
    assert {e["user_id"] for e in legacy} == {str(1000 + n) for n in range(8)}  # int ids kept as text
    assert all(e["event_metadata"] == {"source": "sync_app"} for e in legacy)


# -- FastAPI (over analytics_sdk.asgi; the middleware's own tests are tests/test_asgi*.py) -----------


def _fastapi_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fastapi_app_example", EXAMPLES / "fastapi_app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@asynccontextmanager
async def _lifespan(app: Any) -> AsyncIterator[dict[str, Any]]:
    """The ASGI lifespan protocol, driven as a server does (through the middleware)."""
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    state: dict[str, Any] = {}
    task = asyncio.create_task(
        app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": state}, inbox.get, outbox.put)
    )
    await inbox.put({"type": "lifespan.startup"})
    assert (await asyncio.wait_for(outbox.get(), 10))["type"] == "lifespan.startup.complete"
    yield state
    await inbox.put({"type": "lifespan.shutdown"})
    assert (await asyncio.wait_for(outbox.get(), 10))["type"] == "lifespan.shutdown.complete"
    await asyncio.wait_for(task, 10)


async def test_fastapi_app_tracks_page_views(
    settings: Settings, sync_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in _env(settings).items():
        if key.startswith("ANALYTICS_"):
            monkeypatch.setenv(key, value)
    module = _fastapi_module()
    app = module.create_app(["10.0.0.0/8", "::1/128"])
    async with _lifespan(app) as state:
        transport = httpx.ASGITransport(app=app, client=("10.0.0.5", 4242))
        async with httpx.AsyncClient(transport=transport, base_url="http://shop.example") as http:
            response = await http.get(
                "/articles/7",
                headers={
                    "X-Forwarded-For": "6.6.6.6, 203.0.113.9",
                    "User-Agent": "pytest-browser/1.0",
                    "Referer": "https://news.example/",
                    "Cookie": "user_id=42; session_id=s-9",
                },
            )
            assert response.status_code == 200
            assert (await http.get("/")).status_code == 200
            assert (await http.get("/healthz")).json() == {"redis": True}  # not tracked: skipped
    assert state["analytics"].closed  # closed by the lifespan
    events = _queued(sync_redis, settings)
    assert len(events) == 2
    article = events[0]
    assert article["event_type"] == "page_view"
    assert article["ip_address"] == "203.0.113.9"  # not 6.6.6.6 (forgeable), not the proxy
    assert article["user_agent"] == "pytest-browser/1.0"
    assert article["referrer"] == "https://news.example/"
    assert (article["user_id"], article["session_id"]) == ("42", "s-9")
    assert (article["entity_type"], article["entity_id"]) == ("article", "7")
    metadata = dict(article["event_metadata"])
    duration = metadata.pop("duration_ms")  # the one figure that varies: the request's own time
    assert isinstance(duration, float) and 0 <= duration < 10_000
    assert metadata == {"path": "/articles/7", "method": "GET", "status": 200}
    assert events[1]["entity_type"] is None and events[1]["referrer"] is None


async def _get_article(app: object, peer: str, forwarded_for: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, client=(peer, 4242))  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://shop.example") as http:
        return await http.get("/articles/7", headers={"X-Forwarded-For": forwarded_for})


async def test_fastapi_empty_trusted_list_trusts_no_proxy(
    settings: Settings, sync_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """create_app([]) is "trust no proxy": the peer is the client, even on loopback, and a forged
    X-Forwarded-For is ignored. (It used to fall back to the loopback default.)"""
    for key, value in _env(settings).items():
        if key.startswith("ANALYTICS_"):
            monkeypatch.setenv(key, value)
    monkeypatch.delenv("TRUSTED_PROXIES", raising=False)
    module = _fastapi_module()
    trust_none, default = module.create_app([]), module.create_app()
    for app in (trust_none, default):
        async with _lifespan(app):
            assert (await _get_article(app, "127.0.0.1", "6.6.6.6")).status_code == 200
    forged, proxied = (e["ip_address"] for e in _queued(sync_redis, settings))
    assert forged == "127.0.0.1", "[] trusts nobody: the loopback peer is the client"
    assert proxied == "6.6.6.6", "the default trusts a loopback proxy"


async def test_fastapi_page_is_served_when_redis_is_down(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis stopped under a running app: every page still answers 200; the first request waits at most
    the publish timeout, the next ones not at all (breaker); one WARNING from the middleware for all."""
    server = start_redis(tmp_path)
    try:
        for key, value in _env(settings.replace(redis_url=server.url)).items():
            if key.startswith("ANALYTICS_"):
                monkeypatch.setenv(key, value)
        app = _fastapi_module().create_app(["10.0.0.0/8"])
        caplog.set_level(logging.WARNING)
        async with _lifespan(app):
            assert (await _get_article(app, "10.0.0.5", "203.0.113.9")).status_code == 200
            server.stop()
            for attempt in range(3):
                started = time.monotonic()
                response = await _get_article(app, "10.0.0.5", "203.0.113.9")
                elapsed = time.monotonic() - started
                assert response.status_code == 200 and response.json() == {"article": 7}
                limit = settings.analytics_publish_timeout + 0.75 if attempt == 0 else 0.25
                assert elapsed < limit, (attempt, elapsed)
        ours = [r for r in caplog.records if r.name == "analytics_sdk.asgi"]
        assert len(ours) == 1 and ours[0].levelno == logging.WARNING, caplog.records
        assert ours[0].getMessage().startswith("analytics: GET /articles/7 not tracked (PublishError")
    finally:
        server.stop()


# -- verify_setup: the end-to-end check a user runs, against a real worker -------------------------


@pytest.mark.e2e
def test_verify_setup_sees_rows_with_a_real_worker(db_settings: Settings, tmp_path: Path) -> None:
    broker = db_settings.redis_dsn.rsplit("/", 1)[0] + f"/{TEST_BROKER_DB}"
    # No beat and no backlog trigger: the rows can only come from the script's flush_events_now().
    env = _env(db_settings, ANALYTICS_BROKER_URL=broker, VERIFY_TIMEOUT="45")
    worker = Worker(env, tmp_path, concurrency=1)
    worker.start(beat=False)
    try:
        worker.wait_ready(60)
        proc = _run("verify_setup.py", env, timeout=90)
    finally:
        assert worker.stop() is not None
    assert "OK: all 5 events are rows in analytics_events" in proc.stdout, proc.stdout + proc.stderr
    assert proc.stdout.count(" row ") == 5


# -- the documentation stays true -------------------------------------------------------------------

# The reference moved from the README into the docs site (docs/, `nox -s docs`).
CONFIGURATION_PAGE = (ROOT / "docs" / "configuration.md").read_text()
OPERATIONS_PAGE = (ROOT / "docs" / "operations.md").read_text()


def test_docs_configuration_table_lists_every_setting_with_its_default() -> None:
    import dataclasses

    from analytics_sdk._settings import env_name

    rows = dict(re.findall(r"^\| `(ANALYTICS_[A-Z_]+)` \| ([^|]+) \|", CONFIGURATION_PAGE, re.MULTILINE))
    defaults = Settings()
    for f in dataclasses.fields(Settings):
        name = env_name(f.name)
        assert name in rows, f"{name} is missing from the configuration table of docs/configuration.md"
        shown = rows[name].strip().strip("`")
        value = getattr(defaults, f.name)
        if value is None:
            assert shown.startswith("(none)") or shown == "the Redis URL", (name, shown)
        elif isinstance(value, bool):
            assert shown == str(value).lower(), (name, shown)
        elif isinstance(value, float):
            assert float(shown) == value, (name, shown)
        else:
            assert shown == str(value), (name, shown)
    assert set(rows) == {env_name(f.name) for f in dataclasses.fields(Settings)}


def test_docs_acl_lines_are_enough_for_the_sdk_the_drain_and_the_cli(
    db_settings: Settings, tmp_path: Path
) -> None:
    """Run the two ACL SETUSER lines of docs/operations.md on a throwaway server and drive every path
    through them; Redis's ACL LOG must stay empty (a denied command anywhere, even in a background
    task, shows there)."""
    import asyncio

    from click.testing import CliRunner

    from analytics_sdk import AnalyticsClient
    from analytics_sdk._queue import claim, dead_letter_entry
    from bridge.cli import main
    from bridge.drain import drain
    from tests.conftest import run_blocking
    from tests.servers import start_redis

    lines = re.findall(r"^ACL SETUSER .+$", OPERATIONS_PAGE, re.MULTILINE)
    assert [line.split()[2] for line in lines] == ["analytics-app", "analytics-bridge"]
    server = start_redis(tmp_path)
    try:
        with server.client() as admin:
            for line in lines:
                admin.execute_command(*shlex.split(line.replace(">CHANGE-ME", ">pw")))
            base = f"127.0.0.1:{server.port}/0"
            app = Settings(
                redis_url=f"redis://analytics-app:pw@{base}",
                broker_url=server.url,  # Celery gets its own (here: the default) user, as the docs say
                analytics_max_queue_size=5,
                analytics_batch_size=2,
            )
            bridge = db_settings.replace(
                redis_url=f"redis://analytics-bridge:pw@{base}", analytics_key_prefix="analytics"
            )

            async def produce() -> int:
                async with AnalyticsClient(app) as client:
                    await client.track_many([{"event_type": "acl"}] * 3)
                    await asyncio.gather(*(client.track("acl", user_id=str(n)) for n in range(4)))
                    return await client.get_queue_size()

            assert run_blocking(produce()) == 5  # 7 pushed, cap 5: INCRBY of the dropped counter ran
            assert admin.get("analytics:events:dropped") == b"2"

            async def consume() -> int:
                client = aioredis_from(bridge)
                try:
                    await claim(client, QueueKeys("analytics"), 2, "stale")  # left in flight, as by a crash
                finally:
                    await client.aclose()
                summary = await drain(bridge.replace(analytics_visibility_timeout=0.001))
                return summary.inserted

            assert run_blocking(consume()) == 5  # the take-over script and the claim/ack scripts ran
            admin.rpush(
                "analytics:events:dead",
                dead_letter_entry(decode_ok_payload(), "was too big"),
                dead_letter_entry(b"garbage", "payload: is not JSON"),
            )
            env = {
                "ANALYTICS_REDIS_URL": bridge.redis_dsn,
                "ANALYTICS_DATABASE_URL": bridge.database_url,
                "ANALYTICS_KEY_PREFIX": "analytics",
            }
            runner = CliRunner()
            for args in (
                ["status", "--json"],
                ["dead-letters", "list"],
                ["dead-letters", "replay"],
                ["flush"],
                ["dead-letters", "purge", "--yes"],
            ):
                result = runner.invoke(main, args, env=env, catch_exceptions=False)
                assert result.exit_code == 0, (args, result.output)
            assert admin.llen("analytics:events:dead") == 0
            assert admin.acl_log() == []
    finally:
        server.stop()
