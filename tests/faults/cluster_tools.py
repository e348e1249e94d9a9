"""The cluster scenarios' harness: settings for a throwaway Redis Cluster, producer processes, a
flush driver, and the ledger's outcome read over every shard.

The single-Redis harness (:mod:`.ledger`, :mod:`.producer`, :mod:`.workers`) is reused as it is:
producers are ``python -m faults.producer`` processes (settings from the ``ANALYTICS_*`` environment,
as a worker gets them), workers real ``celery -A bridge worker`` processes, the broker RabbitMQ (a
Redis Cluster cannot be kombu's broker). What changes with shards is where the outcome lives: every
shard of every K ever recorded (``<prefix>:shards:counts``, plus K = 1 and the K the test used) has
its own queue, leases, in-flight lists, dead letters and counters, and :func:`collect_shards` sums
them into one :class:`~.ledger.Outcome` so ``check`` asserts I1-I4 over the whole queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import redis
import redis.cluster

from analytics_sdk import Settings
from analytics_sdk._keys import QueueKeys
from analytics_sdk._sender import TaskSender
from analytics_sdk._shards import all_shard_keys
from tests.cluster_nodes import ClusterNodes

from .conftest import base_settings
from .ledger import Ledger, Outcome, quick
from .producer import Production, run_in_subprocess_args
from .workers import REPO_ROOT, settings_env

__all__ = [
    "FlushDriver",
    "Producers",
    "backlog",
    "cluster_settings",
    "collect_shards",
    "quiesce_shards",
    "shards_of",
    "sync_client",
    "wait_until",
]


def cluster_settings(
    cluster: ClusterNodes, *, prefix: str, shards: int, database_url: str, broker_url: str, **changes: Any
) -> Settings:
    """The scenarios' fast settings (:func:`.conftest.base_settings`) on ``cluster``: the URL's node
    first, every other node as a startup node, K = ``shards``, RabbitMQ as the broker."""
    others = ",".join(f"{host}:{port}" for host, port in cluster.startup_nodes[1:])
    return base_settings(
        cluster.url,
        analytics_key_prefix=prefix,
        analytics_redis_cluster=True,
        analytics_redis_cluster_nodes=others,
        analytics_queue_shards=shards,
        database_url=database_url,
        broker_url=broker_url,
        **changes,
    )


@contextlib.contextmanager
def sync_client(settings: Settings) -> Iterator[redis.Redis | redis.cluster.RedisCluster]:
    """A blocking client for the test's own reads: redis-py's cluster client on a cluster (every
    startup node, so it connects while one is dead), else a plain one."""
    client: redis.Redis | redis.cluster.RedisCluster
    if settings.analytics_redis_cluster:
        nodes = [
            redis.cluster.ClusterNode(host, port)  # type: ignore[no-untyped-call]
            for host, port in (*_url_node(settings), *settings.cluster_startup_nodes)
        ]
        client = redis.cluster.RedisCluster(startup_nodes=nodes, socket_timeout=10)
    else:
        client = redis.Redis.from_url(settings.redis_dsn, socket_timeout=10)
    try:
        yield client
    finally:
        client.close()


def _url_node(settings: Settings) -> list[tuple[str, int]]:
    address = settings.redis_dsn.split("://", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
    host, _, port = address.rpartition(":")
    return [(host, int(port))]


def shards_of(settings: Settings, counts: Iterable[int] = ()) -> tuple[QueueKeys, ...]:
    """Every shard a drain must visit: K = 1, the settings' K, ``counts`` and every recorded K."""
    prefix = settings.analytics_key_prefix
    with sync_client(settings) as client:
        recorded: Any = client.smembers(QueueKeys(prefix).shard_counts)
    every = {1, settings.analytics_queue_shards, *counts, *(int(k) for k in recorded)}
    return all_shard_keys(prefix, sorted(every), cluster=settings.analytics_redis_cluster)


def backlog(settings: Settings, counts: Iterable[int] = ()) -> tuple[int, int]:
    """(events queued, leases held) summed over every shard."""
    shards = shards_of(settings, counts)
    with sync_client(settings) as client:
        queued = sum(int(client.llen(keys.queue)) for keys in shards)
        leases = sum(int(client.zcard(keys.leases)) for keys in shards)
    return queued, leases


def collect_shards(settings: Settings, counts: Iterable[int] = ()) -> Outcome:
    """:func:`.ledger.collect` over every shard: dead letters, counters and leftovers summed, the
    per-batch hashes keyed ``<shard prefix>/<batch>``; the rows from the settings' database."""
    from .tools import db_fetchval

    dead: list[dict[str, Any]] = []
    stats: Counter[str] = Counter()
    dropped = queued = leases = 0
    inflight: list[str] = []
    reclaims: dict[str, str] = {}
    owners: dict[str, str] = {}
    with sync_client(settings) as client:
        for keys in shards_of(settings, counts):
            c: Any = client
            dead += [msgspec.json.decode(raw) for raw in c.lrange(keys.dead, 0, -1)]
            dropped += int(c.get(keys.dropped) or 0)
            for name, value in c.hgetall(keys.stats).items():
                with contextlib.suppress(ValueError):  # counters only: not last_flush_at's text
                    stats[name.decode()] += int(value)
            queued += int(c.llen(keys.queue))
            leases += int(c.zcard(keys.leases))
            inflight += [k.decode() for k in c.scan_iter(match=keys.inflight("*"), count=1000)]
            for name, target in ((keys.reclaims, reclaims), (keys.owners, owners)):
                target.update({f"{keys.prefix}/{k.decode()}": v.decode() for k, v in c.hgetall(name).items()})
    ids = db_fetchval(settings, "SELECT coalesce(array_agg(event_id::text), '{}') FROM analytics_events")
    rows = [str(i) for i in ids]
    return Outcome(
        rows=rows,
        row_count=len(rows),
        dead=dead,
        dropped=dropped,
        stats={k: str(v) for k, v in stats.items()},
        queued=queued,
        leases=leases,
        inflight_keys=inflight,
        reclaims=reclaims,
        owners=owners,
    )


