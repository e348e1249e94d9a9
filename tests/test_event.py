"""Event validation, normalisation and the JSON wire format: pure unit tests, no services."""

from __future__ import annotations

import ctypes
import enum
import ipaddress
import math
import os
import pickle
import uuid
from collections import OrderedDict
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest

from analytics_sdk import Event, ValidationError, decode, validate
from analytics_sdk._event import FIELD_LIMITS, FIELDS, WIRE_VERSION, encode_fields, new_event_id
from analytics_sdk._event._schema import TRUNCATED

NOW = datetime(2024, 5, 17, 12, 30, 45, 123456, tzinfo=UTC)
EVENT_ID = "0190a0b0-1c2d-7e3f-8a4b-5c6d7e8f9a0b"
TEXT_FIELDS = tuple(FIELD_LIMITS)


def check(fields: dict[str, Any], field: str, *, max_metadata_bytes: int = 32 * 1024) -> ValidationError:
    """Validate ``fields``; assert a ValidationError (also a ValueError) naming ``field``."""
    with pytest.raises(ValidationError) as info:
        validate(fields, max_metadata_bytes=max_metadata_bytes, now=NOW)
    exc = info.value
    # track()'s fused path raises the same first error.
    with pytest.raises(ValidationError) as fused:
        encode_fields(fields, max_metadata_bytes=max_metadata_bytes, now=NOW)
    assert (fused.value.field, fused.value.reason) == (exc.field, exc.reason)
    assert isinstance(exc, ValueError)
    assert exc.field == field or exc.field.startswith(field + "."), exc.field
    assert str(exc).startswith(exc.field + "="), str(exc)
    assert len(str(exc)) < 400, "the message shows the value shortened"
    return exc


def event(**fields: Any) -> dict[str, Any]:
    return {"event_type": "page_view", **fields}


# -- required, types --------------------------------------------------------------------------------


@pytest.mark.parametrize("fields", [{}, {"user_id": "1"}, {"event_type": None}])
def test_missing_event_type(fields: dict[str, Any]) -> None:
    exc = check(fields, "event_type")
    assert "required" in exc.reason


@pytest.mark.parametrize("value", ["", "   ", "\t\n"])
def test_empty_event_type(value: str) -> None:
    exc = check({"event_type": value}, "event_type")
    assert repr(value) in str(exc)


@pytest.mark.parametrize("name", TEXT_FIELDS)
@pytest.mark.parametrize("value", [3.5, b"bytes", ["x"], {"a": 1}, True])
def test_text_field_wrong_type(name: str, value: object) -> None:
    exc = check(event(**{name: value}), name)
    assert type(value).__name__ in exc.reason
    assert exc.value == value


@pytest.mark.parametrize("name", ["event_type", "entity_type", "user_agent", "referrer"])
def test_non_id_text_field_rejects_int(name: str) -> None:
    check(event(**{name: 42}), name)


@pytest.mark.parametrize("name", ["user_id", "session_id", "entity_id"])
def test_integer_ids_become_text(name: str) -> None:
    assert getattr(validate(event(**{name: 42})), name) == "42"


@pytest.mark.parametrize("name", TEXT_FIELDS)
def test_nul_in_every_text_field(name: str) -> None:
    exc = check(event(**{name: "a\x00b"}), name)
    assert "NUL" in exc.reason
    assert r"'a\x00b'" in str(exc)


@pytest.mark.parametrize("name", TEXT_FIELDS)
def test_lone_surrogate_in_text_field(name: str) -> None:
    exc = check(event(**{name: "a\ud800"}), name)
    assert "surrogate" in exc.reason


@pytest.mark.parametrize("name", [name for name in TEXT_FIELDS if name not in TRUNCATED])
def test_string_over_limit(name: str) -> None:
    limit = FIELD_LIMITS[name]
    assert getattr(validate(event(**{name: "x" * limit})), name) == "x" * limit
    exc = check(event(**{name: "y" * (limit + 1)}), name)
    assert str(limit) in exc.reason
    assert f"({limit + 1} chars)" in str(exc), "a long value is shown cut, with its length"
    assert "yyyy" in str(exc)


