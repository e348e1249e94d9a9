"""The demo's infrastructure: service checks and one `celery -A bridge worker -B` subprocess.

The worker runs in a session (process group) of its own, so a Ctrl-C in the terminal reaches only the
demo, which then stops the worker itself: SIGTERM to the PID it started (Celery's warm shutdown, which
finishes the running drain and stops the pool and the embedded beat), then, past a deadline, SIGKILL
to that same process group, which holds only the worker and the children it forked.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import redis

from analytics_sdk._settings import Settings, redact_url

from .._errors import RedisTooOld
from .._preflight import check_redis_version
from ..cli._status import START_POSTGRES, START_REDIS
from ..schema import asyncpg_dsn

__all__ = ["DemoError", "Worker", "broker_for_demo", "check_postgres", "check_redis"]

#: The demo's Celery broker database: not the one an application's real worker listens on, so neither
#: takes the other's flush tasks. ANALYTICS_BROKER_URL overrides it.
DEMO_BROKER_DB = 15
_PROJECT_ROOT = Path(__file__).resolve().parent.parent


class DemoError(Exception):
    """The demo cannot go on; the message says what to do."""


def check_redis(settings: Settings) -> None:
    url = redact_url(settings.redis_dsn)
    try:
        with redis.Redis.from_url(settings.redis_dsn, socket_connect_timeout=3, socket_timeout=3) as probe:
            version = str(probe.info("server")["redis_version"])
    except redis.RedisError as exc:
        raise DemoError(
            f"Redis at {url} does not answer ({exc}).\nStart it:\n  {START_REDIS}\n"
            "or point ANALYTICS_REDIS_URL (or ANALYTICS_REDIS_HOST, _PORT, _DB, _PASSWORD) at a running one."
        ) from None
    try:
        check_redis_version(version, f"Redis at {url}")
    except RedisTooOld as exc:
        raise DemoError(str(exc)) from None


async def _probe_postgres(database_url: str) -> None:
    try:
        conn = await asyncpg.connect(asyncpg_dsn(database_url), timeout=5)
    except asyncpg.InvalidCatalogNameError:
        return  # the server answers; migrate creates the database
    await conn.close()


def check_postgres(settings: Settings) -> None:
    url = redact_url(settings.database_url)
    try:
        asyncio.run(_probe_postgres(settings.database_url))
    except (OSError, asyncpg.CannotConnectNowError) as exc:
        raise DemoError(
            f"PostgreSQL at {url} does not answer ({exc}).\nStart it:\n  {START_POSTGRES}\n"
            "or point ANALYTICS_DATABASE_URL (postgresql://user:password@host:port/database)"
            " at a running one."
        ) from None
    except asyncpg.PostgresError as exc:
        raise DemoError(
            f"PostgreSQL at {url} refused the connection ({exc}).\n"
            "Set ANALYTICS_DATABASE_URL with a user that may create databases, e.g. "
            "postgresql://postgres@127.0.0.1:5432/analytics"
        ) from None


def broker_for_demo(settings: Settings, environ: dict[str, str]) -> str:
    """ANALYTICS_BROKER_URL if set, else the Redis URL with database DEMO_BROKER_DB (14 if that is taken)."""
    if environ.get("ANALYTICS_BROKER_URL"):
        return environ["ANALYTICS_BROKER_URL"]
    parts = urlsplit(settings.redis_dsn)
    if parts.scheme == "unix":
        return settings.redis_dsn  # a socket URL carries its db in the query; keep it as it is
    current = parts.path.strip("/") or "0"
    db = DEMO_BROKER_DB if current != str(DEMO_BROKER_DB) else DEMO_BROKER_DB - 1
    return urlunsplit(parts._replace(path=f"/{db}"))


class Worker:
    """One `celery -A bridge worker -B -Q analytics` subprocess with its log in ``workdir``."""

    def __init__(self, env: dict[str, str], workdir: Path, concurrency: int = 2) -> None:
        self.env = dict(env)
        # Importable as `bridge` whether the project is installed or run from a checkout.
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PROJECT_ROOT), env.get("PYTHONPATH")) if p)
        self.log_path = workdir / "worker.log"
        self.schedule_path = workdir / "beat-schedule"
        self.concurrency = concurrency
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, *, beat: bool = True) -> None:
        """Start it; ``beat`` embeds Celery beat (-B), with its schedule file in ``workdir``."""
        command = [
            sys.executable, "-m", "celery", "-A", "bridge", "worker", "-Q", "analytics",
            "--concurrency", str(self.concurrency), "--loglevel", "INFO",
            "--hostname", f"demo-{os.getpid()}-{id(self):x}@%h",
        ]  # fmt: skip
        if beat:
            command += ["-B", "--schedule-filename", str(self.schedule_path)]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env, start_new_session=True,
            )  # fmt: skip

    def tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no worker log)"
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise DemoError(
                f"the worker exited with code {self.proc.returncode}; its log ends:\n{self.tail()}"
            )

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Block until the worker logs that it is ready; returns the seconds it took."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            self.check_alive()
            try:
                if " ready." in self.log_path.read_text(errors="replace"):
                    return time.monotonic() - started
            except OSError:
                pass
            time.sleep(0.2)
        raise DemoError(f"the worker was not ready within {timeout:.0f}s; its log ends:\n{self.tail()}")

    def stop(self, deadline: float = 15.0) -> int | None:
        """SIGTERM, wait up to ``deadline`` s, then SIGKILL its process group. Returns the exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(deadline)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # the group we created: the worker and its pool
                proc.wait(10)
        # Pool children whose parent died unexpectedly: the group still exists only if any is left.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        return proc.returncode
