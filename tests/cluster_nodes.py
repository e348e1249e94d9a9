"""A Redis Cluster of redis-server children on free loopback ports: start, read the topology, stop.

No pytest here: the benchmarks (``benchmarks/scale.py``) start one too. :mod:`tests.cluster` adds the
faults (kill, promotion, moving a slot) and the pytest fixtures. Six ``redis-server --cluster-enabled
yes`` children of this process (:class:`tests.servers.RedisServer`, stopped by PID, never by name),
joined by ``redis-cli --cluster create --cluster-replicas 1``; the topology is always read live from
the nodes, and every wait polls with a deadline and fails with what it last saw.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import redis
from redis.crc import key_slot

from tests.servers import RedisServer, free_port

__all__ = ["FORM_TIMEOUT", "HOST", "ClusterNodes", "NodeInfo", "in_ranges", "poll", "start_nodes"]

T = TypeVar("T")
C = TypeVar("C", bound="ClusterNodes")

HOST = "127.0.0.1"
SLOTS = 16384
#: Short, so a killed primary's replica is promoted within seconds; long enough that a loaded 2-core
#: machine (six servers, pytest, other helpers' runs) does not see spurious failure detections.
NODE_TIMEOUT_MS = 1500
FORM_TIMEOUT = 60.0  # create + gossip + replicas' first sync, on a busy machine

_INSTALL = "apt-get install redis-server (it ships redis-server and redis-cli)"


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """One line of CLUSTER NODES."""

    node_id: str
    port: int
    flags: frozenset[str]
    primary_id: str  # '-' for a primary
    connected: bool
    slots: tuple[tuple[int, int], ...]  # inclusive ranges

    @property
    def is_primary(self) -> bool:
        return "master" in self.flags

    @property
    def failed(self) -> bool:
        return "fail" in self.flags or "fail?" in self.flags

    def owns(self, slot: int) -> bool:
        return in_ranges(self.slots, slot)


def parse_nodes(text: str) -> list[NodeInfo]:
    nodes = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = line.split()
        address = fields[1].split("@")[0]
        slots = []
        for item in fields[8:]:
            if item.startswith("["):  # a slot being migrated: [slot->-node] / [slot-<-node]
                continue
            first, _, last = item.partition("-")
            slots.append((int(first), int(last or first)))
        nodes.append(
            NodeInfo(
                node_id=fields[0],
                port=int(address.rsplit(":", 1)[1]),
                flags=frozenset(fields[2].split(",")),
                primary_id=fields[3],
                connected=fields[7] == "connected",
                slots=tuple(slots),
            )
        )
    return nodes


def poll(what: str, probe: Callable[[], T | None], timeout: float, interval: float = 0.05) -> T:
    """Call ``probe`` until it returns something other than None (or raises no RedisError); fail
    after ``timeout`` seconds saying what was awaited and the last error seen."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            result = probe()
        except (redis.RedisError, OSError) as exc:
            result, last = None, exc
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last!r})")
        time.sleep(interval)