@pytest.mark.parametrize("name", sorted(TRUNCATED))
def test_header_over_limit_is_truncated_not_refused(name: str) -> None:
    """Junk in a header must not lose the event (issue 13): cut to the limit, in track() and drain."""
    assert {"user_agent", "referrer"} == TRUNCATED
    limit = FIELD_LIMITS[name]
    value = "é" * limit + "tail"
    assert getattr(validate(event(**{name: value})), name) == "é" * limit
    _, raw = encode_fields(event(**{name: value}), now=NOW)
    assert getattr(decode(raw), name) == "é" * limit
    # Another producer's over-long header, on the wire: the drain cuts it too.
    doc = {"v": 1, "event_id": EVENT_ID, "event_type": "x", name: value}
    assert getattr(decode(msgspec.json.encode(doc)), name) == "é" * limit
    # Still refused: what PostgreSQL cannot store.
    check(event(**{name: "y" * (limit + 5) + "\x00"}), name)


def test_unknown_field() -> None:
    exc = check(event(colour="red"), "colour")
    assert "'red'" in str(exc)
    assert "not an event field" in exc.reason


def test_unknown_non_string_field_name() -> None:
    with pytest.raises(ValidationError, match="not an event field"):
        validate({"event_type": "x", 1: "one"})  # type: ignore[dict-item]


# -- event_id -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["not-a-uuid", "1234", "0190a0b0-1c2d-7e3f-8a4b-5c6d7e8f9a0", "a\x00b", ""])
def test_event_id_not_a_uuid(value: str) -> None:
    exc = check(event(event_id=value), "event_id")
    assert repr(value) in str(exc)


@pytest.mark.parametrize("value", [12345, 1.5, b"0190a0b0-1c2d-7e3f-8a4b-5c6d7e8f9a0b"])
def test_event_id_wrong_type(value: object) -> None:
    check(event(event_id=value), "event_id")


def test_event_id_normalised() -> None:
    given = uuid.UUID(EVENT_ID)
    assert validate(event(event_id=given)).event_id == EVENT_ID
    assert validate(event(event_id=EVENT_ID.upper())).event_id == EVENT_ID
    assert validate(event(event_id=EVENT_ID.replace("-", ""))).event_id == EVENT_ID


def test_new_event_id_is_uuid7_and_time_ordered() -> None:
    ids = [new_event_id() for _ in range(1000)]
    assert len(set(ids)) == len(ids)
    for text in ids[:10]:
        parsed = uuid.UUID(text)
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122
        assert str(parsed) == text
    millis = [int(text.replace("-", "")[:12], 16) for text in ids]
    assert millis == sorted(millis)
    assert abs(millis[0] - datetime.now(UTC).timestamp() * 1000) < 60_000
    variants = {text[19] for text in [new_event_id() for _ in range(2000)]}
    assert variants == set("89ab"), "the two variant bits fixed, the two after them random"


_CHILD_IDS = 20


def _ids_in_child(fork: Any) -> list[str]:
    """``fork()``, make ids in the child, send them back through a pipe; the child never returns."""
    read, write = os.pipe()
    pid = fork()
    if pid == 0:
        try:
            os.close(read)
            os.write(write, msgspec.json.encode([new_event_id() for _ in range(_CHILD_IDS)]))
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    return list(msgspec.json.decode(data))


def _random_part(event_id: str) -> str:
    return event_id.replace("-", "")[13:]  # after 48 bits of ms and the version digit


def test_parent_and_child_after_fork_make_different_ids() -> None:
    new_event_id()  # any state (a buffer, a generator) exists in the parent before the fork
    child = _ids_in_child(os.fork)
    parent = [new_event_id() for _ in range(_CHILD_IDS)]
    assert not {_random_part(i) for i in child} & {_random_part(i) for i in parent}


