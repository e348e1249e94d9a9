"""The CLI's one error handler: advice that fits the failure, and the README's exit codes.

0 done; 1 the operation failed (e.g. a read-only database: the events wait in flight); 2 bad
configuration (credentials, a missing database or table: run ``migrate``; Redis < 7.0) or a service
unreachable. The advice text is :func:`bridge._errors.advice`, the same the worker logs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar
from urllib.parse import urlsplit

import click
from redis.exceptions import AuthenticationError as RedisAuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException
from redis.exceptions import TimeoutError as RedisTimeoutError

from analytics_sdk._exceptions import ConfigurationError
from analytics_sdk._settings import Settings, redact_url

from .._errors import (
    HeldByEnvironment,
    NotMigrated,
    RedisTooOld,
    advice,
    is_configuration_error,
    is_connection_error,
    postgres_error_of,
)
from ._status import START_POSTGRES, START_REDIS

__all__ = ["Misconfigured", "Unreachable", "run"]

T = TypeVar("T")


class Unreachable(click.ClickException):
    """A service did not answer: exit 2, with how to start it."""

    exit_code = 2


class Misconfigured(click.ClickException):
    """Bad configuration (credentials, a missing database or table, Redis too old): exit 2."""

    exit_code = 2


def _local_port(url: str, default: int) -> int | None:
    """The port of ``url`` if it points at this machine (only then is "start it here" advice), else None."""
    try:
        parts = urlsplit(url)
        return (parts.port or default) if parts.hostname in ("127.0.0.1", "localhost", "::1", None) else None
    except ValueError:
        return None


def _unreachable(
    what: str, url: str, exc: BaseException, start: str, port: int, variable: str
) -> Unreachable:
    shown = redact_url(url)
    local = _local_port(url, port)
    how = (
        f"Start it: {start.replace(f'--port {port}', f'--port {local}')}\nor point {variable} elsewhere."
        if local is not None
        else f"Check that it runs at {shown} and is reachable from here, or fix {variable}."
    )
    return Unreachable(f"{what} at {shown} did not answer ({exc}).\n{how}")


def run(coro: Coroutine[Any, Any, T], settings: Settings) -> T:
    """asyncio.run, with failures turned into advice that fits them (bridge._errors.advice) and the
    README's exit codes: 2 bad configuration (credentials, missing database or table, Redis < 7.0)
    or a service unreachable, 1 the operation failed (e.g. a read-only database)."""
    try:
        return asyncio.run(coro)
    except RedisAuthenticationError as exc:  # before ConnectionError, its base class
        raise Misconfigured(f"Redis at {redact_url(settings.redis_dsn)}: {advice(exc)}") from exc
    except (RedisConnectionError, RedisTimeoutError) as exc:
        raise _unreachable(
            "Redis", settings.redis_dsn, exc, START_REDIS, 6379, "ANALYTICS_REDIS_URL (or _HOST/_PORT/_DB)"
        ) from exc
    except RedisClusterException as exc:  # no node of the cluster answered (not a RedisError)
        raise _unreachable(
            "Redis Cluster", settings.redis_dsn, exc, START_REDIS, 6379, "ANALYTICS_REDIS_CLUSTER_NODES"
        ) from exc
    except (RedisTooOld, ConfigurationError) as exc:
        raise Misconfigured(str(exc)) from exc
    except NotMigrated as exc:
        raise Misconfigured(f"PostgreSQL at {redact_url(settings.database_url)}: {exc}") from exc
    except Exception as exc:
        pg = postgres_error_of(exc)
        if pg is None and isinstance(exc, OSError):
            raise _unreachable(
                "PostgreSQL", settings.database_url, exc, START_POSTGRES, 5432, "ANALYTICS_DATABASE_URL"
            ) from exc
        if pg is None and not isinstance(exc, HeldByEnvironment):
            raise  # a bug: let its traceback show
        exit_2 = is_configuration_error(exc) or is_connection_error(pg or exc)
        error = Misconfigured if exit_2 else click.ClickException
        raise error(f"PostgreSQL at {redact_url(settings.database_url)}: {advice(exc)}") from exc
