"""analytics_sdk.testing and its pytest plugin: recorders that behave like the real clients, minus sending."""

from __future__ import annotations

import asyncio
import inspect
import threading
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from analytics_sdk import (
    AnalyticsClient,
    AnalyticsError,
    ClientClosedError,
    Settings,
    SyncAnalyticsClient,
    ValidationError,
    decode,
    validate,
)
from analytics_sdk._queue import QueueKeys
from analytics_sdk.testing import RecordingClient, RecordingSyncClient
from tests.servers import free_port

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent

PAIRS = [(AnalyticsClient, RecordingClient), (SyncAnalyticsClient, RecordingSyncClient)]


def _public(cls: type) -> list[str]:
    dunder = ("__init__", "__aenter__", "__aexit__", "__enter__", "__exit__")
    return [name for name in dir(cls) if not name.startswith("_") or (name in dunder and hasattr(cls, name))]


@pytest.mark.parametrize(("real", "recorder"), PAIRS, ids=["async", "sync"])
def test_every_public_member_of_the_real_client_exists_with_the_same_signature(
    real: type, recorder: type
) -> None:
    for name in _public(real):
        assert hasattr(recorder, name), f"{recorder.__name__} lacks {name}"
        mine, theirs = inspect.getattr_static(recorder, name), inspect.getattr_static(real, name)
        assert type(mine) is type(theirs), f"{name}: {type(theirs)} in the real client"
        if callable(getattr(real, name)) and not isinstance(theirs, property):
            assert inspect.signature(getattr(recorder, name)) == inspect.signature(getattr(real, name)), name
            assert inspect.iscoroutinefunction(getattr(recorder, name)) == inspect.iscoroutinefunction(
                getattr(real, name)
            ), name
    settings = Settings()
    real_attrs = {n for n in vars(real(settings)) if not n.startswith("_")}
    assert real_attrs <= {n for n in vars(recorder(settings)) if not n.startswith("_")}


BAD = [
    pytest.param({"event_type": ""}, "event_type", id="empty-event-type"),
    pytest.param({"event_type": "x", "user_id": "a\x00b"}, "user_id", id="nul"),
    pytest.param({"event_type": "x", "ip_address": "127.1"}, "ip_address", id="ip"),
    pytest.param({"event_type": "x", "event_metadata": [1, 2]}, "event_metadata", id="metadata-list"),
    pytest.param({"event_type": "x", "event_metadata": {"v": float("nan")}}, "event_metadata.v", id="nan"),
    pytest.param({"event_type": "x", "event_metadata": {"k": "v" * 64}}, "event_metadata", id="too-big"),
    # a user agent or referrer over its limit is truncated (issue 13); the other text fields refuse
    pytest.param({"event_type": "x", "session_id": "u" * 100_000}, "session_id", id="too-long"),
    pytest.param({"event_type": "x", "colour": "red"}, "colour", id="unknown-field"),
    pytest.param({"event_type": "x", "created_at": "yesterday"}, "created_at", id="created-at"),
]


def _same_error(real: ValidationError, mine: ValidationError, field: str) -> None:
    assert type(mine) is type(real) is ValidationError
    assert mine.field == real.field == field
    assert (str(mine), mine.reason) == (str(real), real.reason)


@pytest.mark.parametrize(("fields", "field"), BAD)
async def test_bad_input_raises_the_real_clients_validation_error(
    settings: Settings, redis_client: aioredis.Redis, fields: dict[str, Any], field: str
) -> None:
    small = settings.replace(analytics_max_metadata_bytes=64)
    fields = dict(fields)
    event_type = fields.pop("event_type")
    async with AnalyticsClient(small) as real, RecordingClient(small) as recorder:
        with pytest.raises(ValidationError) as real_error:
            await real.track(event_type, **fields)
        with pytest.raises(ValidationError) as mine:
            await recorder.track(event_type, **fields)
        _same_error(real_error.value, mine.value, field)
        with pytest.raises(ValidationError) as mine_many:
            await recorder.track_many([{"event_type": "ok"}, {"event_type": event_type, **fields}])
        _same_error(real_error.value, mine_many.value, field)
        assert recorder.events == []  # one bad event records none, as the real one pushes none
    assert await redis_client.llen(QueueKeys(small.analytics_key_prefix).queue) == 0


