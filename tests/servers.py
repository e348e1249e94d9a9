"""Throwaway redis-server instances for tests that break, fill or stop their server.

Never touch the machine's Redis on 6379 for that: other test runs share it. Usage::

    server = start_redis(tmp_path, "--maxmemory", "2mb", "--maxmemory-policy", "noeviction")
    try:
        ...  # server.url, server.port; server.stop() / server.start() / server.kill()
    finally:
        server.stop()

or ``with start_redis(tmp_path) as server: ...``. The server runs in the foreground as our child
(``--daemonize no``), so it is stopped by its own PID, never by name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import redis

__all__ = ["RedisServer", "free_port", "primary_with_replica", "start_redis"]

_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 10.0


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it; a race is retried by start)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One redis-server child process on 127.0.0.1:``port``, with data and log under ``directory``."""

    def __init__(self, directory: Path, port: int, extra_args: tuple[str, ...]) -> None:
        self.directory = directory
        self.port = port
        self.extra_args = extra_args
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.directory / f"redis-{self.port}.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<RedisServer {self.url} {state}>"

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def client(self) -> redis.Redis:
        """A sync client for the test's own checks (close it, or use it in ``with``)."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, socket_connect_timeout=5)

    def start(self) -> None:
        """Start (or restart, on the same port) and wait until it answers PING."""
        if self.running:
            return
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH (apt-get install redis-server)")
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(self.directory),
            "--logfile", str(self.log_path),
            *self.extra_args,
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                code = self.process.returncode
                raise RuntimeError(f"redis-server on port {self.port} exited with {code}: {self._log_tail()}")
            with contextlib.suppress(redis.RedisError), self.client() as probe:
                if probe.ping():
                    return
            if time.monotonic() > deadline:
                self.kill()
                tail = self._log_tail()
                raise RuntimeError(f"redis-server on port {self.port} did not answer PING: {tail}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL past a deadline) and reap it. Idempotent."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL it, like a crash or an OOM kill. Idempotent."""
        self._signal(signal.SIGKILL)

    def _signal(self, sig: signal.Signals) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(_STOP_TIMEOUT)
        self.process = None

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"


def start_redis(tmp_path: Path, *extra_args: str) -> RedisServer:
    """Start a throwaway redis-server on a free port; ``extra_args`` go to its command line.

    The caller stops it (``server.stop()`` in a ``finally`` or a fixture's teardown).
    """
    last_error: Exception | None = None
    for _ in range(5):  # another process may grab the free port between the probe and the bind
        server = RedisServer(tmp_path / f"redis-{time.monotonic_ns()}", free_port(), tuple(extra_args))
        try:
            server.start()
        except RuntimeError as exc:
            last_error = exc
            server.stop()
            continue
        return server
    raise RuntimeError(f"could not start a throwaway redis-server: {last_error}")


@contextlib.contextmanager
def primary_with_replica(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer]]:
    """A throwaway primary and its replica, the replication link up; a replica a test froze
    (SIGSTOP) is let go before both stop."""
    primary = start_redis(tmp_path / "primary")
    replica = start_redis(tmp_path / "replica", "--replicaof", "127.0.0.1", str(primary.port))
    try:
        deadline = time.monotonic() + 30.0
        with replica.client() as direct:
            while direct.info("replication")["master_link_status"] != "up":
                if time.monotonic() > deadline:
                    raise AssertionError(f"the replica on {replica.port} never linked to {primary.port}")
                time.sleep(0.05)
        yield primary, replica
    finally:
        if replica.process is not None:
            os.kill(replica.process.pid, signal.SIGCONT)
        replica.stop()
        primary.stop()
