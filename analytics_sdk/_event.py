"""Event: validation, normalisation and the JSON wire format.

The same :func:`validate` runs in ``track()`` and again in the drain (:func:`decode`), because queued
bytes may come from older clients or other languages. Every rejection is a :class:`ValidationError`
naming the field. Wire format: one JSON object with ``"v": WIRE_VERSION``; ``None`` fields are
omitted to keep queued events small.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import orjson

from ._exceptions import ValidationError
from ._metadata import metadata, metadata_json

__all__ = [
    "FIELD_LIMITS",
    "WIRE_VERSION",
    "Event",
    "decode",
    "encode_fields",
    "new_event_id",
    "validate",
]

WIRE_VERSION = 1

#: Longest accepted string per text field, in characters. PostgreSQL's text has no limit of its own;
#: these keep one runaway value (a pasted document as a user agent) from bloating the queue and table.
FIELD_LIMITS: dict[str, int] = {
    "event_type": 128,
    "user_id": 255,
    "session_id": 255,
    "entity_type": 128,
    "entity_id": 255,
    "user_agent": 2048,
    "referrer": 2048,
}
_ID_FIELDS = frozenset({"user_id", "session_id", "entity_id"})
_TEXT_BEFORE_METADATA = tuple(
    (name, FIELD_LIMITS[name]) for name in ("user_id", "session_id", "entity_type", "entity_id")
)
_TEXT_AFTER_IP = tuple((name, FIELD_LIMITS[name]) for name in ("user_agent", "referrer"))
FIELDS = (
    "event_id",
    "event_type",
    "user_id",
    "session_id",
    "entity_type",
    "entity_id",
    "event_metadata",
    "ip_address",
    "user_agent",
    "referrer",
    "created_at",
)
_KNOWN = frozenset(FIELDS)
#: created_at outside [_EARLIEST, now + _MAX_FUTURE] is a bug upstream (epoch 0, year 9999, ms taken for
#: s); rejecting it keeps the (event_type, created_at) index meaningful.
_EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
_MAX_FUTURE = timedelta(days=1)
_OUT_OF_RANGE = "is before 2000 or more than a day ahead"
_now = functools.partial(datetime.now, UTC)


class Event(NamedTuple):
    """A validated, normalised event. Build one with :func:`validate`, never directly."""

    event_id: str
    event_type: str
    user_id: str | None
    session_id: str | None
    entity_type: str | None
    entity_id: str | None
    event_metadata: dict[str, Any]
    ip_address: str | None
    user_agent: str | None
    referrer: str | None
    created_at: datetime

    def encode(self) -> bytes:
        """The wire form: compact JSON bytes."""
        doc: dict[str, Any] = {"v": WIRE_VERSION}
        doc.update({name: value for name, value in zip(FIELDS, self, strict=True) if value is not None})
        # orjson writes a datetime exactly as isoformat() does (RFC 3339), three times faster; but it
        # refuses datetime subclasses (freezegun's FakeDatetime, pendulum), so those take isoformat().
        if type(self.created_at) is not datetime:
            doc["created_at"] = self.created_at.isoformat()
        return orjson.dumps(doc)


# The random part of event ids: os.urandom, 10 bytes read per id. Not a seeded generator, nor a buffer
# drawn ahead: both are memory, which a VM or container snapshot restored twice (Firecracker, CRIU,
# Lambda SnapStart) replays, so both copies would emit the same ids and the sink's dedupe on event_id
# would silently drop the second event. The kernel reseeds on a VM generation change; ~0.5 us here.
_urandom = os.urandom
# The variant nibble "10xx" from a random hex digit: keeps its two low bits.
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}
# (unix ms, its "xxxxxxxx-xxxx-7"), replaced as one tuple so threads never pair a ms with another's text
_ms_prefix: list[tuple[int, str]] = [(-1, "")]


def new_event_id() -> str:
    """A UUIDv7 (RFC 9562) as a string: 48 bits of Unix milliseconds, version 7, 74 random bits.

    Time-ordered ids land at the right edge of the ``event_id`` unique index instead of at random
    pages, so inserts stay cheap as the table grows; and it costs less than ``str(uuid4())``.
    """
    ms = time.time_ns() // 1_000_000
    cached_ms, prefix = _ms_prefix[0]
    if cached_ms != ms:
        prefix = f"{ms >> 16:08x}-{ms & 0xFFFF:04x}-7"
        _ms_prefix[0] = (ms, prefix)
    r = _urandom(10).hex()  # 20 hex digits: 3 of rand_a, then 1 (2 bits) + 3 + 12 of rand_b
    return f"{prefix}{r[:3]}-{_VARIANT[r[3]]}{r[4:7]}-{r[7:19]}"


def _text(name: str, value: object, *, required: bool = False) -> str | None:
    if value is None:
        if required:
            raise ValidationError(name, value, "is required")
        return None
    if type(value) is not str:
        if name in _ID_FIELDS and isinstance(value, int) and not isinstance(value, bool):
            # The old service accepted integer ids (a database primary key); keep them, as text.
            if not -(10 ** FIELD_LIMITS[name]) < value < 10 ** FIELD_LIMITS[name]:
                raise ValidationError(name, value, f"is longer than {FIELD_LIMITS[name]} digits")
            value = str(value)
        else:
            raise ValidationError(name, value, f"must be a string, not {type(value).__name__}")
    if required and not value.strip():
        raise ValidationError(name, value, "must not be empty")
    if len(value) > FIELD_LIMITS[name]:
        raise ValidationError(name, value, f"is longer than {FIELD_LIMITS[name]} characters")
    if "\x00" in value:
        raise ValidationError(name, value, "contains a NUL character, which PostgreSQL cannot store")
    if not value.isascii():
        _check_utf8(name, value)
    return value


def _check_utf8(name: str, value: str) -> None:
    # A lone surrogate ("\ud800") is a valid Python str but not UTF-8: orjson would fail later, in
    # encode(), with a TypeError naming no field.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(name, value, "is not valid Unicode (lone surrogate)") from None


def _event_id(value: object) -> str:
    if value is None:
        return new_event_id()
    if isinstance(value, uuid.UUID):
        return str(value)
    if type(value) is not str:
        raise ValidationError("event_id", value, f"must be a UUID or a string, not {type(value).__name__}")
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ValidationError("event_id", value, "is not a UUID") from None


def _ip(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        value = str(value)
    if type(value) is not str:
        raise ValidationError("ip_address", value, f"must be a string, not {type(value).__name__}")
    return _parse_ip(value)


# The same addresses recur in a session's events; parsing one costs 5-10 us, a cache hit 0.1 us.
@functools.lru_cache(maxsize=4096)
def _parse_ip(value: str) -> str:
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise ValidationError("ip_address", value, "is not an IPv4 or IPv6 address") from None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        # Python accepts "fe80::1%eth0"; PostgreSQL's inet does not.
        raise ValidationError("ip_address", value, "has an IPv6 zone id, which inet cannot store")
    return str(address)


def _created_at(value: object, now: datetime) -> datetime:
    if value is None:
        return now
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise ValidationError("created_at", value, "is not an ISO 8601 timestamp") from None
    if not isinstance(value, datetime):
        raise ValidationError("created_at", value, f"must be a datetime, not {type(value).__name__}")
    # A naive datetime is taken as UTC: the old service stored datetime.utcnow().
    try:
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:  # year 1 or 9999 with an offset falls off the calendar
        raise ValidationError("created_at", value.isoformat(), _OUT_OF_RANGE) from None
    if value < _EARLIEST or value > now + _MAX_FUTURE:
        raise ValidationError("created_at", value.isoformat(), _OUT_OF_RANGE)
    return value


def _reject_unknown(fields: Mapping[str, Any]) -> None:
    name = sorted(fields.keys() - _KNOWN, key=str)[0]
    raise ValidationError(name, fields[name], "is not an event field")


def encode_fields(
    fields: Mapping[str, Any], *, max_metadata_bytes: int = 32 * 1024, now: datetime | None = None
) -> tuple[str, bytes]:
    """``(event.event_id, event.encode())`` of ``validate(fields)``, without building the Event.

    track()'s hot path: the same checks in the same order (so the same first error), the output
    byte for byte that of :meth:`Event.encode` (a test holds the two together), the metadata
    serialised once.
    """
    if not _KNOWN.issuperset(fields):
        _reject_unknown(fields)
    get = fields.get
    event_id = _event_id(get("event_id"))
    doc: dict[str, Any] = {
        "v": WIRE_VERSION,
        "event_id": event_id,
        "event_type": _text("event_type", get("event_type"), required=True),
    }
    for name, limit in _TEXT_BEFORE_METADATA:
        value = get(name)
        if value is not None:
            # The common case inline (a short ASCII str without NUL); anything else through _text.
            ok = type(value) is str and len(value) <= limit and value.isascii() and "\x00" not in value
            doc[name] = value if ok else _text(name, value)
    doc["event_metadata"] = orjson.Fragment(metadata_json(get("event_metadata"), max_metadata_bytes)[1])
    value = get("ip_address")
    if value is not None:
        doc["ip_address"] = _ip(value)
    for name, limit in _TEXT_AFTER_IP:
        value = get(name)
        if value is not None:
            ok = type(value) is str and len(value) <= limit and value.isascii() and "\x00" not in value
            doc[name] = value if ok else _text(name, value)
    value = get("created_at")
    current = now or _now()
    created_at = current if value is None else _created_at(value, current)
    # orjson refuses datetime subclasses (freezegun's FakeDatetime, pendulum): see Event.encode.
    doc["created_at"] = created_at if type(created_at) is datetime else created_at.isoformat()
    return event_id, orjson.dumps(doc)


def validate(
    fields: Mapping[str, Any], *, max_metadata_bytes: int = 32 * 1024, now: datetime | None = None
) -> Event:
    """Validate and normalise one event's fields; raise :class:`ValidationError` naming the field."""
    if not _KNOWN.issuperset(fields):
        _reject_unknown(fields)
    get = fields.get
    current = now or _now()
    return Event(
        event_id=_event_id(get("event_id")),
        event_type=_text("event_type", get("event_type"), required=True),  # type: ignore[arg-type]
        user_id=_text("user_id", get("user_id")),
        session_id=_text("session_id", get("session_id")),
        entity_type=_text("entity_type", get("entity_type")),
        entity_id=_text("entity_id", get("entity_id")),
        event_metadata=metadata(get("event_metadata"), max_metadata_bytes),
        ip_address=_ip(get("ip_address")),
        user_agent=_text("user_agent", get("user_agent")),
        referrer=_text("referrer", get("referrer")),
        created_at=_created_at(get("created_at"), current),
    )


def decode(raw: bytes | str, *, max_metadata_bytes: int = 32 * 1024) -> Event:
    """Parse and re-validate one queued event. Never anything but JSON: bytes that are not a JSON
    object of a known wire version raise :class:`ValidationError` (field ``payload``)."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValidationError("payload", raw, f"is not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ValidationError("payload", raw, "is not a JSON object")
    version = doc.pop("v", None)
    if type(version) is not int or version != WIRE_VERSION:  # true == 1 and 1.0 == 1 in Python
        raise ValidationError("v", version, f"unsupported wire version (expected {WIRE_VERSION})")
    if "event_id" not in doc:
        raise ValidationError("event_id", None, "is missing from a queued event")
    return validate(doc, max_metadata_bytes=max_metadata_bytes)
