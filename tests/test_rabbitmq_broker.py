"""RabbitMQ as the Celery broker (docs/deployment.md): a real worker consuming from RabbitMQ drains the
events that `flush_events_now()` and a standalone `celery -A bridge beat` ask for.

Each test gets a RabbitMQ virtual host of its own (made and deleted with rabbitmqctl), so the queue
`analytics` of this run never meets another run's worker or tasks on the shared server.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from analytics_sdk import AnalyticsClient, Settings
from tests.helpers import wait_for
from tests.worker_proc import LOOP_ERRORS, ROOT, CeleryWorker

RABBIT_HOST, RABBIT_PORT = "127.0.0.1", 5672
START_RABBIT = "start it with `rabbitmq-server -detached` (then `rabbitmqctl await_startup`)"


def _rabbitmqctl(*args: str) -> None:
    proc = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, f"rabbitmqctl {' '.join(args)} failed: {proc.stdout}{proc.stderr}"


@pytest.fixture
def rabbit_vhost() -> Iterator[str]:
    """The broker URL of a fresh virtual host on the machine's RabbitMQ (guest/guest)."""
    try:
        socket.create_connection((RABBIT_HOST, RABBIT_PORT), timeout=5).close()
    except OSError as exc:
        pytest.fail(f"RabbitMQ is not answering on {RABBIT_HOST}:{RABBIT_PORT} ({exc}): {START_RABBIT}")
    vhost = f"analytics-test-{uuid.uuid4().hex[:8]}"
    _rabbitmqctl("add_vhost", vhost)
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@{RABBIT_HOST}:{RABBIT_PORT}/{vhost}"
    finally:
        _rabbitmqctl("delete_vhost", vhost)


@contextlib.contextmanager
def beat(tmp_path: Path, env: dict[str, str]) -> Iterator[Path]:
    """`celery -A bridge beat` as its own process, as a deployment runs it; yields its log file."""
    log_path = tmp_path / "beat.log"
    worker_env = CeleryWorker(tmp_path, env, beat=False).env  # the same environment a worker gets
    args = [sys.executable, "-m", "celery", "-A", "bridge", "beat", "--loglevel=INFO"]
    args += ["--schedule", str(tmp_path / "celerybeat-schedule")]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            args, cwd=ROOT, env=worker_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield log_path
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


async def _rows(database_url: str, event_type: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return int(
            await conn.fetchval("SELECT count(*) FROM analytics_events WHERE event_type = $1", event_type)
        )
    finally:
        await conn.close()


@pytest.mark.e2e
@pytest.mark.timeout(180)
async def test_a_worker_on_rabbitmq_drains_what_flush_events_now_and_beat_ask_for(
    db_settings: Settings, rabbit_vhost: str, tmp_path: Path
) -> None:
    env = {
        "ANALYTICS_BROKER_URL": rabbit_vhost,
        "ANALYTICS_REDIS_URL": db_settings.redis_dsn,
        "ANALYTICS_KEY_PREFIX": db_settings.analytics_key_prefix,
        "ANALYTICS_DATABASE_URL": db_settings.database_url,
        "ANALYTICS_FLUSH_INTERVAL": "1",
    }
    # The application's trigger stays off (the settings fixture): only the calls below ask for drains.
    settings = db_settings.replace(broker_url=rabbit_vhost)
    worker = CeleryWorker(tmp_path, env, beat=False)
    try:
        worker.start()
        worker.wait_ready()
        assert f"amqp://guest:**@{RABBIT_HOST}:{RABBIT_PORT}/" in worker.log(), worker.log()[-2000:]

        # 1. the application asks: flush_events_now() publishes the task to RabbitMQ
        async with AnalyticsClient(settings) as client:
            await client.track_many([{"event_type": "rabbit_now", "user_id": str(i)} for i in range(50)])
            await client.flush_events_now()
        await wait_for(
            lambda: _rows(db_settings.database_url, "rabbit_now"),
            timeout=30,
            message=f"50 rows after flush_events_now() through RabbitMQ; worker log:\n{worker.log()[-3000:]}",
        )
        assert await _rows(db_settings.database_url, "rabbit_now") == 50

        # 2. nobody asks but beat (its own process, as deployed): its ticks go through RabbitMQ too
        async with AnalyticsClient(settings) as client:
            await client.track_many([{"event_type": "rabbit_beat", "user_id": str(i)} for i in range(50)])
        with beat(tmp_path, env) as beat_log:

            async def all_rows() -> bool:
                return await _rows(db_settings.database_url, "rabbit_beat") == 50

            await wait_for(
                all_rows,
                timeout=60,
                message="50 rows from beat's ticks; beat log:\n"
                f"{beat_log.read_text(errors='replace')[-2000:]}\nworker log:\n{worker.log()[-3000:]}",
            )
    finally:
        assert worker.stop() is not None
    log = worker.log()
    assert not [marker for marker in LOOP_ERRORS if marker in log], log[-3000:]
    assert "Traceback" not in log, log[-3000:]