def test_a_process_cloned_twice_without_notice_makes_different_ids() -> None:
    """A VM or container snapshot restored twice: two copies of the same memory, and no fork hook runs
    in either. libc's fork() called directly (not os.fork) clones the process exactly so: Python's
    at-fork handlers do not run. Any state the ids draw from (a seeded generator, a buffer of
    random bytes) would be copied and replayed; os.urandom per id is not memory, so it is not."""
    libc_fork = ctypes.PyDLL(None).fork  # PyDLL: the GIL stays held across the call, as os.fork does
    libc_fork.restype = ctypes.c_int
    new_event_id()
    first = _ids_in_child(libc_fork)
    second = _ids_in_child(libc_fork)
    assert len(first) == len(second) == _CHILD_IDS
    assert not {_random_part(i) for i in first} & {_random_part(i) for i in second}


# -- ip_address --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", ["127.1", "256.1.1.1", "010.0.0.1", "not an ip", "1.2.3.4/24", "::g", "1.2.3.4\x00", ""]
)
def test_ip_rejected_by_ipaddress(value: str) -> None:
    exc = check(event(ip_address=value), "ip_address")
    assert repr(value) in str(exc)


@pytest.mark.parametrize("value", ["fe80::1%eth0", "fe80::1%1"])
def test_ipv6_zone_id_rejected(value: str) -> None:
    exc = check(event(ip_address=value), "ip_address")
    assert "zone" in exc.reason


@pytest.mark.parametrize("value", [3232235777, 1.0, b"1.2.3.4"])
def test_ip_wrong_type(value: object) -> None:
    check(event(ip_address=value), "ip_address")


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("203.0.113.9", "203.0.113.9"),
        ("2001:DB8::0:1", "2001:db8::1"),
        (ipaddress.ip_address("198.51.100.7"), "198.51.100.7"),
        (ipaddress.ip_address("::1"), "::1"),
    ],
)
def test_ip_normalised(given: object, stored: str) -> None:
    assert validate(event(ip_address=given)).ip_address == stored


# -- created_at --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        datetime(1999, 12, 31, 23, 59, tzinfo=UTC),
        datetime(1970, 1, 1),
        NOW + timedelta(days=1, seconds=1),
        "9999-12-31T23:59:59-05:00",
        "0001-01-01T00:00:00+05:00",
        "1970-01-01T00:00:00Z",
    ],
)
def test_created_at_out_of_range(value: object) -> None:
    exc = check(event(created_at=value), "created_at")
    assert "2000" in exc.reason


@pytest.mark.parametrize("value", ["yesterday", "2024-13-01", "2024-05-17T25:00:00", "", "2024-05-17\x00"])
def test_created_at_unparseable(value: str) -> None:
    exc = check(event(created_at=value), "created_at")
    assert "ISO 8601" in exc.reason
    assert repr(value) in str(exc)


@pytest.mark.parametrize("value", [1715949045, 1715949045.5, NOW.date()])
def test_created_at_wrong_type(value: object) -> None:
    check(event(created_at=value), "created_at")


def test_created_at_normalised_to_utc() -> None:
    plus_two = timezone(timedelta(hours=2))
    local = NOW.astimezone(plus_two)
    assert validate(event(created_at=local), now=NOW).created_at == NOW
    assert validate(event(created_at=local.isoformat()), now=NOW).created_at.utcoffset() == timedelta(0)
    naive = validate(event(created_at=NOW.replace(tzinfo=None)), now=NOW).created_at
    assert naive == NOW, "a naive datetime is taken as UTC"
    assert validate(event(), now=NOW).created_at == NOW
    default = validate(event()).created_at
    assert default.tzinfo is not None
    assert abs(default - datetime.now(UTC)) < timedelta(seconds=60)


