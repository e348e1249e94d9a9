"""A real ``celery -A bridge worker`` subprocess for the bridge's end-to-end tests.

The worker runs in its own session (process group), so a stop that has to fall back to SIGKILL
takes its pool children with it, and nothing else. Its output goes to a log file the test can read.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.servers import RedisServer, start_redis

ROOT = Path(__file__).resolve().parent.parent
_READY_TIMEOUT = 60.0
_STOP_TIMEOUT = 30.0
# Output that would mean an async object crossed an event loop or a fork.
LOOP_ERRORS = ("attached to a different loop", "Event loop is closed", "Future exception was never retrieved")


class CeleryWorker:
    def __init__(self, tmp_path: Path, env: Mapping[str, str], *, beat: bool, concurrency: int = 2) -> None:
        self.tmp_path = tmp_path
        self.log_path = tmp_path / f"worker-{uuid.uuid4().hex[:6]}.log"
        self.env = {k: v for k, v in os.environ.items() if k != "ANALYTICS_FAILPOINTS"}
        self.env.update({"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **env})
        self.beat = beat
        self.concurrency = concurrency
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [sys.executable, "-m", "celery", "-A", "bridge", "worker", "-Q", "analytics"]
        args += ["--loglevel=info", f"--concurrency={self.concurrency}", f"-n test-{uuid.uuid4().hex[:8]}@%h"]
        args += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
        if self.beat:
            args += ["-B", "-s", str(self.tmp_path / "beat-schedule")]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                args, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_ready(self, timeout: float = _READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while " ready." not in self.log():
            if self.process is None or self.process.poll() is not None:
                pytest.fail(f"the celery worker exited before it was ready:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"the celery worker was not ready within {timeout}s:\n{self.log()[-3000:]}")
            time.sleep(0.1)

    def stop(self) -> int | None:
        """SIGTERM (warm shutdown), wait with a deadline, SIGKILL the worker's group past it."""
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        # Pool children orphaned by a dead parent would still be in the group we created.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        return process.returncode


@contextlib.contextmanager
def celery_worker(tmp_path: Path, env: Mapping[str, str], *, beat: bool) -> Iterator[CeleryWorker]:
    worker = CeleryWorker(tmp_path, env, beat=beat)
    try:
        worker.start()
        worker.wait_ready()
        yield worker
    finally:
        worker.stop()


@contextlib.contextmanager
def private_broker(tmp_path: Path) -> Iterator[RedisServer]:
    """A throwaway redis-server as the Celery broker: the queue "analytics" and kombu's keys of this
    test can then never meet another test run's worker or tasks on the shared Redis."""
    server = start_redis(tmp_path)
    try:
        yield server
    finally:
        server.stop()


def broker_messages(broker: RedisServer) -> list[dict[str, Any]]:
    """The Celery messages waiting in a private broker's "analytics" queue, newest first."""
    with broker.client() as client:
        return [json.loads(raw) for raw in client.lrange("analytics", 0, -1)]
