"""The exception hierarchy and messages (analytics_sdk._exceptions)."""

from __future__ import annotations

import asyncio
import copy
import pickle

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from servers import free_port

from analytics_sdk import (
    AnalyticsClient,
    AnalyticsError,
    ClientClosedError,
    ConfigurationError,
    PublishError,
    Settings,
    ValidationError,
)
from analytics_sdk._exceptions import shorten


def test_hierarchy() -> None:
    assert issubclass(ConfigurationError, AnalyticsError)
    assert issubclass(ConfigurationError, ValueError)
    assert issubclass(ValidationError, AnalyticsError)
    assert issubclass(ValidationError, ValueError)
    assert issubclass(PublishError, AnalyticsError)
    assert not issubclass(PublishError, ValueError), "a Redis failure is not bad input"
    assert issubclass(ClientClosedError, AnalyticsError)
    assert issubclass(ClientClosedError, RuntimeError)
    assert issubclass(AnalyticsError, Exception)


def test_validation_error_fields_and_message() -> None:
    exc = ValidationError("ip_address", "127.1", "is not an IPv4 or IPv6 address")
    assert (exc.field, exc.value, exc.reason) == ("ip_address", "127.1", "is not an IPv4 or IPv6 address")
    assert str(exc) == "ip_address='127.1': is not an IPv4 or IPv6 address"


def test_configuration_error_fields_and_message() -> None:
    exc = ConfigurationError("ANALYTICS_BATCH_SIZE", "0", "must be greater than 0")
    assert (exc.variable, exc.value, exc.reason) == ("ANALYTICS_BATCH_SIZE", "0", "must be greater than 0")
    assert str(exc) == "ANALYTICS_BATCH_SIZE='0': must be greater than 0"


@pytest.mark.parametrize(
    "exc",
    [
        ValidationError("user_id", ["x"] * 3, "must be a string"),
        ConfigurationError("ANALYTICS_REDIS_PORT", "x", "must be an integer"),
        PublishError("Redis did not acknowledge 3 event(s)"),
        ClientClosedError("closed"),
    ],
)
def test_copy_and_pickle_keep_the_details(exc: AnalyticsError) -> None:
    for clone in (copy.copy(exc), pickle.loads(pickle.dumps(exc))):
        assert type(clone) is type(exc)
        assert str(clone) == str(exc)
        assert clone.__dict__ == exc.__dict__


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("short", "'short'"),
        (None, "None"),
        (12, "12"),
        (float("nan"), "nan"),
        ({"a": 1}, "{'a': 1}"),
    ],
)
def test_shorten_small_values_verbatim(value: object, expected: str) -> None:
    assert shorten(value) == expected


def test_shorten_cuts_long_values() -> None:
    text = shorten("a" * 10_000)
    assert len(text) <= 100
    assert text.endswith("(10000 chars)")
    assert text.startswith("'aaaa")
    data = shorten(b"\x00" * 5000)
    assert data.endswith("(5000 bytes)")
    nested = shorten({"k": list(range(10_000))})
    assert len(nested) <= 100
    deep: list[object] = []
    node = deep
    for _ in range(10_000):
        child: list[object] = []
        node.append(child)
        node = child
    assert len(shorten(deep)) <= 100, "deep values are not rendered whole"


def test_shorten_survives_broken_or_recursive_reprs() -> None:
    class Broken:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    assert "Broken" in shorten(Broken())
    loop: dict[str, object] = {}
    loop["self"] = loop
    assert shorten(loop).startswith("{'self': ")
    exc = ValidationError("event_metadata", loop, "contains itself")
    assert "contains itself" in str(exc)


async def test_the_clients_publish_errors_are_chained_to_the_redis_error() -> None:
    """Ours, not Python's ``raise from``: a track() that Redis refused raises a PublishError whose
    ``__cause__`` is redis-py's error; every caller of a failed MULTI gets an instance of its own
    (a shared one would collect every caller's traceback), chained to that same error; and the
    breaker's fast failures afterwards are chained to it too."""
    settings = Settings(
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        analytics_publish_retries=0,
        analytics_backlog_trigger=False,
    )
    async with AnalyticsClient(settings) as client:
        results = await asyncio.gather(*(client.track("nowhere") for _ in range(3)), return_exceptions=True)
        assert all(isinstance(r, PublishError) for r in results), results
        assert len({id(r) for r in results}) == 3, "one exception object per caller"
        causes = {id(r.__cause__) for r in results}  # type: ignore[union-attr]
        assert len(causes) == 1
        cause = results[0].__cause__  # type: ignore[union-attr]
        assert isinstance(cause, RedisConnectionError)
        assert "Redis did not acknowledge" in str(results[0])
        with pytest.raises(PublishError) as info:
            await client.track("still-nowhere")  # the breaker is open now
        assert info.value.__cause__ is cause
        with pytest.raises(PublishError) as size_info:
            await client.get_queue_size()
        assert size_info.value.__cause__ is cause