# -- event_metadata ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [[1, 2], 5, 1.5, True, '["a"]', "42", '"text"', b"[1]", bytearray(b"{}")])
def test_metadata_not_an_object(value: object) -> None:
    exc = check(event(event_metadata=value), "event_metadata")
    assert "object" in exc.reason


@pytest.mark.parametrize("value", ["{", "{'a': 1}", "{a: 1}", '{"a": NaN}', '{"a": Infinity}', "", b"\xff"])
def test_metadata_invalid_json_string(value: str | bytes) -> None:
    exc = check(event(event_metadata=value), "event_metadata")
    assert "JSON" in exc.reason


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_metadata_non_finite_float(value: float) -> None:
    exc = check(event(event_metadata={"score": value}), "event_metadata")
    assert exc.field == "event_metadata.score"
    assert "finite" in exc.reason


def test_metadata_nested_nan_named_by_path() -> None:
    exc = check(event(event_metadata={"a": {"b": [1, math.nan]}}), "event_metadata")
    assert exc.field == "event_metadata.a.b[1]"


@pytest.mark.parametrize("value", [object(), b"bytes", 1 + 2j, bytearray(b"x"), print])
def test_metadata_value_not_serialisable(value: object) -> None:
    exc = check(event(event_metadata={"v": value}), "event_metadata")
    assert "JSON-serialisable" in exc.reason
    deep = check(event(event_metadata={"a": [{"b": value}]}), "event_metadata")
    assert deep.field == "event_metadata.a[0].b"


@pytest.mark.parametrize("key", [1, 1.5, None, ("t",), b"k"])
def test_metadata_non_string_key(key: object) -> None:
    exc = check(event(event_metadata={key: 1}), "event_metadata")
    assert "key" in exc.reason


def test_metadata_nul_in_key_and_value() -> None:
    exc = check(event(event_metadata={"a\x00": 1}), "event_metadata")
    assert "NUL" in exc.reason
    exc = check(event(event_metadata={"a": "b\x00"}), "event_metadata")
    assert exc.field == "event_metadata.a"
    exc = check(event(event_metadata={"a": [{"b\x00c": 1}]}), "event_metadata")
    assert "NUL" in exc.reason
    exc = check(event(event_metadata='{"a": "\\u0000"}'), "event_metadata")
    assert "NUL" in exc.reason


def test_metadata_str_and_float_subclasses_checked() -> None:
    class Text(str):
        pass

    class Number(float):
        pass

    check(event(event_metadata={"a": Text("x\x00")}), "event_metadata")
    check(event(event_metadata={"a": Number("nan")}), "event_metadata")


def test_metadata_lone_surrogate() -> None:
    check(event(event_metadata={"a": "\udc80"}), "event_metadata")
    check(event(event_metadata={"\udc80": 1}), "event_metadata")


def test_metadata_integer_beyond_64_bits() -> None:
    assert check(event(event_metadata={"a": 2**64}), "event_metadata").field == "event_metadata.a"


BIG = [
    ("a", 2**64, '{"a": 18446744073709551616}'),
    ("a.b[1]", 123456789012345678901234, '{"a": {"b": [1, 123456789012345678901234]}}'),
    ("x", -(2**63) - 1, '{"x": -9223372036854775809}'),
]


@pytest.mark.parametrize(("path", "number", "text"), BIG)
def test_metadata_big_integer_one_rule_for_dict_and_json_string(path: str, number: int, text: str) -> None:
    """The old parser read the string's integer as a float (silently rounded) while the dict was
    rejected: both are rejected, naming the same path and showing the exact integer."""
    as_dict = msgspec.json.decode(text.replace(str(number), "0"))
    node: Any = as_dict
    keys = path.replace("[1]", ".1").split(".")
    for key in keys[:-1]:
        node = node[key] if isinstance(node, dict) else node[int(key)]
    node[keys[-1] if isinstance(node, dict) else int(keys[-1])] = number
    for metadata in (as_dict, text, text.encode()):
        exc = check(event(event_metadata=metadata), "event_metadata")
        assert exc.field == f"event_metadata.{path}"
        assert exc.value == number and type(exc.value) is int, exc.value


@pytest.mark.parametrize(
    "text", ['{"x": 18446744073709551615}', '{"x": -9223372036854775808}', '{"x": 0.1234567890123456789012}']
)
def test_metadata_long_numbers_within_range_kept_exactly(text: str) -> None:
    expected = msgspec.json.decode(text)
    assert validate(event(event_metadata=text)).event_metadata == expected
    assert validate(event(event_metadata=expected)).event_metadata == expected
    assert validate(event(event_metadata='{"s": "123456789012345678901234"}')).event_metadata == {
        "s": "123456789012345678901234"
    }


def test_metadata_self_containing_or_too_deep() -> None:
    loop: dict[str, Any] = {}
    loop["self"] = loop
    exc = check(event(event_metadata=loop), "event_metadata")
    assert "nested" in exc.reason
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(5000):
        node["a"] = {}
        node = node["a"]
    check(event(event_metadata=deep), "event_metadata")


def test_metadata_over_size_limit() -> None:
    limit = 1024
    body = {"text": "x" * (limit - len('{"text":""}'))}
    assert len(msgspec.json.encode(body)) == limit
    assert validate(event(event_metadata=body), max_metadata_bytes=limit).event_metadata == body
    body["text"] += "x"
    exc = check(event(event_metadata=body), "event_metadata", max_metadata_bytes=limit)
    assert f"{limit + 1} bytes" in exc.reason
    assert str(limit) in exc.reason
    check(
        event(event_metadata=msgspec.json.encode(body).decode()), "event_metadata", max_metadata_bytes=limit
    )
    # The default limit is 32 KiB.
    check(event(event_metadata={"t": "x" * 40_000}), "event_metadata")


def test_metadata_json_string_parsed() -> None:
    parsed = validate(event(event_metadata='{"scroll": 0.8, "tags": ["a", "b"], "n": null}'))
    assert parsed.event_metadata == {"scroll": 0.8, "tags": ["a", "b"], "n": None}
    assert validate(event(event_metadata=b'{"k": 1}')).event_metadata == {"k": 1}
    assert validate(event(event_metadata="{}")).event_metadata == {}
    assert validate(event(event_metadata=None)).event_metadata == {}
    assert validate(event()).event_metadata == {}


def test_metadata_mappings_and_subclasses_accepted() -> None:
    class Colour(enum.StrEnum):
        RED = "red"

    metadata = validate(event(event_metadata=OrderedDict(a=OrderedDict(b=(1, 2)), c=Colour.RED)))
    assert msgspec.json.decode(metadata.encode())["event_metadata"] == {"a": {"b": [1, 2]}, "c": "red"}


# -- messages ----------------------------------------------------------------------------------------


def test_huge_bad_value_is_shortened() -> None:
    value = "z" * 5_000_000 + "\x00"
    exc = check(event(user_agent=value), "user_agent")
    assert exc.value is value
    assert "(5000001 chars)" in str(exc)


def test_validation_error_is_value_error_and_analytics_error() -> None:
    from analytics_sdk import AnalyticsError

    with pytest.raises(ValueError, match="event_type"):
        validate({"event_type": ""})
    with pytest.raises(AnalyticsError):
        validate({"event_type": ""})


# -- round trip --------------------------------------------------------------------------------------


def full_event() -> Event:
    return validate(
        {
            "event_id": EVENT_ID,
            "event_type": "purchase",
            "user_id": "user-42",
            "session_id": "sess-é-🙂",
            "entity_type": "article",
            "entity_id": 7,
            "event_metadata": {
                "price": 9.99,
                "qty": 2,
                "tags": ["a", "b"],
                "nested": {"ok": True},
                "n": None,
            },
            "ip_address": "2001:db8::1",
            "user_agent": "Mozilla/5.0 (X11; Linux x86_64)",
            "referrer": "https://example.com/a?b=c",
            "created_at": NOW,
        },
        now=NOW,
    )


