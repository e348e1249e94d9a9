"""Issue 9 item 7: next to a Redis Cluster the Celery broker must be RabbitMQ or a separate Redis
(kombu's Redis transport cannot use a cluster). Refused with a ConfigurationError naming the variable
in install(), at worker start-up and in `flush`; and the preflight checks every primary's version."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from celery import Celery
from celery.signals import celeryd_after_setup
from click.testing import CliRunner

import bridge
from analytics_sdk import ConfigurationError, Settings
from bridge import _worker_start
from bridge._broker import check_broker
from bridge._preflight import check_redis
from bridge.cli import main
from tests.cluster import ThrowawayCluster, redis_cluster  # noqa: F401 - the fixture

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_URL = "redis://127.0.0.1:7001/0"
NODES = "127.0.0.1:7002,localhost:7003"


def cluster(**changes: object) -> Settings:
    return Settings(
        redis_url=CLUSTER_URL, analytics_redis_cluster=True, analytics_redis_cluster_nodes=NODES, **changes
    )


def test_a_missing_broker_url_is_refused_with_the_cluster() -> None:
    with pytest.raises(ConfigurationError) as caught:
        check_broker(cluster())
    assert caught.value.variable == "ANALYTICS_BROKER_URL"
    message = str(caught.value)
    assert "must be set with ANALYTICS_REDIS_CLUSTER=true" in message
    assert "RabbitMQ" in message and "separate, non-cluster Redis" in message and "CROSSSLOT" in message


@pytest.mark.parametrize(
    "broker",
    [
        "redis://127.0.0.1:7001/1",  # the URL's node, another database: still the cluster
        "redis://localhost:7001/0",
        "redis://:secret@127.0.0.1:7003/0",  # a node named in ANALYTICS_REDIS_CLUSTER_NODES
        "rediss://127.0.0.1:7002",
        "amqp://guest@127.0.0.1//;redis://127.0.0.1:7002/0",  # a failover list with a node in it
    ],
)
def test_a_broker_on_the_cluster_is_refused(broker: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        check_broker(cluster(broker_url=broker))
    assert caught.value.variable == "ANALYTICS_BROKER_URL"
    assert "points at the Redis Cluster" in str(caught.value) and "RabbitMQ" in str(caught.value)
    assert "secret" not in str(caught.value)  # the URL is shown redacted


@pytest.mark.parametrize(
    "broker", ["amqp://guest:guest@127.0.0.1:5672//", "redis://127.0.0.1:6379/0", "redis://10.0.0.9:7001/0"]
)
def test_rabbitmq_or_a_separate_redis_is_accepted(broker: str) -> None:
    check_broker(cluster(broker_url=broker))


def test_without_the_cluster_the_redis_url_is_a_fine_broker() -> None:
    check_broker(Settings(redis_url=CLUSTER_URL))


@pytest.fixture
def cluster_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ANALYTICS_TASK_TIME_LIMIT", "ANALYTICS_TASK_SOFT_TIME_LIMIT", "ANALYTICS_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ANALYTICS_REDIS_URL", CLUSTER_URL)
    monkeypatch.setenv("ANALYTICS_REDIS_CLUSTER", "true")


def test_install_refuses_and_leaves_the_app_as_it_was(
    cluster_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = Celery("theirs", broker="amqp://guest:guest@127.0.0.1:5672//", set_as_current=False)
    routes = app.conf.task_routes
    with pytest.raises(ConfigurationError, match="ANALYTICS_BROKER_URL=None: must be set"):
        bridge.install(app)
    assert app.conf.task_routes == routes and "flush_analytics_events" not in app.tasks
    # the SDK's broker set, but the app's own broker is the cluster: refused too
    monkeypatch.setenv("ANALYTICS_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
    theirs = Celery("theirs", broker="redis://127.0.0.1:7001/2", set_as_current=False)
    with pytest.raises(ConfigurationError, match=r"^broker_url='redis://127\.0\.0\.1:7001/2': points at"):
        bridge.install(theirs)
    bridge.install(app)  # RabbitMQ for both: fine


def test_a_worker_whose_broker_moved_onto_the_cluster_refuses_to_start(
    cluster_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANALYTICS_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
    app = Celery("moved", broker="amqp://guest:guest@127.0.0.1:5672//", set_as_current=False)
    bridge.install(app)
    app.conf.broker_url = "redis://localhost:7001/0"  # changed after install
    with pytest.raises(SystemExit) as stopped:
        celeryd_after_setup.send(sender="w@host", instance=SimpleNamespace(app=app), conf=app.conf)
    assert stopped.value.code == 2
    assert _worker_start.installed(app) is not None


def test_the_bridges_own_worker_refuses_at_start_up() -> None:
    env = {**os.environ, "ANALYTICS_REDIS_URL": CLUSTER_URL, "ANALYTICS_REDIS_CLUSTER": "true"}
    env.pop("ANALYTICS_BROKER_URL", None)
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "bridge", "worker", "--pool", "solo", "-Q", "analytics"],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "ANALYTICS_BROKER_URL=None: must be set with ANALYTICS_REDIS_CLUSTER=true" in proc.stderr, (
        proc.stderr
    )


def test_flush_refuses_before_it_connects() -> None:
    env = {"ANALYTICS_REDIS_URL": CLUSTER_URL, "ANALYTICS_REDIS_CLUSTER": "true", "ANALYTICS_BROKER_URL": ""}
    result = CliRunner().invoke(main, ["flush"], env=env)
    assert result.exit_code == 2, result.output
    assert "ANALYTICS_BROKER_URL" in result.output and "RabbitMQ" in result.output


async def test_the_preflight_asks_every_primary_of_the_cluster(redis_cluster: ThrowawayCluster) -> None:  # noqa: F811
    settings = Settings(redis_url=redis_cluster.url, analytics_redis_cluster=True)
    version = await check_redis(settings, load=True)
    assert version.startswith("7.")
