"""track()'s validate+encode and the drain's decode+validate: the compiled schema first.

Both run one msgspec pass (``convert`` of the caller's fields, ``json.decode`` of queued bytes) and
then only constant-time checks msgspec cannot express: a blank event type, the event id's form, a
NUL anywhere (one search of the encoded bytes), the IP address (a cached parse), the created_at
window and the metadata size. Whatever the schema refuses or these checks doubt goes to the Python
rules (:func:`._rules.validate_slow`), which normalise it or raise the :class:`ValidationError` naming
the field: so the result, and the error, are those of the rules either way.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta

from .._exceptions import ValidationError
from ._ids import new_event_id
from ._rules import EARLIEST, MAX_FUTURE, now_utc, parse_ip, validate_slow
from ._schema import (
    DEFAULT_METADATA_BYTES,
    ENCODER,
    FIELDS,
    WIRE_VERSION,
    Event,
    EventType,
    FastMetadata,
    HeaderText,
    IdText,
    JsonDict,
    KindText,
    Wire,
)

__all__ = ["decode", "decode_many", "encode_fields", "validate"]

_encode = ENCODER.encode
_convert = msgspec.convert
_decode_wire = msgspec.json.Decoder(Wire).decode
_decode_metadata = msgspec.json.Decoder(FastMetadata).decode
_decode_any = msgspec.json.decode
_new = tuple.__new__
# Lower-case canonical only: anything else uuid.UUID() takes is normalised by the rules.
_is_uuid = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}").fullmatch
_NUL = b"\\u0000"  # how any JSON encoder writes U+0000: in any field, one search finds it


def _has_nul(data: bytes) -> bool:
    # A backslash first (memchr, ~50 ns for a page view): events with no escape at all are common.
    return data.find(b"\\") >= 0 and _NUL in data


# gc=False: made per track() and dropped at once; it can hold the caller's metadata, but nothing
# holds it, so it is never part of a cycle.
class _Fields(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, gc=False):
    """track()'s keyword arguments in their common form (any other form is the rules' business), and
    once filled in, the wire object itself: same fields, same order as :class:`Wire`."""

    v: int = 0  # not an event field (a caller's v is refused): set to WIRE_VERSION once converted
    event_id: str | None = None
    event_type: EventType | None = None  # "" and None: the rules say which error
    user_id: IdText | None = None
    session_id: IdText | None = None
    entity_type: KindText | None = None
    entity_id: IdText | None = None
    event_metadata: FastMetadata | str | None = None
    ip_address: str | None = None
    user_agent: HeaderText | None = None
    referrer: HeaderText | None = None
    created_at: Annotated[datetime, Meta(tz=True)] | None = None


def _when(value: datetime | None, now: datetime) -> datetime | None:
    """created_at in UTC and inside the window, or None for the rules to judge."""
    if value.tzinfo is not UTC:  # type: ignore[union-attr]
        try:
            value = value.astimezone(UTC)  # type: ignore[union-attr]
        except OverflowError:
            return None
    return value if EARLIEST <= value <= now + MAX_FUTURE else None  # type: ignore[operator]


def _fast(fields: Mapping[str, Any], limit: int, now: datetime | None) -> tuple[_Fields, bytes] | None:
    """The filled-in wire object and its bytes, or None when the rules must judge."""
    try:
        f = _convert(fields, _Fields)
    except Exception:  # refused, or a caller's object misbehaving under inspection: the rules say
        return None
    event_type, metadata, ip = f.event_type, f.event_metadata, f.ip_address
    if not event_type or event_type.isspace() or "v" in fields:  # v: not a caller's field
        return None
    if f.event_id is None:
        f.event_id = new_event_id()
    elif _is_uuid(f.event_id) is None:
        return None
    if metadata is None:
        f.event_metadata = metadata = {}
    elif type(metadata) is str:
        try:
            f.event_metadata = metadata = _decode_metadata(metadata)
        except msgspec.DecodeError:
            return None
    else:
        # The caller's own object is what gets written: convert() only checked it, reading a Decimal
        # as a float on the way, where the encoder writes the Decimal's own digits.
        f.event_metadata = metadata = fields["event_metadata"]
    if ip is not None:
        try:
            f.ip_address = parse_ip(ip)
        except ValidationError:
            return None
    if f.created_at is None:
        f.created_at = now or now_utc()
    elif (created_at := _when(f.created_at, now or now_utc())) is not None:
        f.created_at = created_at
    else:
        return None
    f.v = WIRE_VERSION
    try:
        raw = _encode(f)
    except (UnicodeEncodeError, TypeError):  # a lone surrogate, a str subclass: the rules convert
        return None
    if _has_nul(raw) or (len(raw) > limit and len(_encode(metadata)) > limit):
        return None
    return f, raw


def encode_fields(
    fields: Mapping[str, Any],
    *,
    max_metadata_bytes: int = DEFAULT_METADATA_BYTES,
    now: datetime | None = None,
) -> tuple[str, bytes]:
    """``(event.event_id, event.encode())`` of ``validate(fields)``: track()'s hot path."""
    fast = _fast(fields, max_metadata_bytes, now)
    if fast is not None:
        return fast[0].event_id, fast[1]  # type: ignore[return-value]  # filled in by _fast
    event = validate_slow(fields, max_metadata_bytes, now)
    return event.event_id, event.encode()


def validate(
    fields: Mapping[str, Any],
    *,
    max_metadata_bytes: int = DEFAULT_METADATA_BYTES,
    now: datetime | None = None,
) -> Event:
    """Validate and normalise one event's fields; raise :class:`ValidationError` naming the field."""
    fast = _fast(fields, max_metadata_bytes, now)
    if fast is None:
        return validate_slow(fields, max_metadata_bytes, now)
    w = fast[0]  # filled in: every value as Event holds it
    return _new(Event, (getattr(w, name) for name in FIELDS))


def decode(raw: bytes | str, *, max_metadata_bytes: int = DEFAULT_METADATA_BYTES) -> Event:
    """Parse and validate one queued event in one typed pass. Never anything but JSON: bytes that
    are not a JSON object of a known wire version raise :class:`ValidationError` (field ``payload``)."""
    [event] = decode_many((raw,), max_metadata_bytes=max_metadata_bytes)
    if isinstance(event, ValidationError):
        raise event
    return event


def decode_many(
    raws: Iterable[bytes | str], *, max_metadata_bytes: int = DEFAULT_METADATA_BYTES
) -> list[Event | ValidationError]:
    """:func:`decode` of each payload, in order; a payload that does not decode gives its error in
    its place (the drain dead-letters it and goes on). One clock read for the whole batch.

    The common path is inline in the loop (the drain runs it per event: a function call is ~5% of
    it); at any doubt, :func:`_decode_slow`: the Python rules, which normalise the event or name the
    field.
    """
    limit = max_metadata_bytes
    current = now_utc()
    upper = current + MAX_FUTURE
    out: list[Event | ValidationError] = []
    append = out.append
    for raw in raws:
        try:
            try:
                data: bytes = raw.encode() if type(raw) is str else raw  # type: ignore[assignment]
                w = _decode_wire(data)
            except (msgspec.DecodeError, UnicodeEncodeError):
                append(_decode_slow(raw, limit))
                continue
            meta, ip, created_at = w.event_metadata, w.ip_address, w.created_at
            # NUL as in _has_nul: a backslash first (memchr; the common event has none)
            if (
                w.event_type.isspace()
                or _is_uuid(w.event_id) is None
                or (data.find(b"\\") >= 0 and _NUL in data)
                or (meta is not UNSET and len(meta) > limit)
            ):
                append(_decode_slow(raw, limit))
                continue
            if meta is UNSET:
                metadata = JsonDict()
                metadata.json = b"{}"
            else:
                try:
                    metadata = JsonDict(_decode_metadata(meta))
                except msgspec.DecodeError:
                    append(_decode_slow(raw, limit))
                    continue
                metadata.json = meta  # a Raw: bytes-like, no copy
            if ip is not None:
                try:
                    ip = parse_ip(ip)
                except ValidationError:
                    append(_decode_slow(raw, limit))
                    continue
            if created_at is None:
                created_at = current
            elif (created_at.tzinfo is not UTC or not EARLIEST <= created_at <= upper) and (
                created_at := _when(created_at, current)
            ) is None:
                append(_decode_slow(raw, limit))
                continue
            # tuple.__new__: what Event(...) does, without its Python-level __new__
            append(
                _new(
                    Event,
                    (
                        w.event_id,
                        w.event_type,
                        w.user_id,
                        w.session_id,
                        w.entity_type,
                        w.entity_id,
                        metadata,
                        ip,
                        w.user_agent,
                        w.referrer,
                        created_at,
                    ),
                )
            )
        except ValidationError as exc:
            append(exc)
    return out


def _decode_slow(raw: bytes | str, limit: int) -> Event:
    try:
        doc = _decode_any(raw)
    except (msgspec.DecodeError, UnicodeEncodeError) as exc:
        raise ValidationError("payload", raw, f"is not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ValidationError("payload", raw, "is not a JSON object")
    version = doc.pop("v", None)
    if type(version) is not int or version != WIRE_VERSION:  # true == 1 and 1.0 == 1 in Python
        raise ValidationError("v", version, f"unsupported wire version (expected {WIRE_VERSION})")
    if "event_id" not in doc:
        raise ValidationError("event_id", None, "is missing from a queued event")
    return validate_slow(doc, limit, None)