def test_round_trip_every_field() -> None:
    original = full_event()
    assert all(value is not None for value in original), "every field is set"
    raw = original.encode()
    doc = msgspec.json.decode(raw)
    assert doc["v"] == WIRE_VERSION
    assert set(doc) == {"v", *FIELDS}
    decoded = decode(raw)
    assert decoded == original
    assert decoded.created_at.tzinfo is not None
    assert decoded._asdict() == original._asdict()
    assert decode(raw.decode()) == original


def test_round_trip_minimal_event_omits_none() -> None:
    original = validate({"event_type": "x"}, now=NOW)
    doc = msgspec.json.decode(original.encode())
    assert set(doc) == {"v", "event_id", "event_type", "event_metadata", "created_at"}
    assert decode(original.encode()) == original


def test_round_trip_of_metadata_given_as_string() -> None:
    original = validate(event(event_metadata='{"a": [1, 2.5, "x"]}'), now=NOW)
    assert decode(original.encode()).event_metadata == {"a": [1, 2.5, "x"]}


# -- decode ------------------------------------------------------------------------------------------

_UNPICKLED: list[str] = []


def _mark_unpickled() -> str:
    _UNPICKLED.append("unpickled")
    return "unpickled"


class _Trap:
    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (_mark_unpickled, ())


@pytest.mark.parametrize(
    "raw", [b"", b"not json", b"\x80\x04\x95", b"{", b"\xff\xfe{}", "{'v': 1}", b'{"v": 1} trailing']
)
def test_decode_non_json(raw: bytes | str) -> None:
    with pytest.raises(ValidationError) as info:
        decode(raw)
    assert info.value.field == "payload"
    assert isinstance(info.value, ValueError)


def test_decode_never_unpickles() -> None:
    for payload in (
        pickle.dumps(_Trap()),
        pickle.dumps({"v": 1, "event_type": "x"}),
        pickle.dumps([_Trap()], 0),
    ):
        pickle_protocol_sanity = payload[:1]
        assert pickle_protocol_sanity in (b"\x80", b"(", b"c")
        with pytest.raises(ValidationError) as info:
            decode(payload)
        assert info.value.field == "payload"
    assert _UNPICKLED == []
    # The trap works when unpickled, so the assertion above means something.
    assert pickle.loads(pickle.dumps(_Trap())) == "unpickled"
    _UNPICKLED.clear()


@pytest.mark.parametrize("raw", [b"[]", b"1", b'"text"', b"null", b"true"])
def test_decode_not_an_object(raw: bytes) -> None:
    with pytest.raises(ValidationError) as info:
        decode(raw)
    assert info.value.field == "payload"


@pytest.mark.parametrize("version", [None, 0, 2, "1", True, 1.0, [1]])
def test_decode_wrong_version(version: object) -> None:
    doc: dict[str, Any] = msgspec.json.decode(full_event().encode())
    if version is None:
        del doc["v"]
    else:
        doc["v"] = version
    with pytest.raises(ValidationError) as info:
        decode(msgspec.json.encode(doc))
    assert info.value.field == "v"


def test_decode_requires_event_id() -> None:
    with pytest.raises(ValidationError) as info:
        decode(b'{"v": 1, "event_type": "x"}')
    assert info.value.field == "event_id"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"event_type": ""}, "event_type"),
        ({"ip_address": "127.1"}, "ip_address"),
        ({"user_id": "a\x00"}, "user_id"),
        ({"event_metadata": [1]}, "event_metadata"),
        ({"event_metadata": {"a": "\x00"}}, "event_metadata.a"),
        ({"created_at": "1970-01-01T00:00:00+00:00"}, "created_at"),
        ({"colour": "red"}, "colour"),
        ({"event_id": "nope"}, "event_id"),
    ],
)
def test_decode_revalidates(change: dict[str, Any], field: str) -> None:
    doc: dict[str, Any] = msgspec.json.decode(full_event().encode())
    doc.update(change)
    with pytest.raises(ValidationError) as info:
        decode(msgspec.json.encode(doc))
    assert info.value.field == field


