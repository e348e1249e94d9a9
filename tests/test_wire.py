"""Wire format v1 as a contract: payloads queued by the previous release (saved bytes), the shipped
JSON Schema, metadata conversions (issue 13) and the compiled path agreeing with the Python rules."""

from __future__ import annotations

import enum
import json
import uuid
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from importlib import resources
from typing import Any

import msgspec
import pytest

from analytics_sdk import ValidationError, decode, validate
from analytics_sdk._event import (
    FIELD_LIMITS,
    FIELDS,
    decode_many,
    encode_fields,
    metadata_text,
    wire_schema,
    wire_schema_json,
)
from analytics_sdk._event._codec import _Fields
from analytics_sdk._event._schema import Wire

NOW = datetime(2024, 5, 17, 12, 30, 45, 123456, tzinfo=UTC)

# Produced by the previous release's encoder (before the msgspec schema), saved as bytes:
# (payload, the inputs given to it). Events still in queues at an upgrade look like these.
SAVED_V1 = [
    (
        b'{"v":1,"event_id":"0190a0b0-1c2d-7e3f-8a4b-5c6d7e8f9a0b","event_type":"x","event_metadata":{},'
        b'"created_at":"2024-05-17T12:30:45.123456+00:00"}',
        {"event_id": "0190a0b0-1c2d-7e3f-8a4b-5c6d7e8f9a0b", "event_type": "x"},
    ),
    (
        b'{"v":1,"event_id":"0190a0b0-1c2d-7e3f-8a4b-5c6d7e8f9a0c","event_type":"purchase","user_id":"42",'
        b'"session_id":"sess-\xc3\xa9-\xf0\x9f\x99\x82","entity_type":"article","entity_id":"7",'
        b'"event_metadata":{"price":9.99,"qty":2,"tags":["a",1,null,true],"nested":{"ok":[1.5,{"x":"y"}]},'
        b'"big":18446744073709551615,"neg":-9223372036854775808,"s":"\xc3\xa9\xe2\x80\xa8\\"\\\\/\\n"},'
        b'"ip_address":"2001:db8::1","user_agent":"Mozilla/5.0 (X11; Linux x86_64)",'
        b'"referrer":"https://example.com/a?b=c","created_at":"2024-05-17T12:30:45.123456+00:00"}',
        {
            "event_id": "0190a0b0-1c2d-7e3f-8a4b-5c6d7e8f9a0c",
            "event_type": "purchase",
            "user_id": 42,
            "session_id": "sess-é-🙂",
            "entity_type": "article",
            "entity_id": 7,
            "event_metadata": {
                "price": 9.99,
                "qty": 2,
                "tags": ["a", 1, None, True],
                "nested": {"ok": [1.5, {"x": "y"}]},
                "big": 18446744073709551615,
                "neg": -9223372036854775808,
                "s": 'é\u2028"\\/\n',
            },
            "ip_address": "2001:DB8::0:1",
            "user_agent": "Mozilla/5.0 (X11; Linux x86_64)",
            "referrer": "https://example.com/a?b=c",
            "created_at": NOW,
        },
    ),
    (
        b'{"v":1,"event_id":"0190a0b0-1c2d-7e3f-8a4b-5c6d7e8f9a0d","event_type":"page_view",'
        b'"event_metadata":{"a":[1,2.5,"x"],"b":{}},"ip_address":"203.0.113.9",'
        b'"created_at":"2024-05-17T12:30:45+00:00"}',
        {
            "event_id": "0190a0b0-1c2d-7e3f-8a4b-5c6d7e8f9a0d",
            "event_type": "page_view",
            "created_at": NOW.replace(microsecond=0),
            "ip_address": "203.0.113.9",
            "event_metadata": '{"a": [1, 2.5, "x"], "b": {}}',
        },
    ),
    (
        b'{"v":1,"event_id":"0190a0b0-1c2d-7e3f-8a4b-5c6d7e8f9a0e","event_type":"x",'
        b'"event_metadata":{"f":1e-7,"g":1e+300,"h":-0.0,"i":0.1},"created_at":"2024-05-17T12:30:45.123456+00:00"}',
        {
            "event_id": "0190a0b0-1c2d-7e3f-8a4b-5c6d7e8f9a0e",
            "event_type": "x",
            "created_at": NOW.astimezone(timezone(timedelta(hours=-7))).isoformat(),
            "event_metadata": {"f": 1e-7, "g": 1e300, "h": -0.0, "i": 0.1},
        },
    ),
]


@pytest.mark.parametrize(("saved", "fields"), SAVED_V1)
def test_payloads_of_the_previous_release_still_decode(saved: bytes, fields: dict[str, Any]) -> None:
    event = decode(saved)
    assert event == validate(fields, now=NOW)
    assert event.created_at == NOW.replace(microsecond=event.created_at.microsecond)
    assert decode_many([saved]) == [event]


@pytest.mark.parametrize(("saved", "fields"), SAVED_V1)
def test_new_payloads_are_what_the_previous_release_read(saved: bytes, fields: dict[str, Any]) -> None:
    """Both ways: the new encoder writes the same document, the fields in the same order; only
    spellings any JSON and ISO 8601 reader takes alike differ (UTC as Z: the previous release's drain
    read it with datetime.fromisoformat; metadata keys sorted, as jsonb stores them anyway)."""
    _, raw = encode_fields(fields, now=NOW)
    new, old = json.loads(raw), json.loads(saved)
    assert list(new) == list(old)
    assert new | {"created_at": old["created_at"]} == old
    assert new["created_at"] == old["created_at"].replace("+00:00", "Z")
    assert datetime.fromisoformat(new["created_at"]) == datetime.fromisoformat(old["created_at"])
    if list(old["event_metadata"]) == sorted(old["event_metadata"]):
        assert raw == saved.replace(b"+00:00", b"Z").replace(b"1e+300", b"1e300"), "else byte for byte"


def test_other_producers_spelling_is_accepted_and_normalised() -> None:
    """Whitespace, escapes, integer ids, upper-case UUIDs, a non-UTC offset, no metadata at all:
    what another language's encoder may write (the Python rules take these)."""
    raw = (
        b'{ "v": 1, "event_id": "0190A0B0-1C2D-7E3F-8A4B-5C6D7E8F9A0B", "event_type": "sign\\u0075p",'
        b' "user_id": 42, "created_at": "2024-05-17T14:30:45+02:00" }'
    )
    event = decode(raw)
    assert (event.event_id, event.event_type, event.user_id) == (
        "0190a0b0-1c2d-7e3f-8a4b-5c6d7e8f9a0b",
        "signup",
        "42",
    )
    assert event.created_at == datetime(2024, 5, 17, 12, 30, 45, tzinfo=UTC)
    assert event.event_metadata == {}
    assert json.loads(metadata_text(event)) == {}


def test_decode_many_gives_each_error_in_its_place() -> None:
    good = encode_fields({"event_type": "a"})[1]
    out = decode_many([good, b"nope", good.replace(b'"a"', b'"  "')])
    assert out[0] == decode(good)
    assert isinstance(out[1], ValidationError) and out[1].field == "payload"
    assert isinstance(out[2], ValidationError) and out[2].field == "event_type"


def test_drain_keeps_the_metadata_text_it_was_sent() -> None:
    """The jsonb column gets the wire's own text: every digit of a number, nothing re-encoded."""
    raw = (
        b'{"v":1,"event_id":"0190a0b0-1c2d-7e3f-8a4b-5c6d7e8f9a0b","event_type":"x",'
        b'"event_metadata":{"d":3.14159265358979323846264338327950288}}'
    )
    event = decode(raw)
    assert metadata_text(event) == '{"d":3.14159265358979323846264338327950288}'
    assert event.event_metadata == {"d": 3.141592653589793}
    assert b"3.14159265358979323846264338327950288" in event.encode()


# -- the published schema ----------------------------------------------------------------------------


def test_shipped_schema_file_is_the_generated_schema() -> None:
    """The file in the package never drifts from the Struct: regenerate it with
    ``analytics-bridge wire-schema > analytics_sdk/wire-schema-v1.json``."""
    shipped = resources.files("analytics_sdk").joinpath("wire-schema-v1.json").read_bytes()
    assert shipped == wire_schema_json()
    assert json.loads(shipped) == wire_schema()


def test_track_writes_the_wire_struct_field_for_field() -> None:
    """track()'s converted fields are encoded as the wire object itself: same names, same order."""
    assert _Fields.__struct_fields__ == Wire.__struct_fields__
    assert Wire.__struct_fields__ == ("v", *FIELDS)
    for value in (0, 1, 2):
        with pytest.raises(ValidationError) as info:
            encode_fields({"event_type": "x", "v": value})
        assert info.value.field == "v" and "not an event field" in info.value.reason


def test_schema_states_the_field_limits_and_what_is_required() -> None:
    schema = wire_schema()
    assert schema["required"] == ["v", "event_id", "event_type"]
    assert schema["additionalProperties"] is False
    props = schema["properties"]
    for name, limit in FIELD_LIMITS.items():
        node = props[name] if name == "event_type" else props[name]["anyOf"][0]
        assert node["maxLength"] == limit, name
    assert props["event_metadata"]["type"] == "object"


# -- metadata the old service accepted (issue 13) -------------------------------------------------------


class Plan(enum.Enum):
    PRO = "pro"


class Level(enum.IntEnum):
    HIGH = 3


def _wire_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """The metadata as queued (through track()'s path) and as validate() gives it, which agree."""
    _, raw = encode_fields({"event_type": "x", "event_metadata": metadata})
    doc: dict[str, Any] = json.loads(raw)["event_metadata"]
    assert msgspec.json.decode(validate({"event_type": "x", "event_metadata": metadata}).encode())[
        "event_metadata"
    ] == msgspec.json.decode(json.dumps(doc))
    return doc


CONVERSIONS = [
    (datetime(2024, 5, 17, 12, 30, 45, 123456, tzinfo=UTC), "2024-05-17T12:30:45.123456+00:00"),
    (datetime(2024, 5, 17, 12, 30), "2024-05-17T12:30:00"),
    (date(2024, 5, 17), "2024-05-17"),
    (time(12, 30, 45), "12:30:45"),
    (uuid.UUID("0190A0B0-1C2D-7E3F-8A4B-5C6D7E8F9A0B"), "0190a0b0-1c2d-7e3f-8a4b-5c6d7e8f9a0b"),
    (Plan.PRO, "pro"),
    (Level.HIGH, 3),
    ({3, 1, 2}, [1, 2, 3]),
    (frozenset({"b", "a"}), ["a", "b"]),
    ([{Plan.PRO}, (date(2024, 1, 2),)], [["pro"], ["2024-01-02"]]),
]


@pytest.mark.parametrize(("value", "expected"), CONVERSIONS)
def test_metadata_types_are_converted(value: object, expected: object) -> None:
    assert _wire_metadata({"k": value, "nested": {"k": [value]}}) == {
        "k": expected,
        "nested": {"k": [expected]},
    }


def test_decimal_is_written_with_its_exact_digits() -> None:
    exact = Decimal("12345678901234567890.123456789012345678901")
    _, raw = encode_fields({"event_type": "x", "event_metadata": {"price": exact, "cents": Decimal("1.10")}})
    assert b'"event_metadata":{"cents":1.10,"price":12345678901234567890.123456789012345678901}' in raw
    assert metadata_text(decode(raw)) == '{"cents":1.10,"price":12345678901234567890.123456789012345678901}'


def test_a_set_that_does_not_sort_keeps_its_iteration_order() -> None:
    value = {1, "a"}
    assert _wire_metadata({"k": value})["k"] == list(value)


@pytest.mark.parametrize("value", [Decimal("NaN"), Decimal("Infinity"), Decimal("1E+400")])
def test_decimal_json_cannot_carry_is_refused(value: Decimal) -> None:
    with pytest.raises(ValidationError) as info:
        validate({"event_type": "x", "event_metadata": {"a": {"b": value}}})
    assert info.value.field == "event_metadata.a.b"


@pytest.mark.parametrize("value", [object(), b"raw", 1j, {"a": 1}.keys(), Plan])
def test_other_types_are_still_refused_naming_the_path(value: object) -> None:
    with pytest.raises(ValidationError) as info:
        encode_fields({"event_type": "x", "event_metadata": {"a": [1, {"b": value}]}})
    assert info.value.field == "event_metadata.a[1].b"
    assert "JSON-serialisable" in info.value.reason


# -- the compiled path and the Python rules agree ----------------------------------------------------

AGREE = [
    {"event_type": "x"},
    {"event_type": "x", "user_id": "u", "session_id": 7, "entity_type": "a", "entity_id": 10**30},
    {"event_type": "x", "event_metadata": {"b": 1, "a": [1.5, None, True, "é"], "c": {"d": {"e": [{}]}}}},
    {"event_type": "x", "event_metadata": {"deep": [[[[[["too deep for the compiled type"]]]]]]}},
    {"event_type": "x", "event_metadata": {"big": 2**63, "small": -(2**63), "set": {2, 1}, "t": (1, "a")}},
    {"event_type": "x", "event_metadata": {"d": Decimal("0.1"), "e": Plan.PRO, "l": Level.HIGH}},
    {"event_type": "x", "event_metadata": '{"z": 1, "a": [1, {"b": null}]}'},
    {"event_type": "x", "event_metadata": b'{"k": "v"}'},
    {"event_type": "x", "ip_address": "2001:DB8::0:1", "user_agent": "u" * 3000, "referrer": "r"},
    {"event_type": "x", "created_at": NOW.astimezone(timezone(timedelta(hours=5)))},
    {"event_type": "x", "created_at": "2024-05-17T12:30:45"},
    {"event_type": "x", "event_id": uuid.UUID("0190a0b0-1c2d-7e3f-8a4b-5c6d7e8f9a0b")},
    {"event_type": "x", "event_id": "0190A0B0-1C2D-7E3F-8A4B-5C6D7E8F9A0B"},
    {"event_type": Plan.PRO.value, "entity_type": "k" * 128},
]


@pytest.mark.parametrize("fields", AGREE)
def test_the_compiled_path_writes_what_the_rules_write(fields: dict[str, Any]) -> None:
    from analytics_sdk._event._codec import _decode_slow
    from analytics_sdk._event._rules import validate_slow

    fields = {"event_id": "0190a0b0-1c2d-7e3f-8a4b-5c6d7e8f9a0b", **fields}
    _, fast = encode_fields(fields, now=NOW)
    assert fast == validate_slow(fields, 32 * 1024, NOW).encode()
    assert decode(fast) == decode_many([fast])[0]
    assert decode(fast).encode() == fast, "decoded and re-encoded: the same bytes"
    assert decode(fast) == _decode_slow(fast, 32 * 1024), "the drain's compiled path, its rules"
