"""The one way the SDK and the bridge make a Redis client for the queue.

redis-py's own retries are off, whatever the URL says: a script whose reply was lost and that
redis-py silently sends again is a second run. The queue's scripts are idempotent (see
:mod:`._lua`), but a retry's worst case must be one the caller chose and can see, not a library
default (``Redis()`` retries 10 times since redis-py 8.0; ``from_url`` lets ``?retry_on_timeout=true``
in the URL win over keyword arguments). Callers that retry do so explicitly, with their own bound.

Redis Cluster (:func:`cluster_client`, :func:`sync_cluster_client`) keeps the same policy. redis-py's
cluster client has two layers: a *redirection* loop (``RedisClusterRequestTTL``, 16 tries) that
follows MOVED, ASK and TRYAGAIN, and a *retry* loop whose count is ``retry.get_retries()`` (the
deprecated ``cluster_error_retry_attempts`` only when no ``retry`` is given) that sends a command
again after a ConnectionError, TimeoutError, ClusterDownError or SlotNotCoveredError. A redirection is
the server saying "not run here", so following it is safe and required; the retry loop re-sends a
command whose reply may have been lost. We set ``retry=Retry(NoBackoff(), 0)``: redirections are
still followed, and after a connection error the client still marks its topology stale and
re-reads it (from the other nodes) before its next command, but it never re-sends on its own.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
import redis.cluster
import redis.retry
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from . import _lua
from ._exceptions import ConfigurationError
from ._keys import QueueKeys
from ._settings import Settings, env_name, redact_url

__all__ = [
    "NO_RETRY",
    "AnyRedis",
    "cluster_client",
    "load_scripts",
    "redis_client",
    "replicated",
    "sync_cluster_client",
]

logger = logging.getLogger(__name__)

#: What the queue functions accept: a plain client or a cluster client (the scripts, pipelines and
#: single-key commands they send work on both; see _shards for the key scheme that keeps them in one slot).
AnyRedis = aioredis.Redis | AsyncRedisCluster


def NO_RETRY() -> Retry:  # a fresh object per client: redis-py mutates it
    return Retry(NoBackoff(), 0)


def redis_client(
    settings: Settings, *, max_connections: int | None = None, wait: float | None = None
) -> aioredis.Redis:
    """A client for ``settings.redis_dsn`` with the socket timeouts of the settings and no hidden
    retry. With ``max_connections``, its pool is a blocking one of that size: a command past the cap
    waits up to ``wait`` seconds for a free connection instead of failing at once (redis-py's default
    pool raises ``MaxConnectionsError`` past 100)."""
    timeout = settings.analytics_redis_timeout
    common: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": NO_RETRY(),
    }
    if max_connections is None:
        client = aioredis.Redis.from_url(settings.redis_dsn, **common)
    else:
        pool = aioredis.BlockingConnectionPool.from_url(
            settings.redis_dsn, max_connections=max_connections, timeout=wait, **common
        )
        client = aioredis.Redis.from_pool(pool)
    # The URL's query string wins over keyword arguments in from_url: put our policy back.
    client.set_retry(NO_RETRY())
    kwargs = client.connection_pool.connection_kwargs
    kwargs["retry_on_timeout"] = False
    kwargs["retry_on_error"] = []
    return client


# -- Redis Cluster ---------------------------------------------------------------------------------

# URL query options that would bring back a hidden retry: dropped, as redis_client does.
_RETRY_OPTIONS = frozenset({"retry_on_timeout", "retry_on_error"})
# Set here, never from the URL's query string.
_OURS = frozenset({"host", "port", "db", "path", "connection_class", "retry", "cluster_error_retry_attempts"})
_CLUSTER_OPTIONS = frozenset(inspect.signature(AsyncRedisCluster.__init__).parameters) - _OURS - {"self"}


def _cluster_options(
    settings: Settings, startup_nodes: Sequence[tuple[str, int]]
) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """The startup nodes (the URL's node first, then ``startup_nodes``, each once) and the keyword
    arguments both cluster clients share, from the settings' URL; bad combinations refused."""
    variable = env_name("redis_url") if settings.redis_url else env_name("redis_db")
    shown = redact_url(settings.redis_dsn)
    try:
        parsed: dict[str, Any] = dict(parse_url(settings.redis_dsn))
    except ValueError as exc:
        raise ConfigurationError(variable, shown, str(exc)) from None
    if "path" in parsed:
        raise ConfigurationError(variable, shown, "Redis Cluster is reached over TCP, not a unix socket")
    if parsed.get("db", 0):
        raise ConfigurationError(variable, shown, "Redis Cluster has database 0 only")
    unknown = sorted(set(parsed) - _OURS - _RETRY_OPTIONS - _CLUSTER_OPTIONS)
    if unknown:
        raise ConfigurationError(variable, shown, f"option(s) {unknown} are not supported with Redis Cluster")
    options: dict[str, Any] = {name: parsed[name] for name in parsed.keys() & _CLUSTER_OPTIONS}
    if parsed.get("connection_class") is not None and parsed["connection_class"].__name__ == "SSLConnection":
        options["ssl"] = True
    timeout = settings.analytics_redis_timeout
    options.setdefault("socket_timeout", timeout)
    options.setdefault("socket_connect_timeout", timeout)
    # A shard whose primary and replicas are all gone must not stop the client from starting or
    # serving the other shards (a producer then pushes to another shard): the servers' own
    # cluster-require-full-coverage decides whether those answer.
    options["require_full_coverage"] = False
    nodes: list[tuple[str, int]] = []
    for node in [(parsed.get("host", "localhost"), int(parsed.get("port", 6379))), *startup_nodes]:
        address = (str(node[0]), int(node[1]))
        if address not in nodes:
            nodes.append(address)
    return nodes, options


def cluster_client(
    settings: Settings, *, startup_nodes: Sequence[tuple[str, int]] = (), max_connections: int = 100
) -> AsyncRedisCluster:
    """A ``redis.asyncio.cluster.RedisCluster`` for the cluster behind ``settings.redis_dsn``: socket
    timeouts of the settings, no hidden retry (see the module docstring), MOVED/ASK followed.

    It discovers the topology from the URL's node, else from ``startup_nodes`` in order (a process
    starting while the first node is down still connects), then from every node it discovered.
    ``max_connections`` is per node; past it a command fails at once with ``MaxConnectionsError``
    (redis-py's cluster client has no blocking pool). Not connected until its first command or
    ``await client.initialize()``; close it with ``await client.aclose()`` on its own event loop.
    """
    nodes, options = _cluster_options(settings, startup_nodes)
    return AsyncRedisCluster(
        startup_nodes=[AsyncClusterNode(host, port) for host, port in nodes],
        retry=NO_RETRY(),
        max_connections=max_connections,
        **options,
    )


def sync_cluster_client(
    settings: Settings, *, startup_nodes: Sequence[tuple[str, int]] = (), max_connections: int = 100
) -> redis.cluster.RedisCluster:
    """The blocking twin of :func:`cluster_client` (same nodes, timeouts and no-retry policy), for
    code that runs without an event loop. It connects (reads the topology) when created."""
    nodes, options = _cluster_options(settings, startup_nodes)
    # the sync client gives its per-node clients a no-retry policy of its own (NodesManager)
    return redis.cluster.RedisCluster(
        startup_nodes=[redis.cluster.ClusterNode(host, port) for host, port in nodes],  # type: ignore[no-untyped-call]
        retry=redis.retry.Retry(NoBackoff(), 0),
        max_connections=max_connections,
        **options,
    )


def _scripts() -> list[_lua.Script]:
    return [value for value in vars(_lua).values() if isinstance(value, _lua.Script)]


async def load_scripts(client: AnyRedis) -> list[str]:
    """SCRIPT LOAD every script of :mod:`._lua`: on a plain Redis, on it; on a cluster, on every node
    it knows, primaries and replicas (a replica that is promoted later already has them: Redis does
    not replicate its script cache). Returns the names of the nodes loaded.

    A warm-up, not a requirement: :class:`._lua.Script` falls back from EVALSHA to EVAL on NOSCRIPT
    (a node restarted or promoted since), so a node that cannot be reached now is logged and skipped.
    """
    sources = [script.source for script in _scripts()]
    if not isinstance(client, AsyncRedisCluster):
        for source in sources:
            await client.script_load(source)
        return ["default"]
    await client.initialize()

    async def load(node: AsyncClusterNode) -> str:
        for source in sources:
            await client.execute_command("SCRIPT LOAD", source, target_nodes=node)
        return str(node.name)

    nodes = client.get_nodes()
    results = await asyncio.gather(*(load(node) for node in nodes), return_exceptions=True)
    loaded = []
    for node, result in zip(nodes, results, strict=True):
        if isinstance(result, BaseException):
            logger.warning("could not load the queue scripts on %s: %r", node.name, result)
        else:
            loaded.append(result)
    return loaded


async def replicated(client: AnyRedis, keys: QueueKeys, replicas: int, wait_for: float) -> int:
    """How many replicas of the node owning ``keys``'s slot hold every write made there so far
    (``WAIT``), waiting up to ``wait_for`` seconds for ``replicas`` of them.

    WAIT counts the replicas holding the last write *of its own connection*; from a pool it may run
    on a connection that never wrote and then counts every connected replica at once. So a fresh
    write (``keys.replication_fence``, in the shard's slot) and the WAIT go in one pipeline on one
    connection: replication is in order, so a replica that holds the fence holds the writes before
    it. ``wait_for`` must stay below the client's socket timeout, or the read times out first."""
    if replicas <= 0:
        return 0
    wait_ms = max(1, math.ceil(wait_for * 1000))
    fence_ttl = wait_ms + 60_000
    if isinstance(client, AsyncRedisCluster):
        await client.initialize()
        node = client.get_node_from_key(keys.replication_fence)
        cluster_pipe = client.pipeline(transaction=False)
        cluster_pipe.set(keys.replication_fence, b"1", px=fence_ttl)
        cluster_pipe.execute_command("WAIT", replicas, wait_ms, target_nodes=node)
        # no redirection: a SET re-sent elsewhere would leave the WAIT counting another connection
        replies = await cluster_pipe.execute(allow_redirections=False)
    else:
        async with client.pipeline(transaction=False) as pipe:
            pipe.set(keys.replication_fence, b"1", px=fence_ttl)
            pipe.wait(replicas, wait_ms)
            replies = await pipe.execute()
    return int(replies[1])
