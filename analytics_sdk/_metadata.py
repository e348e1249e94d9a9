"""Event metadata off the compiled path: conversion of the types the old service accepted, and the
checks that name the path to a bad value.

The common shapes are checked in compiled code (:data:`analytics_sdk._event._schema.FastMetadata`);
only metadata that does not fit them comes here. ``event_metadata`` takes a dict (or any mapping) or
a JSON string holding an object. Converted, deterministically: datetime, date and time to ISO 8601
(``isoformat()``), UUID to its canonical string, Decimal kept exact (written as a JSON number with
its own digits), an Enum member to its value, set and frozenset to a list (sorted when its items
sort, else in iteration order). Rejected with a :class:`ValidationError` naming the path: NUL
characters, lone surrogates, NaN and Infinity, integers outside [-2**63, 2**64), non-string keys,
any other type, and metadata larger than the configured limit as compact JSON.
"""

from __future__ import annotations

import enum
import math
import uuid
from collections.abc import Mapping
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any

import msgspec

from ._event._schema import ENCODER
from ._exceptions import ValidationError

__all__ = ["convert_metadata", "metadata_json"]

_INT_MIN, _INT_END = -(2**63), 2**64
_OUT_OF_RANGE = "is an integer outside the 64-bit range JSON can carry exactly"
_NOT_FINITE = "is not a finite number (NaN and Infinity are not JSON)"


def _text(value: str, path: str, what: str = "contains") -> None:
    if "\x00" in value:
        raise ValidationError(path, value, f"{what} a NUL character, which jsonb cannot store")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValidationError(path, value, "is not valid Unicode (lone surrogate)") from None


def _key(key: object, path: str) -> str:
    if not isinstance(key, str):
        raise ValidationError(path, key, "has a key that is not a string")
    if "\x00" in key:
        raise ValidationError(path, key, "has a key with a NUL character")
    _text(key, path)
    return key


def convert_metadata(value: object, path: str) -> Any:
    """A JSON-ready copy of ``value``: the conversions above, or a ValidationError naming ``path``."""
    if isinstance(value, enum.Enum):  # before str and int: StrEnum and IntEnum members are both
        return convert_metadata(value.value, path)
    if isinstance(value, str):
        _text(value, path)
        return str.__str__(value)  # a plain str: a subclass (markupsafe's Markup) has its text
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        if not _INT_MIN <= value < _INT_END:
            raise ValidationError(path, value, _OUT_OF_RANGE)
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValidationError(path, value, _NOT_FINITE)
        return float(value)
    if isinstance(value, dict):
        return {_key(key, path): convert_metadata(item, f"{path}.{key}") for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [convert_metadata(item, f"{path}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, set | frozenset):
        items = [convert_metadata(item, f"{path}[{index}]") for index, item in enumerate(value)]
        try:
            return sorted(items)
        except TypeError:  # mixed kinds (str and int): as iterated
            return items
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Decimal):
        # Kept a Decimal: the encoder writes its exact digits. Beyond float range no JSON reader
        # we know of (the drain's included) would take it back.
        if not value.is_finite() or not math.isfinite(float(value)):
            raise ValidationError(path, value, _NOT_FINITE)
        return value
    raise ValidationError(path, value, f"{type(value).__name__} is not JSON-serialisable")


def metadata_json(value: object, limit: int) -> tuple[dict[str, Any], bytes]:
    """The validated, converted metadata and its compact JSON."""
    if value is None:
        return {}, b"{}"
    if isinstance(value, str | bytes):
        text = value
        try:
            value = msgspec.json.decode(text)  # integers of any size exact, NaN refused
        except msgspec.DecodeError as exc:
            raise ValidationError("event_metadata", text, f"is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        if not isinstance(value, Mapping):
            raise ValidationError("event_metadata", value, "must be a JSON object (a dict)")
        value = dict(value)
    try:
        converted: dict[str, Any] = convert_metadata(value, "event_metadata")
    except RecursionError:
        reason = "is nested too deeply (or contains itself)"
        raise ValidationError("event_metadata", value, reason) from None
    dumped = ENCODER.encode(converted)
    if len(dumped) > limit:
        reason = f"is {len(dumped)} bytes as JSON, over the limit of {limit}"
        raise ValidationError("event_metadata", value, reason)
    return converted, dumped
