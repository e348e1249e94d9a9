"""Event: validation, normalisation and the JSON wire format, on one msgspec schema.

``track()`` validates and encodes with :func:`encode_fields`; the drain decodes and validates queued
bytes with :func:`decode` (they may come from older clients or other languages). Every rejection is a
:class:`~analytics_sdk.ValidationError` naming the field. Wire format: one JSON object with
``"v": WIRE_VERSION``; ``None`` fields are omitted to keep queued events small. Its JSON Schema is
:func:`wire_schema`, shipped as ``analytics_sdk/wire-schema-v1.json``.

- :mod:`._schema`: the :class:`Wire` Struct, field limits, :class:`Event`;
- :mod:`._codec`: the compiled common path of both sides;
- :mod:`._rules`: the Python rules, for the rare inputs the schema does not take as they are.
"""

from __future__ import annotations

from ._codec import decode, decode_many, encode_fields, validate  # after _schema: _metadata needs it
from ._ids import new_event_id
from ._schema import FIELD_LIMITS, FIELDS, WIRE_VERSION, Event, metadata_text, wire_schema, wire_schema_json

__all__ = [
    "FIELDS",
    "FIELD_LIMITS",
    "WIRE_VERSION",
    "Event",
    "decode",
    "decode_many",
    "encode_fields",
    "metadata_text",
    "new_event_id",
    "validate",
    "wire_schema",
    "wire_schema_json",
]
