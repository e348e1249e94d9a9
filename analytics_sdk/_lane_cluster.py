"""A thread's own push on Redis Cluster (:mod:`._direct` with ``ANALYTICS_REDIS_CLUSTER``).

The direct lane's plain-Redis path drives one blocking connection itself; on a cluster the shard's
node is found, and MOVED/ASK followed, by redis-py's sync cluster client
(:func:`._redis.sync_cluster_client`: no hidden retry). Made on first use, in the pushing thread,
under the lane's lock; closed with the lane.
"""

from __future__ import annotations

import math
from typing import Any

import redis.cluster
from redis.exceptions import NoScriptError

from . import _lua
from ._keys import QueueKeys
from ._redis import sync_cluster_client
from ._settings import Settings

__all__ = ["ClusterPusher"]


class ClusterPusher:
    """Push script runs and replica acknowledgements through one sync cluster client."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._client: redis.cluster.RedisCluster | None = None

    @property
    def client(self) -> redis.cluster.RedisCluster:
        if self._client is None:  # connects (reads the topology) here
            settings = self._settings
            # Each reply is bounded by this socket timeout, not by the deadline (redis-py's sync
            # cluster client takes no per-call bound): half the publish timeout, so a hung node costs
            # a retry on another node, not the whole deadline; longer than a WAIT when acks are asked.
            bound = settings.analytics_publish_timeout / 2
            if settings.analytics_replica_acks:
                bound = max(bound, settings.analytics_replica_ack_timeout + 0.5)
            bounded = settings.replace(analytics_redis_timeout=min(settings.analytics_redis_timeout, bound))
            self._client = sync_cluster_client(bounded, startup_nodes=settings.cluster_startup_nodes)
        return self._client

    def push(self, args: tuple[Any, ...], payloads: list[bytes]) -> Any:
        """One attempt: EVALSHA, EVAL on a node that does not know the script (restarted, promoted).
        ``args`` are the script's numkeys, keys and leading arguments, as the plain path sends them."""
        client = self.client
        try:
            return client.evalsha(_lua.PUSH.sha, *args, *payloads)
        except NoScriptError:
            return client.eval(_lua.PUSH.source, *args, *payloads)

    def replicated(self, keys: QueueKeys, replicas: int, wait_for: float) -> int:
        """:func:`._redis.replicated`, blocking: the fence write and WAIT on one connection of the node
        owning ``keys``'s slot (a pipeline of that node's own client: not redirected elsewhere)."""
        client = self.client
        node = client.get_node_from_key(keys.replication_fence)  # type: ignore[no-untyped-call]
        wait_ms = max(1, math.ceil(wait_for * 1000))
        with client.get_redis_connection(node).pipeline(transaction=False) as pipe:
            pipe.set(keys.replication_fence, b"1", px=wait_ms + 60_000)
            pipe.wait(replicas, wait_ms)
            replies = pipe.execute()
        return int(replies[1])

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()
