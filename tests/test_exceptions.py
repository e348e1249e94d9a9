"""The exception hierarchy and messages (analytics_sdk._exceptions)."""

from __future__ import annotations

import copy
import pickle

import pytest

from analytics_sdk import (
    AnalyticsError,
    ClientClosedError,
    ConfigurationError,
    PublishError,
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


def test_publish_error_is_chained() -> None:
    cause = ConnectionError("refused")
    try:
        try:
            raise cause
        except ConnectionError as exc:
            raise PublishError("not acknowledged") from exc
    except PublishError as exc:
        assert exc.__cause__ is cause
