"""Which failures of the drain are the data's fault and which are the network's.

The two call for opposite handling, so the classification lives in one place:

- a **data error** (SQLSTATE class 22 "data exception" or 23 "integrity constraint violation", or a
  value asyncpg could not encode) will fail again however often it is retried: the batch is bisected
  and the rows that fail alone are dead-lettered;
- a **connection error** (SQLSTATE class 08, the server shutting down or refusing connections, a
  dropped socket, a timeout, Redis unreachable) says nothing about the rows: the batch stays in flight,
  nothing is dead-lettered and the task is retried.

An **environment error** (a missing table or column, bad credentials, a missing database: SQLSTATE
classes 42, 28, 3D, 3F) is not the rows' fault either, but waiting a few seconds will not fix it: the
batch stays in flight, released for the next drain, and the task fails without retry until an operator
runs ``migrate`` or fixes the credentials.

Anything else (a bug) propagates; the batch waits in flight for the visibility timeout, and a batch
that keeps failing is eventually split and its culprit dead-lettered (no poison loop).
"""

from __future__ import annotations

import asyncpg
import asyncpg.exceptions._base as asyncpg_base
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = [
    "CONNECTION_ERRORS",
    "ConnectionLostError",
    "is_connection_error",
    "is_data_error",
    "is_environment_error",
    "is_transient_conflict",
    "sqlstate_of",
]


class ConnectionLostError(ConnectionError):
    """A connection-class failure that is not an ``OSError`` itself (e.g. asyncpg's "connection is
    closed" ``InterfaceError``), re-raised as one so Celery's ``autoretry_for`` catches it."""


#: Exception classes that mean "try again later": Celery's ``autoretry_for`` takes exactly these.
#: ``OSError`` covers refused/reset sockets and, since Python 3.11, ``TimeoutError``/``asyncio.TimeoutError``.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    RedisConnectionError,
    RedisTimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
)

# Operator intervention and resource exhaustion that end or refuse the session; class 08 is tested
# by prefix. 57014 (query_canceled, e.g. statement_timeout) is a timeout: retry.
_RETRYABLE_STATES = frozenset({"57P01", "57P02", "57P03", "57014", "53300", "53000"})
# 42 syntax error or access rule violation (undefined table/column), 28 invalid authorization,
# 3D invalid catalog (database) name, 3F invalid schema name.
_ENVIRONMENT_CLASSES = frozenset({"42", "28", "3D", "3F"})
# Two drains inserting overlapping event_ids (a redelivered batch) can deadlock on the unique index;
# running the transaction again resolves it.
_CONFLICT_STATES = frozenset({"40001", "40P01"})


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE of a server error, else ``None``."""
    state = getattr(exc, "sqlstate", None)
    return state if isinstance(state, str) else None


def is_data_error(exc: BaseException) -> bool:
    """True when the rows themselves are at fault: retrying the same rows cannot succeed."""
    if isinstance(exc, asyncpg.PostgresError):
        state = sqlstate_of(exc) or ""
        return state[:2] in ("22", "23")
    # asyncpg refusing to encode a value client-side (wrong type, a lone surrogate in a str).
    return isinstance(exc, asyncpg_base.DataError | UnicodeEncodeError)


def is_connection_error(exc: BaseException) -> bool:
    """True when the failure is the path to a server, not the data: leave the batch, retry later."""
    if isinstance(exc, asyncpg.PostgresError):
        state = sqlstate_of(exc) or ""
        return state.startswith("08") or state in _RETRYABLE_STATES
    if isinstance(exc, asyncpg.InterfaceError) and not isinstance(exc, asyncpg_base.DataError):
        # asyncpg says "connection is closed" / "connection was closed in the middle of operation"
        return "closed" in str(exc)
    return isinstance(exc, CONNECTION_ERRORS)


def is_environment_error(exc: BaseException) -> bool:
    """True when the database is not set up for us (schema, credentials, database, search path)."""
    return isinstance(exc, asyncpg.PostgresError) and (sqlstate_of(exc) or "")[:2] in _ENVIRONMENT_CLASSES


def is_transient_conflict(exc: BaseException) -> bool:
    """A deadlock or serialization failure: run the same transaction again."""
    return sqlstate_of(exc) in _CONFLICT_STATES
