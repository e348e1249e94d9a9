"""Event metadata: the checks that make it storable as JSON (and jsonb), and its serialisation.

``event_metadata`` takes a dict (or any mapping) or a JSON string holding an object. What JSON cannot
hold is rejected with a :class:`ValidationError` naming the path to the bad value (NUL characters,
NaN and Infinity, non-string keys, objects that are not JSON-serialisable), as is metadata larger
than the configured limit. The common flat shape is checked inline first (track()'s hot path).

Integers must fit in 64 bits (what orjson writes, and what most JSON consumers read exactly), and
one rule holds for both forms: a dict holding 2**64 and a JSON string holding it are both rejected,
naming the path. (orjson would parse the string's integer to a float, silently rounded.)
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

import orjson

from ._exceptions import ValidationError

__all__ = ["metadata", "metadata_json"]

_JSON_SCALARS = (str, int, float, bool, type(None))
_isfinite = math.isfinite
# Outside [-2**63, 2**64): orjson cannot write it, and parses it to a float. Every such integer has 19
# digits or more: only a text with such a run of digits is parsed a second time, exactly.
_INT_MIN, _INT_END = -(2**63), 2**64
_LONG_DIGITS = re.compile(r"\d{19}")
_LONG_DIGITS_B = re.compile(rb"\d{19}")
_OUT_OF_RANGE = "is an integer outside the 64-bit range JSON can carry exactly"


def _plain_ok(item: object) -> bool:
    """True for a plain (exact-type) scalar that is valid: the common case, checked without recursing.

    Part of track()'s hot path (measured by ``nox -s bench``): recursing and formatting the path of
    every value cost several us per event. Anything else (subclasses, containers, a bad value)
    returns False and goes through :func:`_check_json`, which names the path.
    """
    kind = type(item)
    if kind is str:
        return "\x00" not in item  # type: ignore[operator]
    if kind is float:
        return math.isfinite(item)  # type: ignore[arg-type]
    return kind is int or kind is bool or item is None


def _check_json(value: object, path: str) -> None:
    """Reject what JSON (and jsonb) cannot hold; orjson would silently turn NaN into null."""
    # isinstance, not type(): a str subclass (StrEnum, Markup) can carry a NUL too, and orjson
    # serialises subclasses of str, int, dict and list as their base type.
    if isinstance(value, str):
        if "\x00" in value:
            raise ValidationError(path, value, "contains a NUL character, which jsonb cannot store")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValidationError(path, value, "is not a finite number (NaN and Infinity are not JSON)")
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValidationError(path, key, "has a key that is not a string")
            if "\x00" in key:
                raise ValidationError(path, key, "has a key with a NUL character")
            if not _plain_ok(item):  # only containers and bad values pay for the path string
                _check_json(item, f"{path}.{key}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            if not _plain_ok(item):
                _check_json(item, f"{path}[{index}]")
    elif not isinstance(value, _JSON_SCALARS):
        raise ValidationError(path, value, f"{type(value).__name__} is not JSON-serialisable")


def _check_int_range(value: object, path: str) -> None:
    """Name the first integer JSON cannot carry exactly (orjson only says that one exists)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if not _INT_MIN <= value < _INT_END:
            raise ValidationError(path, value, _OUT_OF_RANGE)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_int_range(item, f"{path}.{key}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_int_range(item, f"{path}[{index}]")


def _plain_object(obj: dict[Any, Any]) -> bool:
    """True when ``obj`` is flat-ish and clean: str keys without NUL, values plain scalars or lists of
    them. The common shape of metadata, checked inline without recursion or path strings; anything
    else goes through :func:`_check_json`, which finds and names the bad value."""
    for key, item in obj.items():
        if type(key) is not str or "\x00" in key:
            return False
        kind = type(item)
        if kind is str:
            if "\x00" in item:
                return False
        elif kind is float:
            if not _isfinite(item):
                return False
        elif kind is list:
            for element in item:
                if not _plain_ok(element):
                    return False
        elif not (kind is int or kind is bool or item is None):
            return False
    return True


def metadata_json(value: object, limit: int) -> tuple[dict[str, Any], bytes]:
    """The validated metadata and its JSON (serialised once: encode reuses it as a Fragment)."""
    if value is None:
        return {}, b"{}"
    if isinstance(value, str | bytes):
        text = value
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise ValidationError("event_metadata", text, f"is not valid JSON ({exc})") from None
        long_digits = _LONG_DIGITS.search if isinstance(text, str) else _LONG_DIGITS_B.search
        if long_digits(text):  # type: ignore[arg-type]
            # orjson read any integer out of range as a float: read the integers exactly (valid JSON
            # already, so the stdlib parser agrees on everything else), and check them below.
            value = json.loads(text)
    if type(value) is not dict:
        if not isinstance(value, Mapping):
            raise ValidationError("event_metadata", value, "must be a JSON object (a dict)")
        value = dict(value)
    if not _plain_object(value):
        try:
            _check_json(value, "event_metadata")
        except RecursionError:
            reason = "is nested too deeply (or contains itself)"
            raise ValidationError("event_metadata", value, reason) from None
    try:
        dumped = orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError) as exc:
        _check_int_range(value, "event_metadata")
        raise ValidationError("event_metadata", value, f"is not JSON-serialisable ({exc})") from None
    if len(dumped) > limit:
        reason = f"is {len(dumped)} bytes as JSON, over the limit of {limit}"
        raise ValidationError("event_metadata", value, reason)
    return value, dumped


def metadata(value: object, limit: int) -> dict[str, Any]:
    return metadata_json(value, limit)[0]