def quiesce_shards(settings: Settings, counts: Iterable[int] = (), timeout: float = 60.0) -> dict[str, int]:
    """:func:`.ledger.quiesce` over every shard: drain (in this process, a short visibility timeout,
    so the leases of the scenario's dead drains are taken over) until nothing is queued or leased.
    Run it once the scenario's workers are stopped."""
    from bridge.drain import drain

    counts = tuple(counts)
    # the drains push nothing a client waits on: no replica acks (their timeout must stay under the
    # short Redis timeout quick() sets)
    fast = quick(settings.replace(analytics_replica_acks=0))
    totals: Counter[str] = Counter()
    deadline = time.monotonic() + timeout
    while True:
        summary = asyncio.run(drain(fast))
        totals.update({k: v for k, v in summary.as_dict().items() if isinstance(v, int)})
        queued, leases = backlog(settings, counts)
        if not queued and not leases:
            return dict(totals)
        if time.monotonic() > deadline:
            raise AssertionError(f"not quiet after {timeout}s: queued={queued} leases={leases}")
        time.sleep(0.2)  # a dead drain's lease is reclaimable once its visibility timeout passed


class Producers:
    """``processes`` producer processes (``coroutines`` track() loops each, for ``duration`` s),
    starting together; their outcomes become a :class:`~.ledger.Ledger`. Killed at :meth:`close`."""

    def __init__(
        self,
        settings: Settings,
        directory: Path,
        *,
        processes: int,
        coroutines: int,
        duration: float,
        name: str = "p",
    ) -> None:
        self.name = name
        env = settings_env(settings)
        env["PYTHONPATH"] = f"{REPO_ROOT}:{REPO_ROOT / 'tests'}"
        start_at = time.time() + 2.0  # the imports take uneven time: then all track at once
        self.outputs = [directory / f"{name}{n}.json" for n in range(processes)]
        self.log_paths = [directory / f"{name}{n}.log" for n in range(processes)]
        self.children: list[subprocess.Popen[bytes]] = []
        for n, (out, log_path) in enumerate(zip(self.outputs, self.log_paths, strict=True)):
            argv = run_in_subprocess_args(
                settings, str(out), start_at, coroutines=coroutines, duration=duration,
                tag=f"{name}{n}", from_env=True, hang_after=20.0,
            )  # fmt: skip
            with log_path.open("wb") as log:
                self.children.append(
                    subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
                )

    def running(self) -> bool:
        return any(child.poll() is None for child in self.children)

    def wait(self, timeout: float) -> tuple[Ledger, list[Production]]:
        """Wait for every process (each must exit 0), then read what each recorded."""
        deadline = time.monotonic() + timeout
        for n, child in enumerate(self.children):
            code = child.wait(max(0.1, deadline - time.monotonic()))
            assert code == 0, f"producer {self.name}{n} exited {code}:\n{self.logs()}"
        ledger, productions = Ledger(), []
        for out in self.outputs:
            production = Production.from_json(out.read_bytes())
            productions.append(production)
            ledger.accept(production.accepted)
            ledger.refuse(production.refused)
        return ledger, productions

    def logs(self) -> str:
        return "\n".join(f"==== {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.log_paths)

    def close(self) -> None:
        for child in self.children:
            if child.poll() is None:
                child.kill()
                child.wait(10)


class FlushDriver:
    """Sends a flush task every ``every`` s from a thread (what beat or the backlog trigger does in
    production), so the workers drain while the scenario's main thread injects its faults.
    :meth:`paused` holds the sends back (to build a backlog at a chosen moment)."""

    def __init__(self, settings: Settings, every: float = 0.5) -> None:
        self.settings = settings
        self.every = every
        self.sent = 0
        self._stop = threading.Event()
        self._running = threading.Event()
        self._running.set()
        self._thread = threading.Thread(target=self._run, name="flush-driver", daemon=True)

    def __enter__(self) -> FlushDriver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self._running.clear()
        try:
            yield
        finally:
            self._running.set()

    def _run(self) -> None:
        sender = TaskSender(self.settings)
        try:
            while not self._stop.wait(self.every):
                if self._running.is_set():
                    sender.send()
                    self.sent += 1
        finally:
            sender.close()


def wait_until(what: str, predicate: Callable[[], object], timeout: float, interval: float = 0.2) -> None:
    """Poll ``predicate`` until it is true; fail past ``timeout`` saying what was awaited."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
