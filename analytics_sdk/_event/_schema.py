"""The one event schema: wire format v1 as a msgspec Struct, the field limits, and :class:`Event`.

:class:`Wire` is what is queued (one JSON object; ``None`` fields omitted) and what the drain decodes
in one typed pass; its JSON Schema (:func:`wire_schema`) is the published contract for producers in
other languages (``analytics_sdk/wire-schema-v1.json``, ``analytics-bridge wire-schema``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, NamedTuple

import msgspec
from msgspec import UNSET, Meta, Raw, UnsetType

__all__ = [
    "DEFAULT_METADATA_BYTES",
    "ENCODER",
    "FIELDS",
    "FIELD_LIMITS",
    "TRUNCATED",
    "WIRE_VERSION",
    "Event",
    "EventType",
    "FastMetadata",
    "HeaderText",
    "IdText",
    "JsonDict",
    "KindText",
    "Wire",
    "metadata_text",
    "wire_schema",
    "wire_schema_json",
]

WIRE_VERSION = 1
DEFAULT_METADATA_BYTES = 32 * 1024

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
#: Header junk must not lose an event: these are cut to their limit instead of refused.
TRUNCATED = frozenset({"user_agent", "referrer"})
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

# Metadata checked in compiled code: JSON scalars (64-bit signed integers, finite floats) in objects
# and arrays nested up to four deep. Anything else (deeper, 2**63..2**64, a datetime...) is not an
# error here: it takes the Python path in _metadata, which converts or names the bad value.
_F64 = 1.7976931348623157e308
_Leaf = (
    str
    | Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]
    | Annotated[float, Meta(ge=-_F64, le=_F64)]
    | bool
    | None
)
_V1 = _Leaf | list[_Leaf] | dict[str, _Leaf]
_V2 = _Leaf | list[_V1] | dict[str, _V1]
_V3 = _Leaf | list[_V2] | dict[str, _V2]
FastMetadata = dict[str, _V3]


# The text fields' limits as constraints, one type per limit (user_id, session_id and entity_id share
# theirs; a test holds these and FIELD_LIMITS together).
IdText = Annotated[
    str, Meta(max_length=FIELD_LIMITS["user_id"], description="Integers are accepted and kept as text.")
]
KindText = Annotated[str, Meta(max_length=FIELD_LIMITS["entity_type"], description="Free text.")]
HeaderText = Annotated[
    str,
    Meta(
        max_length=FIELD_LIMITS["user_agent"],
        description="Longer values are truncated to the limit, not refused.",
    ),
]
EventType = Annotated[
    str, Meta(min_length=1, max_length=FIELD_LIMITS["event_type"], description="Not blank.")
]


# gc=False: a Wire never takes part in a reference cycle (text, datetime, Raw), so the cyclic GC need
# not track the one the drain decodes per event (fewer collections while a batch is decoded).
class Wire(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, gc=False):
    """Wire format v1: one queued event. Field order is the encoding order."""

    v: Annotated[Literal[1], Meta(description="Wire format version: always 1.")]
    event_id: Annotated[
        str,
        Meta(
            min_length=36,
            max_length=36,
            description="A UUID in canonical text form (UUIDv7 recommended); rows are deduplicated on it.",
            extra_json_schema={"format": "uuid"},
        ),
    ]
    event_type: EventType
    user_id: IdText | None = None
    session_id: IdText | None = None
    entity_type: KindText | None = None
    entity_id: IdText | None = None
    event_metadata: (
        Annotated[
            Raw,
            Meta(
                description="A JSON object (stored as jsonb); integers within 64 bits; at most "
                "ANALYTICS_MAX_METADATA_BYTES as compact JSON. Absent means {}.",
                extra_json_schema={"type": "object"},
            ),
        ]
        | UnsetType
    ) = UNSET
    ip_address: (
        Annotated[str, Meta(max_length=64, description="An IPv4 or IPv6 address, no zone id.")] | None
    ) = None
    user_agent: HeaderText | None = None
    referrer: HeaderText | None = None
    created_at: (
        Annotated[
            datetime,
            Meta(
                tz=True,
                description="RFC 3339 with an offset; from 2000 to a day ahead. Absent: the drain's time.",
            ),
        ]
        | None
    ) = None


# decimal_format="number": a Decimal in metadata is written with its exact digits, never a float.
# order="deterministic": a set is written sorted (one whose items do not sort raises TypeError, and
# the Python rules write it as iterated), and so are object keys, on every path alike.
ENCODER = msgspec.json.Encoder(decimal_format="number", order="deterministic")
_encode = ENCODER.encode


class JsonDict(dict[str, Any]):
    """Metadata decoded from the wire, carrying the exact JSON it came from (``json``): the drain
    stores that text as is, so jsonb gets every digit and nothing is serialised twice."""

    __slots__ = ("json",)
    json: bytes | Raw


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
        metadata = self.event_metadata
        return _encode(
            Wire(
                1,
                self.event_id,
                self.event_type,
                self.user_id,
                self.session_id,
                self.entity_type,
                self.entity_id,
                _raw(metadata) if type(metadata) is JsonDict else metadata,  # type: ignore[arg-type]
                self.ip_address,
                self.user_agent,
                self.referrer,
                self.created_at,
            )
        )


def _raw(metadata: JsonDict) -> Raw:
    text = metadata.json
    return text if type(text) is Raw else Raw(text)


def metadata_text(event: Event) -> str:
    """The event's metadata as JSON text for the jsonb column: the wire's own text when the event came
    from the wire (every digit as sent, nothing serialised twice), else its compact JSON."""
    metadata = event.event_metadata
    return str(metadata.json if type(metadata) is JsonDict else _encode(metadata), "utf-8")


def wire_schema() -> dict[str, Any]:
    """The JSON Schema (2020-12) of wire format v1, generated from :class:`Wire`."""
    schema: dict[str, Any] = msgspec.json.schema(Wire)
    body = schema["$defs"]["Wire"]
    body["title"] = "Analytics event, wire format v1"
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "durable-analytics/wire-schema-v1.json",
        **body,
    }


def wire_schema_json() -> bytes:
    """:func:`wire_schema` as the shipped file holds it: indented JSON and a final newline."""
    # msgspec.json.encode, not ENCODER: keep the properties in wire order, not sorted
    return msgspec.json.format(msgspec.json.encode(wire_schema()), indent=2) + b"\n"
