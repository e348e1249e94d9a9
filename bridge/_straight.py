"""The drain's fast path for fresh claims: COPY the rows straight into the events table.

:func:`bridge.store.insert_events` COPYs into a staging table and moves the rows with ``INSERT ...
SELECT ... ON CONFLICT DO NOTHING``: PostgreSQL handles every row twice, and that second pass is most of
the distance between the drain and a raw COPY. Freshly claimed events are almost never in the table
yet (only a take-over of a batch whose rows committed before its drain died brings them back), so the
drain first COPYs them straight into the table, in one transaction; PostgreSQL checks the unique
index on the way in. Whatever that COPY cannot take (a redelivered event, a row PostgreSQL refuses, a
deadlock, a missing partition) rolls the transaction back and the same rows go through
:func:`~bridge.store.insert_events` instead, which dead-letters, bisects, counts duplicates and holds
batches exactly as it always did: the fast path never decides anything, it only succeeds or steps aside.

The values are those :func:`bridge.store.record` builds for the staging table (``event_metadata`` as
JSON text, ``ip_address`` as the canonical text the decoder validated); asyncpg sends them in the
columns' binary formats, and PostgreSQL parses the JSON as the staging path's ``::jsonb`` cast would.
The address goes as its packed bytes: asyncpg's inet encoder parses a string with :mod:`ipaddress`
(~3 us a row, a third of the drain's own CPU in a profile), bytes in a tenth of that, and the same
addresses recur in a session's events, so the text -> bytes step is cached.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg

from analytics_sdk._event import Event

from . import _session
from ._errors import is_connection_error
from .schema import TABLE_NAME
from .store import COLUMNS, InsertResult, record

__all__ = ["copy_straight"]

logger = logging.getLogger(__name__)


async def copy_straight(
    conn: asyncpg.Connection[Any],
    events: Sequence[Event],
    *,
    before_commit: Callable[[], None] | None = None,
) -> InsertResult | None:
    """COPY ``events`` into the table in one transaction and commit; ``None`` (rolled back, nothing
    written) when PostgreSQL refused any row, so the caller runs the staging path. Connection-class
    errors, and whatever ``before_commit`` raises, propagate as from the staging path."""
    if not events or conn.is_in_transaction():
        return None
    try:
        records = [_row(e) for e in events]
    except ValueError as exc:  # an address Python cannot read: PostgreSQL judges it on the staging path
        logger.debug("straight COPY stepped aside: %s", exc)
        return None
    # As on the staging path: the schema is current (else NotMigrated, held) and every row's
    # partition exists, made outside the rows' transaction so a refused COPY never rolls it back.
    await _session.prepare(conn, _session.session(conn), [e.created_at for e in events])
    transaction = conn.transaction()
    await transaction.start()
    try:
        await conn.copy_records_to_table(TABLE_NAME, records=records, columns=COLUMNS)
    except BaseException as exc:
        with contextlib.suppress(Exception):  # a broken session shows itself to what comes next
            await transaction.rollback()
        if not isinstance(exc, Exception) or is_connection_error(exc):
            raise
        logger.debug("straight COPY of %s rows stepped aside: %s", len(records), exc)
        return None
    try:
        if before_commit is not None:
            before_commit()
    except BaseException:
        with contextlib.suppress(Exception):
            await transaction.rollback()
        raise
    await transaction.commit()
    return InsertResult(len(records), 0)


_IP = COLUMNS.index("ip_address")


def _row(event: Event) -> tuple[Any, ...]:
    row = record(event)
    address = row[_IP]
    if address is None:
        return row
    return (*row[:_IP], _packed(address), *row[_IP + 1 :])


@functools.lru_cache(maxsize=4096)
def _packed(address: str) -> bytes:
    return ipaddress.ip_address(address).packed
