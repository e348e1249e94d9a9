"""A throwaway Redis Cluster for tests: 3 primaries + 3 replicas on free loopback ports, with faults.

Never the machine's Redis: six ``redis-server --cluster-enabled yes`` children of this process,
started and read by :mod:`tests.cluster_nodes` (no pytest there: the benchmarks use it too). This
module adds the faults a test injects and the fixtures. Usage::

    with start_cluster(tmp_path) as cluster:
        cluster.startup_nodes          # [("127.0.0.1", port), ...]
        cluster.primary_for_key("{analytics:0}:events:batch")
        cluster.kill(server)           # SIGKILL, like a crash
        cluster.wait_for_promotion(server)

The fixtures ``redis_cluster`` (one healthy cluster per test module: do not kill its nodes) and
``fresh_cluster`` (one per test, for tests that kill a node) are imported by the test modules that
need them. Every wait polls with a deadline and fails with what it last saw.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster_nodes import (
    FORM_TIMEOUT,
    NODE_TIMEOUT_MS,
    ClusterNodes,
    NodeInfo,
    poll,
    start_nodes,
)
from tests.servers import RedisServer

__all__ = ["NodeInfo", "ThrowawayCluster", "fresh_cluster", "poll", "redis_cluster", "start_cluster"]

PROMOTION_TIMEOUT = 30.0  # node timeout + election (~1 s rank delay) + the others agreeing


class ThrowawayCluster(ClusterNodes):
    """:class:`ClusterNodes` plus the faults: move a slot, kill a node, wait for its promotion."""

    def __init__(self, directory: Path, *, node_timeout_ms: int = NODE_TIMEOUT_MS) -> None:
        super().__init__(directory, node_timeout_ms=node_timeout_ms)
        self._slots_at_death: dict[int, tuple[tuple[int, int], ...]] = {}

    def move_empty_slot(self, slot: int, to: RedisServer) -> None:
        """Hand an empty slot to the primary ``to`` (CLUSTER SETSLOT ... NODE on every primary, the
        new owner first) and wait until every node agrees: clients that cached the old owner then
        get MOVED."""
        nodes = self.nodes()
        target = next(n.node_id for n in nodes if n.port == to.port)
        owner = self.primary_for_slot(slot)
        order = [to, owner, *(p for p in self.primaries() if p not in (to, owner))]
        for primary in order:
            with primary.client() as client:
                client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target)

        def agreed() -> bool | None:
            for server in self.live():
                owners = [n.port for n in self.nodes(via=server) if n.is_primary and n.owns(slot)]
                if owners != [to.port]:
                    return None
            return True

        poll(f"every node to see slot {slot} on {to}", agreed, FORM_TIMEOUT)

    def kill(self, server: RedisServer, *, via: RedisServer | None = None) -> None:
        """SIGKILL one node (a crash: no shutdown, no failover handshake). The slots it owned, as
        ``via`` sees them (default: the first live node; pass another while that one is paused), are
        remembered for :meth:`wait_for_promotion`."""
        if server.running:
            mine = next((n for n in self.nodes(via=via) if n.port == server.port), None)
            self._slots_at_death[server.port] = mine.slots if mine else ()
        server.kill()

    def wait_for_promotion(self, killed: RedisServer, timeout: float = PROMOTION_TIMEOUT) -> RedisServer:
        """After ``killed`` (a primary) died: wait until a live node owns its slots, as every live
        node sees it, and the cluster is ok again; returns the promoted node."""
        slots = self._slots_at_death.get(killed.port)
        if not slots:
            raise AssertionError(f"{killed} owned no slots: nothing to promote")
        first_slot = slots[0][0]

        def promoted() -> RedisServer | None:
            if not self._healthy():
                return None
            owner = self.primary_for_slot(first_slot)
            return owner if owner.port != killed.port and owner.running else None

        return poll(f"a replica of {killed} to be promoted", promoted, timeout)


def start_cluster(directory: Path, *, node_timeout_ms: int = NODE_TIMEOUT_MS) -> ThrowawayCluster:
    """Start a healthy 3+3 cluster under ``directory``; the caller stops it (or uses ``with``)."""
    return start_nodes(ThrowawayCluster, directory, node_timeout_ms=node_timeout_ms)


def _cluster_or_fail(directory: Path) -> ThrowawayCluster:
    try:
        return start_cluster(directory)
    except RuntimeError as exc:
        pytest.fail(f"could not start a throwaway Redis Cluster: {exc}", pytrace=False)


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThrowawayCluster]:
    """One healthy cluster per test module. Tests share it: isolate by key prefix, kill nothing."""
    with _cluster_or_fail(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


@pytest.fixture
def fresh_cluster(tmp_path: Path) -> Iterator[ThrowawayCluster]:
    """A cluster of the test's own, for tests that kill or stop nodes."""
    with _cluster_or_fail(tmp_path / "cluster") as cluster:
        yield cluster
