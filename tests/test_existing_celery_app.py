"""End to end: examples/existing_celery_app run with the seed's own commands.

``celery -A api.celery_app worker --loglevel=info -Q analytics,api`` and ``celery -A api.celery_app
beat``, started from the example's folder (cwd) as real subprocesses, on a private broker: the app's
own task runs, beat drives the flush, ``client.flush_events_now()`` reaches the same worker, and the
tracked events land in PostgreSQL. The example's app keeps every setting of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import pytest
import redis
import redis.asyncio as aioredis

from analytics_sdk import AnalyticsClient, Settings
from analytics_sdk._queue import QueueKeys
from tests.helpers import wait_for
from tests.worker_proc import LOOP_ERRORS, ROOT, CeleryWorker, private_broker

EXAMPLE = ROOT / "examples" / "existing_celery_app"
EVENTS = 500


class AppProcess(CeleryWorker):
    """A celery command of the example's app (worker or beat), run from the example's folder."""

    def __init__(self, tmp_path: Path, env: dict[str, str], args: list[str], ready: str) -> None:
        super().__init__(tmp_path, env, beat=False)
        self.env["PYTHONPATH"] = os.pathsep.join([str(EXAMPLE), str(ROOT)])
        self.args = args
        self.ready = ready

    def start(self) -> None:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "api.celery_app", *self.args],
                cwd=EXAMPLE,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = 60.0) -> None:

        deadline = time.monotonic() + timeout
        while self.ready not in self.log():
            if self.process is None or self.process.poll() is not None:
                pytest.fail(f"celery {self.args[0]} exited before it was ready:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"celery {self.args[0]} not ready within {timeout}s:\n{self.log()[-3000:]}")
            time.sleep(0.1)


def _example_python(code: str, env: dict[str, str]) -> str:
    full = {k: v for k, v in os.environ.items() if not k.startswith("ANALYTICS_")}
    full.update(env)
    full["PYTHONPATH"] = os.pathsep.join([str(EXAMPLE), str(ROOT)])
    done = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=EXAMPLE,
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.e2e
@pytest.mark.timeout(240)
async def test_the_apps_worker_and_beat_run_its_task_and_the_flush(
    db_settings: Settings, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    keys = QueueKeys(db_settings.analytics_key_prefix)
    with private_broker(tmp_path) as broker:
        env = {
            "CELERY_BROKER_URL": broker.url,  # the app's own setting (api/celeryconfig.py)
            "API_REDIS_URL": broker.url,  # where send_welcome_email leaves its marker
            "ANALYTICS_BROKER_URL": broker.url,
            "ANALYTICS_REDIS_URL": db_settings.redis_dsn,
            "ANALYTICS_KEY_PREFIX": keys.prefix,
            "ANALYTICS_DATABASE_URL": db_settings.database_url,
            "ANALYTICS_FLUSH_INTERVAL": "1",
        }
        worker = AppProcess(
            tmp_path,
            env,
            ["worker", "--loglevel=info", "-Q", "analytics,api", "--concurrency=2", "-n", "api-test@%h"],
            ready=" ready.",
        )
        beat = AppProcess(
            tmp_path,
            env,
            ["beat", "--loglevel=info", "-s", str(tmp_path / "beat-schedule")],
            ready="beat: Starting",
        )
        try:
            worker.start()
            worker.wait_ready()
            beat.start()
            beat.wait_ready()
            # The app's own task, sent the app's own way (its route: queue "api").
            task_id = _example_python(
                "from api.tasks import send_welcome_email; print(send_welcome_email.delay('42').id)", env
            )
            async with AnalyticsClient(db_settings.replace(broker_url=broker.url)) as client:
                tracked = set(
                    await client.track_many(
                        [{"event_type": "signup", "user_id": str(i)} for i in range(EVENTS)]
                    )
                )
                # the SDK's on-demand flush reaches the app's worker through the same broker
                flush_id = await client.flush_events_now()
            with redis.Redis.from_url(broker.url) as marker:
                await wait_for(lambda: marker.exists("api:welcome:42"), timeout=60, message="user task ran")
            conn = await asyncpg.connect(db_settings.database_url)
            try:

                async def landed() -> bool:
                    return int(await conn.fetchval("SELECT count(*) FROM analytics_events")) == EVENTS

                await wait_for(landed, timeout=120, interval=0.25, message=f"{EVENTS} rows in PostgreSQL")
                stored = {
                    str(r["event_id"]) for r in await conn.fetch("SELECT event_id FROM analytics_events")
                }
                assert stored == tracked
            finally:
                await conn.close()
            await wait_for(lambda: _quiet(redis_client, keys), timeout=30, message="leases released")
            assert await redis_client.llen(keys.dead) == 0
            # beat scheduled more than one flush after the events landed
            await wait_for(
                lambda: (
                    beat.log().count("Sending due task flush-analytics-events (flush_analytics_events)") >= 2
                ),
                timeout=30,
                message="beat sending the flush",
            )
        finally:
            beat_code = beat.stop()
            worker_code = worker.stop()
    log = worker.log()
    assert worker_code == 0, log[-3000:]
    assert beat_code == 0, beat.log()[-3000:]
    assert f"Task api.tasks.send_welcome_email[{task_id}] succeeded" in log
    assert f"Task flush_analytics_events[{flush_id}] succeeded" in log
    assert log.count("Task flush_analytics_events[") >= 2  # beat's too
    assert "start-up check: Redis 7." in log and "is migrated" in log
    assert "WARNING" not in log, log[-3000:]  # the example's configuration is the recommended one
    assert "Traceback" not in log, log[-5000:]
    for message in LOOP_ERRORS:
        assert message not in log


async def _quiet(redis_client: aioredis.Redis, keys: QueueKeys) -> bool:
    return not await redis_client.zcard(keys.leases) and not await redis_client.llen(keys.queue)


def test_the_example_app_keeps_its_own_settings(db_settings: Settings) -> None:
    """The app after bridge.install against the same app built from its config without it: every
    setting equal except task_routes and beat_schedule, which only gained the flush's and the
    partition maintenance's entries."""
    code = """
import json
from celery import Celery
import api.celery_app as m

before = Celery("api", include=["api.tasks"])
before.config_from_object("api.celeryconfig")
after = m.app
diff = sorted(k for k in set(before.conf) | set(after.conf) if before.conf.get(k) != after.conf.get(k))
import api.tasks
print(json.dumps({
    "diff": diff,
    "routes": after.conf.task_routes,
    "beat": {k: [v["task"], getattr(v["schedule"], "total_seconds", v["schedule"].__repr__)()]
             for k, v in after.conf.beat_schedule.items()},
    "serializer": [after.conf.task_serializer, after.tasks["api.tasks.send_welcome_email"].serializer,
                   after.tasks["flush_analytics_events"].serializer],
    "queue": after.amqp.router.route({}, "api.tasks.send_welcome_email")["queue"].name,
}))
"""
    env = {"CELERY_BROKER_URL": "redis://127.0.0.1:1/0", "ANALYTICS_FLUSH_INTERVAL": "7"}
    out = json.loads(_example_python(code, env))
    assert out["diff"] == ["beat_schedule", "task_routes"]
    assert out["routes"] == {
        "flush_analytics_events": {"queue": "analytics", "serializer": "json"},
        "api.tasks.*": {"queue": "api"},
        "analytics.maintain_partitions": {"queue": "analytics", "serializer": "json"},
    }
    assert out["beat"] == {
        "flush-analytics-events": ["flush_analytics_events", 7.0],
        "maintain-analytics-partitions": [
            "analytics.maintain_partitions",
            "<crontab: 7 3 * * * (m/h/dM/MY/d)>",
        ],
    }
    assert out["serializer"] == ["json", "json", "json"]
    assert out["queue"] == "api"