def test_decode_applies_metadata_limit() -> None:
    raw = validate(event(event_metadata={"t": "x" * 500}), now=NOW).encode()
    assert decode(raw, max_metadata_bytes=1000).event_metadata["t"] == "x" * 500
    with pytest.raises(ValidationError) as info:
        decode(raw, max_metadata_bytes=100)
    assert info.value.field == "event_metadata"


# -- track()'s fused path --------------------------------------------------------------------------------


class _SubclassedDatetime(datetime):
    """Like freezegun's FakeDatetime: JSON encoders refuse datetime subclasses."""


@pytest.mark.parametrize(
    "fields",
    [
        {"event_type": "x"},
        {"event_type": "x", "event_metadata": None, "user_id": None},
        {
            "event_type": "purchase",
            "user_id": 42,
            "session_id": "sess-é-🙂",
            "entity_type": "article",
            "entity_id": 7,
            "event_metadata": {
                "price": 9.99,
                "tags": ["a", 1, None, True],
                "nested": {"ok": [1.5, {"x": "y"}]},
            },
            "ip_address": ipaddress.ip_address("2001:db8::1"),
            "user_agent": "Mozilla/5.0",
            "referrer": "https://example.com/a?b=c",
            "created_at": NOW,
        },
        {"event_type": "x", "event_metadata": '{"a": [1, 2.5, "x"], "b": {}}'},
        {"event_type": "x", "event_metadata": b'{"k": null}'},
        {"event_type": "x", "event_metadata": OrderedDict(b=(1, 2), a="z")},
        {"event_type": "x", "created_at": NOW.replace(tzinfo=None)},
        {"event_type": "x", "created_at": NOW.astimezone(timezone(timedelta(hours=-7))).isoformat()},
        {"event_type": "x", "created_at": _SubclassedDatetime(2024, 5, 17, tzinfo=UTC)},
        {"event_type": "x", "created_at": NOW.replace(microsecond=0)},
        {"event_type": "x", "ip_address": "203.0.113.9", "event_id": uuid.UUID(EVENT_ID)},
    ],
)
def test_encode_fields_is_validate_then_encode(fields: dict[str, Any]) -> None:
    fields = {"event_id": EVENT_ID, **fields}
    event_id, raw = encode_fields(fields, now=NOW)
    event = validate(fields, now=NOW)
    assert event_id == event.event_id
    assert raw == event.encode(), "byte for byte"
    assert decode(raw).event_id == event_id


def test_encode_fields_makes_id_and_timestamp() -> None:
    event_id, raw = encode_fields({"event_type": "x"})
    event = decode(raw)
    assert event.event_id == event_id
    assert uuid.UUID(event_id).version == 7
    assert abs(event.created_at - datetime.now(UTC)) < timedelta(seconds=60)


def test_event_ids_differ_across_fork_and_seed() -> None:
    import os
    import random

    random.seed(1234)  # an application seeding the global generator does not touch ours
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            random.seed(1234)
            os.write(write, msgspec.json.encode([new_event_id() for _ in range(1000)]))
        finally:
            os._exit(0)
    os.close(write)
    mine = {new_event_id() for _ in range(1000)}
    with os.fdopen(read, "rb") as pipe:
        child = set(msgspec.json.decode(pipe.read()))
    os.waitpid(pid, 0)
    assert len(child) == 1000
    assert not mine & child


def test_integer_id_too_long_names_its_field() -> None:
    with pytest.raises(ValidationError) as info:
        validate({"event_type": "x", "user_id": 10**5000})
    assert info.value.field == "user_id"
    assert validate({"event_type": "x", "user_id": 10**200}).user_id == str(10**200)
