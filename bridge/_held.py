"""Data errors that are the database's, not the rows': when a refused batch is held, not dead-lettered.

SQLSTATE classes 22/23 usually mean a bad row, and the drain bisects the batch to set that row aside.
But a data error can be the environment's, and then dead-lettering would throw good events away one
by one (an identity sequence behind restored rows burns one id, and one good event, per bisection
step). The rule: a row is at fault only when it fails alone while its neighbours commit.

- Held at once, without bisecting: a unique violation on any constraint but (event_id, created_at)'s,
  the parent's or a partition's copy (ON CONFLICT already absorbs that one, so the rows cannot cause
  another: the identity sequence is behind), and
  a NOT NULL on a column the bridge never writes (a migration added it without a default).
- Held before bisecting: a copy of the newest stored row (rolled back) is refused with the same
  SQLSTATE and constraint as the batch: the table refuses everything, bisection would only confirm it.
- Held after bisecting: every row of the batch failed, with the same SQLSTATE and constraint (a
  CHECK or foreign key a migration added, a database encoding that cannot hold the text).
- A batch of one row has no neighbour, so it gets one: a copy of the newest stored row, rolled back
  (:func:`bridge.store.insert_copy_of_newest`). The copy goes in: the row is at fault. It is refused
  too, or the table is empty: held. A genuinely bad lone row is therefore dead-lettered by the
  first drain that has a stored row to compare it with, and a table that refuses everything never
  dead-letters a low-traffic queue one event at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from ._errors import HeldByEnvironment, is_data_error, is_event_key, is_primary_key, sqlstate_of
from .schema import TABLE_NAME
from .store import COLUMNS, insert_copy_of_newest

__all__ = ["held_at_once", "held_before_bisecting", "held_by_environment"]

# 22P05 untranslatable character, 22021 character not in repertoire: what a non-UTF8 database says.
_ENCODING_STATES = frozenset({"22P05", "22021"})


def _reason(exc: BaseException) -> tuple[str | None, str | None]:
    """(SQLSTATE, constraint or column): two failures with equal reasons failed the same way."""
    name = getattr(exc, "constraint_name", None) or getattr(exc, "column_name", None)
    return sqlstate_of(exc), name if isinstance(name, str) else None


def _message(exc: BaseException) -> str:
    """The server's one-line message, without its DETAIL (a multi-line dump of the failing row)."""
    message = getattr(exc, "message", None)
    return (message if isinstance(message, str) and message else str(exc)).replace("\n", " ")


def _held_for(exc: BaseException, why: str) -> HeldByEnvironment:
    state, constraint = _reason(exc)
    what = f"constraint {constraint}" if constraint else f"SQLSTATE {state}"
    todo = (
        "the server encoding cannot hold these characters: the bridge needs a UTF8 database"
        if state in _ENCODING_STATES
        else f"the table gained {what} after the bridge's schema (a later migration?): fix the "
        "constraint or the producers, then the held events land"
    )
    return HeldByEnvironment(
        f"PostgreSQL refused the rows (SQLSTATE {state}: {_message(exc)}) and {why}: {todo}",
        sqlstate=state,
        constraint=constraint,
    )


def _key_name(name: str | None) -> str | None:
    """A partition's copy of the primary key, named with the table's own key (what a DBA looks up)."""
    if is_primary_key(name) and name != f"{TABLE_NAME}_pkey":
        return f"{name}, the primary key {TABLE_NAME}_pkey of a partition"
    return name


def held_at_once(exc: BaseException) -> HeldByEnvironment | None:
    """A data error that no row can cause: hold the batch without bisecting it."""
    state, name = _reason(exc)
    if state == "23505" and not is_event_key(name):
        if is_primary_key(name):
            todo = (
                "the identity sequence is behind the rows (a restored dump, logical replication, a "
                "blue/green move carry no sequences): SELECT setval(pg_get_serial_sequence("
                f"'{TABLE_NAME}','id'), (SELECT max(id) FROM {TABLE_NAME}))"
            )
        else:
            todo = f"a unique constraint other than event_id's ({name}) refuses the rows: drop or fix it"
        return HeldByEnvironment(
            f"PostgreSQL refused the rows (SQLSTATE 23505 on {_key_name(name)}: {_message(exc)}): {todo}",
            sqlstate=state,
            constraint=name,
        )
    if state == "23502" and name is not None and name not in COLUMNS:
        return HeldByEnvironment(
            f"PostgreSQL refused the rows (SQLSTATE 23502: {_message(exc)}): column {name} is NOT NULL "
            "without a default and the bridge does not write it (a later migration?): give it a default",
            sqlstate=state,
            constraint=name,
        )
    return None


async def _copy_refused(conn: asyncpg.Connection[Any]) -> tuple[str | None, str | None] | bool:
    """Try a copy of the newest stored row: its refusal's reason, or True (taken) / False (empty)."""
    try:
        return await insert_copy_of_newest(conn) > 0
    except asyncpg.PostgresError as probe:
        if not is_data_error(probe):
            raise  # the database itself is failing now: the caller holds the batch for that
        return _reason(probe)


async def held_before_bisecting(
    conn: asyncpg.Connection[Any], exc: BaseException
) -> HeldByEnvironment | None:
    """A batch failed with a data error: if a copy of a stored row is refused the same way, the table
    refuses everything, and bisecting (2n - 1 failed transactions) would only confirm it."""
    refused = await _copy_refused(conn)
    if refused is True or refused is False or refused != _reason(exc):
        return None
    return _held_for(exc, "a copy of the newest stored row is refused the same way")


async def held_by_environment(
    conn: asyncpg.Connection[Any], rows: int, failures: Sequence[tuple[int, BaseException]]
) -> HeldByEnvironment | None:
    """After a bisection of ``rows`` rows: the environment's refusal behind ``failures`` (the rows
    that failed alone, by index), or None when those rows are at fault and go to dead letters."""
    reasons = {_reason(exc) for _, exc in failures}
    if len(failures) < rows or len(reasons) != 1:
        return None  # some rows committed next to them: the failed ones are at fault
    state, _ = next(iter(reasons))
    if state is None:  # refused client-side by asyncpg's encoders: the database was not asked
        return None
    first = failures[0][1]
    if rows > 1:
        return _held_for(first, f"every one of the {rows} rows of the batch fails")
    refused = await _copy_refused(conn)
    if refused is True:
        return None  # a stored row's copy goes in where this row does not: the row is at fault
    if refused is False:
        return _held_for(first, "the table is empty, so no stored row can show otherwise")
    # Even a row the table already holds is refused now: the table, not this row.
    return _held_for(first, f"a copy of the newest stored row is refused too ({refused[0]} {refused[1]})")
