"""Settings: one frozen object, read from ``ANALYTICS_*`` environment variables.

The variable for an attribute is ``ANALYTICS_`` + the attribute name upper-cased, without a leading
``analytics_``: ``redis_url`` -> ``ANALYTICS_REDIS_URL``, ``analytics_batch_size`` ->
``ANALYTICS_BATCH_SIZE``. The attribute names of the older service are kept.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import quote, urlsplit

from ._env import _convert, _parse_type, _positive, env_name, parse_env, redact_url
from ._exceptions import ConfigurationError
from ._shards import MAX_SHARDS as _MAX_SHARDS

__all__ = ["Settings", "env_name", "parse_env", "redact_url"]


@dataclass(frozen=True, slots=True)
class Settings:
    """Configuration of the SDK and the bridge. Construct directly, or with :meth:`from_env`."""

    redis_host: str = "127.0.0.1"
    redis_port: int = 6379
    redis_password: str | None = field(default=None, repr=False)
    redis_db: int = 0
    #: Overrides the four above when set; ``rediss://`` means TLS.
    redis_url: str | None = None
    # User postgres: the role every PostgreSQL install has (asyncpg would otherwise log in as the OS user).
    database_url: str = "postgresql://postgres@127.0.0.1:5432/analytics"
    #: The Celery broker; defaults to the Redis URL.
    broker_url: str | None = None
    analytics_batch_size: int = 100
    #: Seconds between beat-scheduled flushes.
    analytics_flush_interval: float = 60.0
    #: Cap on the queue; past it the oldest events are dropped (and counted).
    analytics_max_queue_size: int = 1_000_000
    analytics_key_prefix: str = "analytics"
    analytics_max_metadata_bytes: int = 32 * 1024
    #: Seconds without a renewal after which a claimed, unacknowledged batch is taken over by another
    #: drain. A drain at work renews its leases every quarter of this (a heartbeat), so it bounds how
    #: long a dead worker's batches wait, not how long a drain may take. At least twice the Redis timeout.
    analytics_visibility_timeout: float = 60.0
    #: Rows per INSERT transaction in the drain (claims are ``analytics_batch_size`` each).
    analytics_insert_batch_size: int = 5_000
    #: Hard and soft time limits of the flush task, in seconds.
    analytics_task_time_limit: float = 600.0
    analytics_task_soft_time_limit: float = 540.0
    #: Seconds one drain may keep claiming before it hands the rest to a new task.
    analytics_drain_time_budget: float = 300.0
    #: Send the flush task when a push makes the queue reach ``analytics_batch_size``.
    analytics_backlog_trigger: bool = True
    #: At most one backlog-triggered flush per this many seconds, across all clients.
    analytics_backlog_trigger_cooldown: float = 1.0
    #: With the backlog trigger on: the longest a queued event waits for a flush to be due, in
    #: seconds, at any rate (a client schedules one that many seconds ahead). 0: beat alone.
    analytics_max_delay: float = 2.0
    #: Redis socket timeout (seconds) and how often a failed push is retried.
    analytics_redis_timeout: float = 5.0
    analytics_publish_retries: int = 3
    #: The most one track() (or get_queue_size()) waits, in seconds, across all its retries: then it
    #: raises PublishError, and while Redis stays down later calls raise at once (the breaker).
    analytics_publish_timeout: float = 2.0
    #: False: clients validate events and return their ids without sending or connecting (local
    #: development without Redis). ``ANALYTICS_ENABLED=false`` in the environment switches off every
    #: client of the process, whatever Settings it was made with (see :mod:`._disabled`).
    analytics_enabled: bool = True
    #: Queue shards (K), each under its own Redis Cluster hash tag. 1 on a plain Redis keeps the one
    #: list ``<prefix>:events:batch``. Change it live: drains visit the shards of every K ever used.
    analytics_queue_shards: int = 1
    #: True: the SDK, the drain and the CLI use redis-py's Redis Cluster client, starting from the
    #: node in the Redis URL, then those of ``analytics_redis_cluster_nodes``.
    analytics_redis_cluster: bool = False
    #: More cluster startup nodes, ``host:port,host:port``: a process starting while the URL's node is
    #: down still connects.
    analytics_redis_cluster_nodes: str | None = None
    #: Replicas that must hold a push before track() returns (Redis WAIT on the node that took it);
    #: 0 returns on the primary's acknowledgement.
    analytics_replica_acks: int = 0
    #: Seconds a push waits for those replicas; then track() raises PublishError. Below the Redis
    #: timeout (the WAIT runs on a socket with that timeout).
    analytics_replica_ack_timeout: float = 1.0
    #: Width of each time partition of the events table: ``month``, ``week`` or ``day``.
    analytics_partition_interval: str = "month"
    #: Days of events to keep; the daily maintenance drops partitions wholly older. 0 keeps everything.
    analytics_retention_days: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            expected = _parse_type(f.type)
            if value is None and expected is not bool and f.default is None:
                continue
            ok = isinstance(value, expected) and not (expected is not bool and isinstance(value, bool))
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))
                ok = True
            if not ok:
                # A secret, or a URL that may hold one, is not shown: the type is what is wrong.
                shown = "***" if not f.repr or f.name.endswith("_url") else value
                raise ConfigurationError(env_name(f.name), shown, f"must be {expected.__name__}")
        for name in (
            "analytics_batch_size",
            "analytics_flush_interval",
            "analytics_max_queue_size",
            "analytics_max_metadata_bytes",
            "analytics_visibility_timeout",
            "analytics_insert_batch_size",
            "analytics_task_time_limit",
            "analytics_task_soft_time_limit",
            "analytics_drain_time_budget",
            "analytics_redis_timeout",
            "analytics_publish_timeout",
        ):
            _positive(name, getattr(self, name))
        _positive("analytics_backlog_trigger_cooldown", self.analytics_backlog_trigger_cooldown)
        _positive("analytics_publish_retries", self.analytics_publish_retries, allow_zero=True)
        _positive("analytics_max_delay", self.analytics_max_delay, allow_zero=True)
        _positive("redis_db", self.redis_db, allow_zero=True)
        _positive("analytics_retention_days", self.analytics_retention_days, allow_zero=True)
        _positive("analytics_replica_acks", self.analytics_replica_acks, allow_zero=True)
        _positive("analytics_replica_ack_timeout", self.analytics_replica_ack_timeout)
        if not 1 <= self.analytics_queue_shards <= _MAX_SHARDS:
            raise ConfigurationError(
                env_name("analytics_queue_shards"),
                self.analytics_queue_shards,
                f"must be 1..{_MAX_SHARDS} (each shard then owns at least 16 of the 16,384 slots)",
            )
        if self.analytics_replica_acks and self.analytics_replica_ack_timeout >= self.analytics_redis_timeout:
            raise ConfigurationError(
                env_name("analytics_replica_ack_timeout"),
                self.analytics_replica_ack_timeout,
                f"must be below ANALYTICS_REDIS_TIMEOUT ({self.analytics_redis_timeout})",
            )
        if self.analytics_redis_cluster:
            path = urlsplit(self.redis_dsn).path.strip("/")
            if path not in ("", "0"):
                variable = "redis_url" if self.redis_url else "redis_db"
                shown = redact_url(self.redis_dsn) if self.redis_url else self.redis_db
                raise ConfigurationError(
                    env_name(variable),
                    shown,
                    "Redis Cluster has database 0 only (ANALYTICS_REDIS_CLUSTER=true)",
                )
        self.cluster_startup_nodes  # noqa: B018 -- raises ConfigurationError on a malformed list
        if self.analytics_partition_interval not in ("month", "week", "day"):
            raise ConfigurationError(
                env_name("analytics_partition_interval"),
                self.analytics_partition_interval,
                "must be month, week or day",
            )
        if not 0 < self.redis_port < 65536:
            raise ConfigurationError(env_name("redis_port"), self.redis_port, "must be a TCP port")
        # A claim moves at most this many items in one Lua call; Lua's stack bounds it.
        if self.analytics_batch_size > 10_000:
            raise ConfigurationError(
                env_name("analytics_batch_size"), self.analytics_batch_size, "must be <= 10000"
            )
        if not self.analytics_key_prefix or any(c.isspace() for c in self.analytics_key_prefix):
            raise ConfigurationError(
                env_name("analytics_key_prefix"),
                self.analytics_key_prefix,
                "must be non-empty, without spaces",
            )
        for name, schemes in (
            ("redis_url", ("redis", "rediss", "unix")),
            ("database_url", ("postgresql", "postgres")),
        ):
            url = getattr(self, name)
            if url is None:
                continue
            try:
                parts = urlsplit(url)
                parts.port  # noqa: B018 -- raises ValueError on a port that is not a number
            except ValueError as exc:
                shown = redact_url(url)
                raise ConfigurationError(env_name(name), shown, f"is not a valid URL ({exc})") from None
            if parts.scheme not in schemes:
                raise ConfigurationError(
                    env_name(name), redact_url(url), f"scheme must be one of {', '.join(schemes)}"
                )

    def __repr__(self) -> str:
        shown = []
        for f in fields(self):
            if not f.repr:
                if getattr(self, f.name) is not None:
                    shown.append(f"{f.name}='***'")
                continue
            value = getattr(self, f.name)
            if f.name.endswith("_url"):
                value = redact_url(value)
            shown.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(shown)})"

    @property
    def redis_dsn(self) -> str:
        """The Redis URL in force: ``redis_url`` when set, else built from host, port, password, db."""
        if self.redis_url:
            return self.redis_url
        auth = f":{quote(self.redis_password, safe='')}@" if self.redis_password else ""
        host = f"[{self.redis_host}]" if ":" in self.redis_host else self.redis_host
        return f"redis://{auth}{host}:{self.redis_port}/{self.redis_db}"

    @property
    def cluster_startup_nodes(self) -> tuple[tuple[str, int], ...]:
        """``analytics_redis_cluster_nodes`` parsed: ``(host, port)`` pairs, in order."""
        nodes: list[tuple[str, int]] = []
        for item in (self.analytics_redis_cluster_nodes or "").split(","):
            if not item.strip():
                continue
            host, _, port = item.strip().rpartition(":")
            host = host.strip("[]")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigurationError(
                    env_name("analytics_redis_cluster_nodes"),
                    self.analytics_redis_cluster_nodes,
                    "must be host:port[,host:port...]",
                )
            nodes.append((host, int(port)))
        return tuple(nodes)

    @property
    def broker_dsn(self) -> str:
        """The Celery broker URL in force: ``broker_url`` when set, else the Redis URL."""
        return self.broker_url or self.redis_dsn

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read every ``ANALYTICS_*`` variable of ``environ`` (default ``os.environ``).

        Keyword overrides win over the environment. A bad value raises :class:`ConfigurationError`
        naming the variable and the value.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = env_name(f.name)
            raw = env.get(name)
            if raw is None or raw == "":
                continue
            values[f.name] = _convert(name, raw, _parse_type(f.type), secret=not f.repr)
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_dsn(cls, redis_url: str, database_url: str | None = None, **kwargs: Any) -> Settings:
        """Settings pointing at one Redis (and optionally one PostgreSQL) by URL."""
        if database_url is not None:
            kwargs["database_url"] = database_url
        return cls(redis_url=redis_url, **kwargs)

    def replace(self, **changes: Any) -> Settings:
        """A copy with some attributes changed (validated again)."""
        return dataclasses.replace(self, **changes)