@pytest.mark.parametrize(("fields", "field"), BAD)
def test_bad_input_raises_the_same_in_the_sync_recorder(fields: dict[str, Any], field: str) -> None:
    small = Settings(analytics_max_metadata_bytes=64)
    fields = dict(fields)
    event_type = fields.pop("event_type")
    with SyncAnalyticsClient(small) as real, RecordingSyncClient(small) as recorder:
        with pytest.raises(ValidationError) as real_error:
            real.track(event_type, **fields)  # raises before any connection: no service needed
        with pytest.raises(ValidationError) as mine:
            recorder.track(event_type, **fields)
        _same_error(real_error.value, mine.value, field)
        assert recorder.events == []


FULL: dict[str, Any] = {
    "user_id": 42,
    "session_id": "s-1",
    "entity_type": "article",
    "entity_id": 7,
    "event_metadata": '{"scroll": 0.8}',
    "ip_address": "2001:db8::1",
    "user_agent": "Mozilla/5.0",
    "referrer": "https://example.com/",
    "created_at": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC) + timedelta(microseconds=6),
}


async def test_recorded_event_is_what_the_real_client_queues(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    async with AnalyticsClient(settings) as real:
        real_id = await real.track("page_view", **FULL)
    queued = await redis_client.lrange(QueueKeys(settings.analytics_key_prefix).queue, 0, -1)
    async with RecordingClient(settings) as recorder:
        event_id = await recorder.track("page_view", **FULL, event_id=real_id)
        assert event_id == real_id
    assert recorder.events == [decode(queued[0])]  # field for field what the bridge would insert
    event = recorder.events[0]
    assert (event.event_type, event.user_id, event.entity_id) == ("page_view", "42", "7")
    assert event.event_metadata == {"scroll": 0.8}
    assert event.created_at == FULL["created_at"]
    assert event.ip_address == "2001:db8::1"


async def test_async_recorder_records_in_order_and_counts(settings: Settings) -> None:
    recorder = RecordingClient(settings)
    first = await recorder.track("a", user_id="1")
    legacy = await recorder.track_event("b", entity_type="x", entity_id="9")
    given = validate({"event_type": "c", "session_id": "s"})
    many = await recorder.track_many([{"event_type": "d"}, given])
    assert many[1] == given.event_id
    assert [e.event_id for e in recorder.events] == [first, legacy, *many]
    assert [e.event_type for e in recorder.events] == ["a", "b", "d", "c"]
    assert recorder.events[3] == given
    assert await recorder.get_queue_size() == 4
    assert await recorder.track_many([]) == []
    task_id = await recorder.flush_events_now()
    assert len(task_id) == 36 and recorder.flush_requests == 1
    recorder.clear()
    assert (recorder.events, recorder.flush_requests) == ([], 0)
    await recorder.aclose()
    assert recorder.closed


async def test_closed_recorder_refuses_like_the_real_client(settings: Settings) -> None:
    async with RecordingClient(settings) as recorder:
        await recorder.track("a")
    for call in (
        recorder.track("a"),
        recorder.track_many([]),
        recorder.get_queue_size(),
        recorder.flush_events_now(),
    ):
        with pytest.raises(ClientClosedError):
            await call
    with pytest.raises(ValidationError):  # validation first, as in the real client
        await recorder.track("")
    assert len(recorder.events) == 1  # still readable after close
    await recorder.aclose()  # idempotent
    sync = RecordingSyncClient(settings)
    sync.close()
    with pytest.raises(ClientClosedError):
        sync.track("a")
    with pytest.raises(ClientClosedError):
        sync.track_many([])


def test_async_recorder_belongs_to_one_loop_like_the_real_client() -> None:
    recorder = RecordingClient()
    asyncio.run(recorder.track("a"))
    with pytest.raises(AnalyticsError, match="another event loop"):
        asyncio.run(recorder.track("b"))


def test_recorders_never_connect() -> None:
    # Every service address points where nothing listens: a recorder that tried to connect would fail.
    threads_before = set(threading.enumerate())
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    settings = Settings(redis_url=nowhere, broker_url=nowhere, database_url="postgresql://nowhere:1/x")

    async def use() -> tuple[int, str]:
        async with RecordingClient(settings) as recorder:
            await recorder.track("a")
            return await recorder.get_queue_size(), await recorder.flush_events_now()

    size, _ = asyncio.run(use())
    assert size == 1
    with RecordingSyncClient(settings) as sync:
        sync.track_event("a", user_id=1)
        assert (sync.get_queue_size(), sync.events[0].user_id) == (1, "1")
        sync.flush_events_now()
    assert set(threading.enumerate()) <= threads_before  # no loop thread either


def test_sync_recorder_is_thread_safe() -> None:
    recorder = RecordingSyncClient()
    ids: list[list[str]] = [[] for _ in range(8)]

    def work(i: int) -> None:
        for n in range(100):
            ids[i].append(recorder.track("t", user_id=str(i), event_metadata={"n": n}))
        ids[i].extend(recorder.track_many([{"event_type": "m", "user_id": str(i)}] * 10))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(recorder.events) == 8 * 110
    assert sorted(e.event_id for e in recorder.events) == sorted(i for batch in ids for i in batch)
    for i in range(8):  # each thread's events in its own order
        mine = [
            e.event_metadata.get("n") for e in recorder.events if e.user_id == str(i) and e.event_type == "t"
        ]
        assert mine == list(range(100))


def test_from_env_reads_the_metadata_limit() -> None:
    recorder = RecordingSyncClient.from_env({"ANALYTICS_MAX_METADATA_BYTES": "16"})
    with pytest.raises(ValidationError) as error:
        recorder.track("x", event_metadata={"k": "v" * 32})
    assert error.value.field == "event_metadata"


def test_entry_point_registers_the_plugin() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["pytest11"] == {"analytics_sdk": "analytics_sdk.pytest_plugin"}


APP_TESTS = """
import pytest
from analytics_sdk import ValidationError
from analytics_sdk.testing import RecordingClient, RecordingSyncClient

async def signup(analytics, email):  # the application's code under test
    await analytics.track("signup", user_id=email, event_metadata={"plan": "free"})

@pytest.mark.asyncio
async def test_async_fixture(analytics_recorder):
    assert isinstance(analytics_recorder, RecordingClient)
    await signup(analytics_recorder, "a@example.com")
    assert [(e.event_type, e.user_id, e.event_metadata) for e in analytics_recorder.events] == [
        ("signup", "a@example.com", {"plan": "free"})
    ]

def test_sync_fixture(analytics_sync_recorder):
    assert isinstance(analytics_sync_recorder, RecordingSyncClient)
    analytics_sync_recorder.track("view", user_id=7)
    assert analytics_sync_recorder.events[0].user_id == "7"

def test_fresh_per_test(analytics_sync_recorder, analytics_recorder):
    assert analytics_sync_recorder.events == [] and analytics_recorder.events == []

def test_same_validation(analytics_sync_recorder):
    with pytest.raises(ValidationError, match="ip_address"):
        analytics_sync_recorder.track("view", ip_address="not an ip")

def test_settings_fixture_overridden_by_conftest(analytics_sync_recorder):
    with pytest.raises(ValidationError, match="event_metadata"):
        analytics_sync_recorder.track("view", event_metadata={"k": "v" * 40})
"""

APP_CONFTEST = """
import pytest
from analytics_sdk import Settings

@pytest.fixture
def analytics_recorder_settings():
    return Settings(analytics_max_metadata_bytes=32)
"""


def test_fixtures_work_through_the_plugin(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pytester.makeconftest(APP_CONFTEST)
    pytester.makepyfile(test_app=APP_TESTS)
    # Whether or not the package is installed (its pytest11 entry point active), the inner run loads
    # exactly the plugins named here: ours by name, as an installed package's entry point would.
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    result = pytester.runpytest_subprocess(
        "-p", "pytest_asyncio.plugin", "-p", "analytics_sdk.pytest_plugin", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(passed=5)


def test_without_the_plugin_the_fixtures_do_not_exist(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pytester.makepyfile(test_app=APP_TESTS)
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")  # an installed package would autoload it
    result = pytester.runpytest_subprocess("-p", "pytest_asyncio.plugin", "-p", "no:cacheprovider")
    result.assert_outcomes(errors=5)
    result.stdout.fnmatch_lines(["*fixture 'analytics_*recorder' not found*"])
