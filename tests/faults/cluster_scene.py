"""What the cluster scenarios share: the :class:`Scene` fixture (a fresh migrated database, a RabbitMQ
virtual host as the Celery broker, the scenario's celery processes and a folder), and the steps they
end with: wait for the workers to drain every shard, stop them, quiesce, read the outcome, and check
that nothing said CROSSSLOT. A test module imports ``scene_fixture`` (the fixture ``scene``) and
``rabbit_vhost`` (tests/test_rabbitmq_broker.py), which it asks for."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from analytics_sdk import Settings
from tests.cluster import ThrowawayCluster

from .cluster_tools import Producers, backlog, cluster_settings, collect_shards, quiesce_shards, wait_until
from .conftest import Fleet, new_database
from .ledger import Outcome
from .producer import Production
from .servers import PostgresServer

__all__ = ["Scene", "drained_by_workers", "finish", "new_prefix", "no_crossslot", "scene_fixture"]


def new_prefix() -> str:
    return f"cl{uuid.uuid4().hex[:8]}"


def no_crossslot(fleet: Fleet, producers: Producers, productions: list[Production]) -> None:
    """Neither a worker's whole log, nor a producer's, nor a producer's recorded errors say CROSSSLOT."""
    for where, text in (
        ("the workers' logs", "\n".join(process.log() for process in fleet.processes)),
        ("the producers' logs", "\n".join(path.read_text(errors="replace") for path in producers.log_paths)),
        ("the producers' errors", "\n".join(e for p in productions for e in p.errors)),
    ):
        at = text.find("CROSSSLOT")
        assert at < 0, f"CROSSSLOT in {where}:\n{text[max(0, at - 2000) : at + 1000]}"


def drained_by_workers(settings: Settings, counts: tuple[int, ...] = (), timeout: float = 90.0) -> None:
    wait_until(
        "the workers to drain every shard (nothing queued, nothing leased)",
        lambda: backlog(settings, counts) == (0, 0),
        timeout,
    )


def finish(fleet: Fleet, settings: Settings, counts: tuple[int, ...] = ()) -> tuple[dict[str, int], Outcome]:
    """Stop the workers (warm), then quiesce in this process and read the outcome over every shard."""
    for process in fleet.processes:
        process.stop()
    totals = quiesce_shards(settings, counts)
    return totals, collect_shards(settings, counts)


@dataclass
class Scene:
    """What every scenario gets: a fresh migrated database, a RabbitMQ virtual host as the broker,
    its celery processes and a folder for the producers' records and logs."""

    database: str
    broker: str
    fleet: Fleet
    directory: Path

    def on(
        self, cluster: ThrowawayCluster, shards: int, prefix: str | None = None, **changes: Any
    ) -> Settings:
        return cluster_settings(
            cluster, prefix=prefix or new_prefix(), shards=shards, database_url=self.database,
            broker_url=self.broker, **changes,
        )  # fmt: skip


@pytest.fixture(name="scene")
def scene_fixture(pg_cluster: PostgresServer, rabbit_vhost: str, fleet: Fleet, tmp_path: Path) -> Scene:
    return Scene(new_database(pg_cluster), rabbit_vhost, fleet, tmp_path)
