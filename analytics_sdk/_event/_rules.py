"""The rules in Python: the rare path, and the reference for what every error says.

:mod:`._codec` tries the compiled schema first; an event it does not take as is (a bad field, an
integer id, a UUID object, a naive or non-UTC datetime, an over-long user agent...) comes here, where
each field is checked in the order below and the first bad one is named. Normalisation happens here
too, so the compiled path only ever accepts input that these rules leave unchanged.
"""

from __future__ import annotations

import functools
import ipaddress
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from .._exceptions import ValidationError
from .._metadata import metadata_json
from ._ids import new_event_id
from ._schema import FIELD_LIMITS, FIELDS, TRUNCATED, Event

__all__ = ["EARLIEST", "MAX_FUTURE", "now_utc", "parse_ip", "validate_slow"]

_ID_FIELDS = frozenset({"user_id", "session_id", "entity_id"})
_KNOWN = frozenset(FIELDS)
#: created_at outside [EARLIEST, now + MAX_FUTURE] is a bug upstream (epoch 0, year 9999, ms taken for
#: s); rejecting it keeps the (event_type, created_at) index meaningful.
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
MAX_FUTURE = timedelta(days=1)
_OUT_OF_RANGE = "is before 2000 or more than a day ahead"
now_utc = functools.partial(datetime.now, UTC)


def _text(name: str, value: object, *, required: bool = False) -> str | None:
    if value is None:
        if required:
            raise ValidationError(name, value, "is required")
        return None
    limit = FIELD_LIMITS[name]
    if type(value) is not str:
        if name in _ID_FIELDS and isinstance(value, int) and not isinstance(value, bool):
            # The old service accepted integer ids (a database primary key); keep them, as text.
            if not -(10**limit) < value < 10**limit:
                raise ValidationError(name, value, f"is longer than {limit} digits")
            value = str(value)
        elif isinstance(value, str):  # a StrEnum member, markupsafe's Markup: its text
            value = str.__str__(value)
        else:
            raise ValidationError(name, value, f"must be a string, not {type(value).__name__}")
    if required and not value.strip():
        raise ValidationError(name, value, "must not be empty")
    if "\x00" in value:
        raise ValidationError(name, value, "contains a NUL character, which PostgreSQL cannot store")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # "\ud800" is a valid str but not UTF-8
            raise ValidationError(name, value, "is not valid Unicode (lone surrogate)") from None
    if len(value) > limit:
        if name in TRUNCATED:  # header junk must not lose the event
            return value[:limit]
        raise ValidationError(name, value, f"is longer than {limit} characters")
    return value


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
    return parse_ip(value)


# The same addresses recur in a session's events; parsing one costs 5-10 us, a cache hit 0.1 us.
@functools.lru_cache(maxsize=4096)
def parse_ip(value: str) -> str:
    """``value`` as PostgreSQL's inet stores it (normalised), or a ValidationError."""
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
    if value < EARLIEST or value > now + MAX_FUTURE:
        raise ValidationError("created_at", value.isoformat(), _OUT_OF_RANGE)
    if type(value) is not datetime:  # freezegun's FakeDatetime, pendulum: a plain datetime
        value = datetime.combine(value.date(), value.timetz())
    return value


def validate_slow(fields: Mapping[str, Any], limit: int, now: datetime | None) -> Event:
    """Every rule, field by field in wire order: the first bad field is the one named."""
    if not _KNOWN.issuperset(fields):
        name = sorted(fields.keys() - _KNOWN, key=str)[0]
        raise ValidationError(name, fields[name], "is not an event field")
    get = fields.get
    return Event(
        event_id=_event_id(get("event_id")),
        event_type=_text("event_type", get("event_type"), required=True),  # type: ignore[arg-type]
        user_id=_text("user_id", get("user_id")),
        session_id=_text("session_id", get("session_id")),
        entity_type=_text("entity_type", get("entity_type")),
        entity_id=_text("entity_id", get("entity_id")),
        event_metadata=metadata_json(get("event_metadata"), limit)[0],
        ip_address=_ip(get("ip_address")),
        user_agent=_text("user_agent", get("user_agent")),
        referrer=_text("referrer", get("referrer")),
        created_at=_created_at(get("created_at"), now or now_utc()),
    )
