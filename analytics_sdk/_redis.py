"""The one way the SDK and the bridge make a Redis client for the queue.

redis-py's own retries are off, whatever the URL says: a script whose reply was lost and that
redis-py silently sends again is a second run. The queue's scripts are idempotent (see
:mod:`._lua`), but a retry's worst case must be one the caller chose and can see, not a library
default (``Redis()`` retries 10 times since redis-py 8.0; ``from_url`` lets ``?retry_on_timeout=true``
in the URL win over keyword arguments). Callers that retry do so explicitly, with their own bound.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ._settings import Settings

__all__ = ["NO_RETRY", "redis_client"]


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