class ClusterNodes:
    """Six cluster-enabled redis-server children; the topology is always read live from the nodes."""

    def __init__(self, directory: Path, *, node_timeout_ms: int = NODE_TIMEOUT_MS) -> None:
        self.directory = directory
        self.node_timeout_ms = node_timeout_ms
        self.servers: list[RedisServer] = []

    def __enter__(self: C) -> C:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} ports={[s.port for s in self.servers]}>"

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, size: int = 6) -> None:
        if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
            raise RuntimeError(f"redis-server / redis-cli not found: {_INSTALL}")
        for _ in range(size):
            self.servers.append(self._start_node())
        addresses = [f"{HOST}:{s.port}" for s in self.servers]
        create = ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "1", "--cluster-yes"]
        done = subprocess.run(create, capture_output=True, text=True, timeout=FORM_TIMEOUT, check=False)
        if done.returncode != 0:
            output = (done.stdout + done.stderr)[-2000:]
            raise RuntimeError(f"redis-cli --cluster create failed ({done.returncode}): {output}")
        self.wait_healthy()
        self._prime_replicas()

    def _prime_replicas(self) -> None:
        # Redis hides a replica from CLUSTER SLOTS (what clients read the topology from) while its
        # replication offset is 0, i.e. until its primary has written something: write once to each
        # primary, then wait until every node lists a replica for every slot range.
        for primary in self.primaries():
            owned = next(n.slots for n in self.nodes() if n.port == primary.port)
            key = next(
                f"cluster-ready:{i}"
                for i in range(100_000)
                if in_ranges(owned, key_slot(f"cluster-ready:{i}".encode()))
            )
            with primary.client() as client:
                client.set(key, b"1")

        def replicas_listed() -> bool | None:
            for server in self.live():
                with server.client() as client:
                    ranges = client.execute_command("CLUSTER", "SLOTS")
                if len(ranges) < 3 or any(len(entry) < 4 for entry in ranges):
                    return None
            return True

        poll("every node to list a replica for every slot range", replicas_listed, FORM_TIMEOUT)

    def _start_node(self) -> RedisServer:
        last_error: Exception | None = None
        for _ in range(5):  # another process may take a free port between the probe and the bind
            port, bus = free_port(), free_port()
            args = (
                "--cluster-enabled", "yes",
                "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-node-timeout", str(self.node_timeout_ms),
                # the bus port is port+10000 by default: may be taken, or past 65535
                "--cluster-port", str(bus),
            )  # fmt: skip
            server = RedisServer(self.directory / f"node-{port}", port, args)
            try:
                server.start()
            except RuntimeError as exc:
                last_error = exc
                server.stop()
                continue
            return server
        raise RuntimeError(f"could not start a cluster node: {last_error}")

    def stop(self) -> None:
        """Stop every node by its PID. Idempotent."""
        for server in self.servers:
            server.stop()

    # -- topology (read live) --------------------------------------------------------------------

    @property
    def url(self) -> str:
        """A URL of the first node (the cluster clients discover the rest from it)."""
        return f"redis://{HOST}:{self.servers[0].port}/0"

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        """(host, port) of every node, in start order (some may be dead or replicas now)."""
        return [(HOST, s.port) for s in self.servers]

    def server(self, port: int) -> RedisServer:
        return next(s for s in self.servers if s.port == port)

    def live(self) -> list[RedisServer]:
        return [s for s in self.servers if s.running]

    def nodes(self, via: RedisServer | None = None) -> list[NodeInfo]:
        """CLUSTER NODES as seen by ``via`` (default: the first live node)."""
        node = via or self.live()[0]
        with node.client() as client:
            raw = client.execute_command("CLUSTER", "NODES")
        return parse_nodes(raw.decode() if isinstance(raw, bytes) else str(raw))

    def primaries(self) -> list[RedisServer]:
        """The live primaries that own slots, as the first live node sees them."""
        return [
            self.server(n.port)
            for n in self.nodes()
            if n.is_primary and n.slots and not n.failed and self.server(n.port).running
        ]

    def primary_for_slot(self, slot: int) -> RedisServer:
        owners = [n for n in self.nodes() if n.is_primary and not n.failed and n.owns(slot)]
        if len(owners) != 1:
            raise AssertionError(f"slot {slot} has {len(owners)} live owners: {owners}")
        return self.server(owners[0].port)

    def primary_for_key(self, key: str | bytes) -> RedisServer:
        return self.primary_for_slot(key_slot(key.encode() if isinstance(key, str) else key))

    def replica_of(self, primary: RedisServer) -> RedisServer:
        nodes = self.nodes()
        primary_id = next(n.node_id for n in nodes if n.port == primary.port)
        replicas = [n for n in nodes if n.primary_id == primary_id and not n.failed]
        if not replicas:
            raise AssertionError(f"{primary} has no live replica: {nodes}")
        return self.server(replicas[0].port)

    def keys_by_primary(self, pattern: str = "*") -> dict[int, list[bytes]]:
        """port -> the keys matching ``pattern`` each live primary holds (SCAN on each node)."""
        keys: dict[int, list[bytes]] = {}
        for primary in self.primaries():
            with primary.client() as client:
                keys[primary.port] = sorted(client.scan_iter(match=pattern, count=1000))
        return keys

    # -- health and faults -----------------------------------------------------------------------

    def wait_healthy(self, timeout: float = FORM_TIMEOUT) -> None:
        """Until every live node says cluster_state:ok with all slots assigned and agrees on the
        owners, and every live replica's link to its primary is up (WAIT can count it)."""
        poll("a healthy cluster (state ok, 16384 slots, replicas in sync)", self._healthy, timeout)

    def _healthy(self) -> bool | None:
        live = self.live()
        views = []
        for server in live:
            with server.client() as client:
                info = client.execute_command("CLUSTER", "INFO")
                text = info.decode() if isinstance(info, bytes) else str(info)
                fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
                if fields.get("cluster_state") != "ok" or fields.get("cluster_slots_ok") != str(SLOTS):
                    return None
                replication = client.info("replication")
                if replication["role"] == "slave" and replication.get("master_link_status") != "up":
                    return None
            views.append(self._owners(self.nodes(via=server)))
        if any(view != views[0] for view in views):
            return None  # gossip has not converged yet
        return True

    def _owners(self, nodes: list[NodeInfo]) -> tuple[tuple[int, tuple[tuple[int, int], ...]], ...]:
        return tuple(sorted((n.port, n.slots) for n in nodes if n.is_primary and not n.failed and n.slots))


def in_ranges(ranges: tuple[tuple[int, int], ...], slot: int) -> bool:
    return any(first <= slot <= last for first, last in ranges)


def start_nodes(cls: type[C], directory: Path, *, node_timeout_ms: int = NODE_TIMEOUT_MS) -> C:
    """Start a healthy 3+3 cluster of class ``cls`` under ``directory``; the caller stops it (or uses
    ``with``)."""
    cluster = cls(directory, node_timeout_ms=node_timeout_ms)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster
