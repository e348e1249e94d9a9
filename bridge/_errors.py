"""Which failures of the drain are the data's fault, which the network's, which the environment's.

They call for opposite handling, so the classification lives in one place:

- a **data error** (SQLSTATE class 22 "data exception" or 23 "integrity constraint violation", or a
  value asyncpg could not encode) is a property of one row: the batch is bisected and a row that fails
  alone while its neighbours commit is dead-lettered (:mod:`bridge._writer`; when *every* row fails
  the same way it is the environment after all, see :class:`HeldByEnvironment`);
- a **connection error** (SQLSTATE class 08, the server shutting down or refusing connections, a
  dropped socket, a timeout, Redis unreachable) and a **transient** server state (57014 a statement
  timeout or cancel, 55P03 a lock timeout, 53300 too many connections, 57P0x, 40001/40P01 after
  their re-runs) say nothing about the rows: the batch is released, nothing is dead-lettered and the
  task is retried by Celery (3 times, backoff), then by the next beat tick;
- every **other server-reported error** is the **environment's**: the database is read-only (25006:
  a replica after a failover, a managed database at its storage limit), full (53100), out of memory
  (53200), broken (58030, XX000), not migrated (42P01), not ours to write (42501), the credentials
  are wrong (28), the database is missing (3D000)... Waiting seconds will not fix it, so the task is
  not retried; the batch is released for the next beat tick, nothing is dead-lettered, nothing counts
  towards the poison limit, and one ERROR line names the SQLSTATE and what to do (:func:`advice`).
  So is "no partition of relation ... found for row" (23514 without a constraint): the drain creates
  a row's partition before inserting it, so a row still without one is the environment's doing.

Anything else (a bug in this code) propagates; the batch waits for the visibility timeout.
"""

from __future__ import annotations

import asyncpg
import asyncpg.exceptions._base as asyncpg_base
from redis.exceptions import AuthenticationError as RedisAuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = [
    "CONNECTION_ERRORS",
    "EVENT_ID_CONSTRAINT",
    "ConnectionLostError",
    "HeldByEnvironment",
    "NotMigrated",
    "RedisTooOld",
    "advice",
    "is_configuration_error",
    "is_connection_error",
    "is_data_error",
    "is_environment_error",
    "is_event_key",
    "is_missing_partition",
    "is_primary_key",
    "is_transient_conflict",
    "mark_reported",
    "postgres_error_of",
    "sqlstate_of",
    "was_reported",
]

#: The arbiter of ON CONFLICT (event_id, created_at): the one unique violation that is about the event
#: itself. Each partition has its own copy of the index, named ``<partition>_event_id_created_at_key``
#: (:func:`is_event_key`).
EVENT_ID_CONSTRAINT = "uq_analytics_events_event_id_created_at"
_TABLE = "analytics_events"


class ConnectionLostError(ConnectionError):
    """A connection-class failure that is not an ``OSError`` itself (e.g. asyncpg's "connection is
    closed" ``InterfaceError``), re-raised as one so Celery's ``autoretry_for`` catches it."""


class HeldByEnvironment(Exception):
    """Rows refused for a reason that is the database's, not theirs (a sequence behind the rows, a
    constraint every row violates): the batch is held in flight, nothing is dead-lettered.

    ``str()`` is the operator's advice; the PostgreSQL error it stands for is ``__cause__``. The
    defaults let it be rebuilt from its args alone, as the prefork pool does to report it."""

    def __init__(self, message: str, *, sqlstate: str | None = None, constraint: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.constraint = constraint


class NotMigrated(HeldByEnvironment):
    """The events table (or a column of it) is missing, or older than this code: run
    ``analytics-bridge migrate``. An environment refusal: the drain holds its events in flight."""


class RedisTooOld(Exception):
    """The Redis server cannot run the drain's scripts (< 7.0); the message names both versions."""


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

# Transient: gone in seconds, so worth Celery's quick retries. Class 08 is tested by prefix.
# 57P01-03 the server stopping or starting, 53300 too many connections, 53000 insufficient resources,
# 57014 a statement timeout or cancel, 55P03 a lock timeout (a migration or VACUUM FULL holding the
# table). A state that lasts (read-only, disk full, out of memory) is not here: retrying within a
# minute only repeats the ERROR, and the next beat tick tries again anyway.
_RETRYABLE_STATES = frozenset({"57P01", "57P02", "57P03", "57014", "53300", "53000", "55P03"})
# Configuration: the operator must change a setting or run migrate (the CLI exits 2 for these).
# 42 missing table/column or privilege, 28 credentials, 3D missing database, 3F missing schema.
_CONFIGURATION_CLASSES = frozenset({"42", "28", "3D", "3F"})
# Two drains inserting overlapping event_ids (a redelivered batch) can deadlock on the unique index;
# running the transaction again resolves it.
_CONFLICT_STATES = frozenset({"40001", "40P01"})
_DATA_CLASSES = ("22", "23")

_REPORTED_NOTE = "analytics-bridge: reported: "


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE of a server error, else ``None``."""
    state = getattr(exc, "sqlstate", None)
    return state if isinstance(state, str) else None


def postgres_error_of(exc: BaseException) -> asyncpg.PostgresError | None:
    """The asyncpg server error behind ``exc`` (itself, or down its chain as SQLAlchemy wraps it)."""
    seen: BaseException | None = exc
    for _ in range(6):
        if seen is None:
            return None
        if isinstance(seen, asyncpg.PostgresError):
            return seen
        orig = getattr(seen, "orig", None)
        seen = seen.__cause__ or (orig if isinstance(orig, BaseException) else None)
    return None


def is_event_key(name: str | None) -> bool:
    """The unique key (event_id, created_at): the parent's constraint or a partition's copy of it."""
    return name == EVENT_ID_CONSTRAINT or (
        name is not None and name.startswith(f"{_TABLE}_") and name.endswith("_event_id_created_at_key")
    )


def is_primary_key(name: str | None) -> bool:
    """The primary key (id, created_at): ``analytics_events_pkey`` or a partition's ``<partition>_pkey``."""
    return name is not None and name.startswith(_TABLE) and name.endswith("_pkey")


def is_missing_partition(exc: BaseException) -> bool:
    """PostgreSQL found no partition for a row's created_at (23514, like a CHECK, but no constraint):
    the drain creates partitions before it inserts, so this is the environment's (a partition
    dropped under a running drain, no privilege to create one), never the row's."""
    message = getattr(exc, "message", None) or ""
    return (
        sqlstate_of(exc) == "23514"
        and getattr(exc, "constraint_name", None) is None
        and str(message).startswith("no partition of relation")
    )


def is_data_error(exc: BaseException) -> bool:
    """True when the rows themselves may be at fault: bisect them to find out."""
    if isinstance(exc, asyncpg.PostgresError):
        return (sqlstate_of(exc) or "")[:2] in _DATA_CLASSES and not is_missing_partition(exc)
    # asyncpg refusing to encode a value client-side (wrong type, a lone surrogate in a str).
    return isinstance(exc, asyncpg_base.DataError | UnicodeEncodeError)


def is_connection_error(exc: BaseException) -> bool:
    """True when the failure is the path to a server or passes in seconds: release, retry soon."""
    if isinstance(exc, asyncpg.PostgresError):
        state = sqlstate_of(exc) or ""
        return state.startswith("08") or state in _RETRYABLE_STATES
    if isinstance(exc, asyncpg.InterfaceError) and not isinstance(exc, asyncpg_base.DataError):
        # asyncpg says "connection is closed" / "connection was closed in the middle of operation"
        return "closed" in str(exc)
    return isinstance(exc, CONNECTION_ERRORS)


def is_transient_conflict(exc: BaseException) -> bool:
    """A deadlock or serialization failure: run the same transaction again."""
    return sqlstate_of(exc) in _CONFLICT_STATES


def is_environment_error(exc: BaseException) -> bool:
    """True for every server-reported error that is neither the rows' (22/23), nor transient, nor a
    conflict, and for :class:`HeldByEnvironment`: release the batch, no retry, no dead letter."""
    if isinstance(exc, HeldByEnvironment) or is_missing_partition(exc):
        return True
    if not isinstance(exc, asyncpg.PostgresError):
        return False
    state = sqlstate_of(exc) or ""
    return not (state[:2] in _DATA_CLASSES or is_connection_error(exc) or state in _CONFLICT_STATES)


def is_configuration_error(exc: BaseException) -> bool:
    """An environment error the operator fixes with a setting or ``migrate`` (CLI exit code 2)."""
    pg = postgres_error_of(exc)
    return pg is not None and (sqlstate_of(pg) or "")[:2] in _CONFIGURATION_CLASSES


def mark_reported(exc: BaseException, line: str) -> None:
    """Note on ``exc`` that its ERROR line was logged, so the task does not log it a second time."""
    exc.add_note(_REPORTED_NOTE + line)


def was_reported(exc: BaseException) -> bool:
    return any(note.startswith(_REPORTED_NOTE) for note in getattr(exc, "__notes__", ()))


# What the operator should do, by SQLSTATE (exact first, then class). Each says why, briefly.
_BY_STATE = {
    "25006": "the database is read-only (a replica after a failover, a managed database at its "
    "storage limit, or default_transaction_read_only): point ANALYTICS_DATABASE_URL at the primary, "
    "or free space / raise the storage limit",
    "53100": "the database server's disk is full: free space or grow the volume",
    "53200": "the database server is out of memory: check its load and memory settings "
    "(work_mem, max_connections)",
    "53300": "the database has no free connection slot: raise max_connections, lower the workers' "
    "concurrency, or put a pooler in front",
    "55P03": "another session holds a lock on analytics_events (a migration, VACUUM FULL, a long "
    "transaction): find it in pg_locks / pg_stat_activity",
    "57014": "a statement was cancelled or ran past statement_timeout (often a lock wait): check "
    "pg_stat_activity for what blocks analytics_events",
    "58030": "the database server reports an I/O error: check its disks and its log",
    "XX001": "the database reports corrupted data: see its log, restore or repair the table",
    "XX002": "the database reports a corrupted index: REINDEX TABLE analytics_events",
    "42P01": "the events table does not exist: run `analytics-bridge migrate` against this database",
    "42703": "the events table lacks a column the bridge writes: run `analytics-bridge migrate`, "
    "compare the table with bridge/schema.py",
    "42501": "the database user lacks a privilege: GRANT INSERT, SELECT ON analytics_events, USAGE on "
    "its sequence, and TEMPORARY on the database",
    "3D000": "the database does not exist: run `analytics-bridge migrate` (it creates it) or fix the "
    "database name in ANALYTICS_DATABASE_URL",
    "3F000": "a schema is missing: check the search_path of ANALYTICS_DATABASE_URL's user",
    "40001": "the insert kept failing on serialization conflicts with another session",
    "40P01": "the insert kept deadlocking with another session",
}
_NO_PARTITION = (
    "the row's created_at has no partition and the drain could not make one: run `analytics-bridge "
    "migrate`, and GRANT CREATE on the schema to the drain's user"
)
_BY_CLASS = {
    "08": "the connection to PostgreSQL failed: check that it runs and is reachable",
    "28": "authentication failed: check the user and password in ANALYTICS_DATABASE_URL "
    "(and the server's pg_hba.conf)",
    "42": "the events table is not what the bridge expects: run `analytics-bridge migrate` and "
    "compare the table with bridge/schema.py",
    "53": "the database server is short of a resource: see its log",
    "57": "the database server stopped or cancelled the work: see its log",
    "XX": "PostgreSQL reports an internal error: see the server log",
}


def _postgres_advice(pg: asyncpg.PostgresError) -> str:
    state = sqlstate_of(pg) or "?????"
    todo = _BY_STATE.get(state) or _BY_CLASS.get(state[:2]) or "see the PostgreSQL server log"
    if is_missing_partition(pg):
        todo = _NO_PARTITION
    # The message only: its DETAIL is a multi-line dump of the failing row, and this is one log line.
    message = str(pg.message if getattr(pg, "message", None) else pg).replace("\n", " ")
    return f"PostgreSQL refused (SQLSTATE {state}: {message}): {todo}"


def advice(exc: BaseException) -> str:
    """One line for the operator: what failed (SQLSTATE, message) and what to do about it.

    The drain's ERROR line and the CLI's message both come from here, so they never disagree."""
    if isinstance(exc, HeldByEnvironment):
        return str(exc)
    if isinstance(exc, RedisAuthenticationError):
        return (
            f"Redis refused the credentials ({exc}): authentication failed: check the password "
            "(and user name) in ANALYTICS_REDIS_URL"
        )
    pg = postgres_error_of(exc)
    if pg is not None:
        return _postgres_advice(pg)
    if isinstance(exc, RedisConnectionError | RedisTimeoutError):
        return f"Redis did not answer ({exc}): check that it runs and is reachable"
    if isinstance(exc, OSError):
        return f"PostgreSQL did not answer ({type(exc).__name__}: {exc}): check that it runs and is reachable"
    return f"{type(exc).__name__}: {exc}"
