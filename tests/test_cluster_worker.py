"""A real `celery -A bridge worker -B` on a Redis Cluster with RabbitMQ as its broker (issue 9, item 7):
it starts (version checked on every primary, scripts loaded), and its beat-driven drains land the
events of all 6 shards, with no CROSSSLOT and no traceback in its log."""

from __future__ import annotations

from pathlib import Path

import pytest

from analytics_sdk import Settings
from tests.cluster import ThrowawayCluster, redis_cluster  # noqa: F401 - the fixture
from tests.helpers import row_count, wait_for
from tests.test_cluster_drain import fill
from tests.test_rabbitmq_broker import rabbit_vhost  # noqa: F401 - the fixture
from tests.worker_proc import LOOP_ERRORS, CeleryWorker


@pytest.mark.e2e
@pytest.mark.timeout(180)
async def test_a_worker_on_the_cluster_with_rabbitmq_drains_every_shard(
    db_settings: Settings,
    redis_cluster: ThrowawayCluster,  # noqa: F811
    rabbit_vhost: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    nodes = ",".join(f"{h}:{p}" for h, p in redis_cluster.startup_nodes)
    settings = db_settings.replace(
        redis_url=redis_cluster.url,
        analytics_redis_cluster=True,
        analytics_redis_cluster_nodes=nodes,
        analytics_queue_shards=6,
        broker_url=rabbit_vhost,
    )
    env = {
        "ANALYTICS_BROKER_URL": rabbit_vhost,
        "ANALYTICS_REDIS_URL": redis_cluster.url,
        "ANALYTICS_REDIS_CLUSTER": "true",
        "ANALYTICS_REDIS_CLUSTER_NODES": nodes,
        "ANALYTICS_QUEUE_SHARDS": "6",
        "ANALYTICS_KEY_PREFIX": settings.analytics_key_prefix,
        "ANALYTICS_DATABASE_URL": settings.database_url,
        "ANALYTICS_FLUSH_INTERVAL": "1",
    }
    per_shard = [40, 3, 0, 77, 12, 9]
    await fill(settings, per_shard, "worker")
    worker = CeleryWorker(tmp_path, env, beat=True)
    try:
        worker.start()
        worker.wait_ready()

        async def landed() -> bool:
            return await row_count(settings.database_url) == sum(per_shard)

        await wait_for(landed, timeout=60, message=f"rows from every shard; log:\n{worker.log()[-3000:]}")
    finally:
        assert worker.stop() is not None
    log = worker.log()
    assert "start-up check: Redis 7." in log, log[-3000:]
    assert "CROSSSLOT" not in log and "Traceback" not in log, log[-3000:]
    assert not [marker for marker in LOOP_ERRORS if marker in log], log[-3000:]
