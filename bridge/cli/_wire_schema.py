"""`analytics-bridge wire-schema`: the JSON Schema of wire format v1, for producers in other languages.

It is generated from the SDK's one event schema (:class:`analytics_sdk._event._schema.Wire`) and is
byte for byte the file shipped in the package, ``analytics_sdk/wire-schema-v1.json`` (a test holds
the two together). Regenerate the file after changing the schema::

    analytics-bridge wire-schema > analytics_sdk/wire-schema-v1.json
"""

from __future__ import annotations

import click

from analytics_sdk._event import wire_schema_json

__all__ = ["wire_schema"]


@click.command("wire-schema")
def wire_schema() -> None:
    """Print the JSON Schema of the queued events (wire format v1); docs/wire-format.md explains it."""
    click.echo(wire_schema_json().decode(), nl=False)
