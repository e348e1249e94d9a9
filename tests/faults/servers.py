"""Throwaway PostgreSQL clusters for the fault suite (Redis comes from the shared tests/servers.py).

A cluster is initdb'd into a fresh temporary folder and run with ``pg_ctl`` on a free port, so a
scenario can stop, kill and restart it without touching the machine's PostgreSQL on 5432. initdb
and postgres refuse to run as root; when we are root they run as the ``postgres`` OS user, which is
why the folder lives directly under the system temp dir (pytest's tmp_path is root-only, 0700).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import asyncpg
from servers import RedisServer, free_port, start_redis

__all__ = ["PostgresServer", "RedisServer", "free_port", "pg_bin", "start_postgres", "start_redis"]

_PG_ROOT = Path("/usr/lib/postgresql")
_START_TIMEOUT = 30


def pg_bin() -> Path:
    """The newest installed PostgreSQL's bin folder (its tools are not on PATH on Debian)."""
    versions = sorted((p for p in _PG_ROOT.glob("*/bin") if (p / "pg_ctl").exists()), key=_version)
    if not versions:
        raise RuntimeError(f"no PostgreSQL under {_PG_ROOT} (apt-get install postgresql)")
    return versions[-1]


def _version(path: Path) -> tuple[int, ...]:
    return tuple(int(x) for x in path.parent.name.split(".") if x.isdigit())


def _as_postgres(args: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *args]
    return args


class PostgresServer:
    """One throwaway PostgreSQL cluster on 127.0.0.1:``port`` (user ``postgres``, trust auth)."""

    def __init__(self, directory: Path, port: int) -> None:
        self.directory = directory
        self.port = port
        self.bin = pg_bin()

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def log_path(self) -> Path:
        return self.directory / "postgres.log"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def __repr__(self) -> str:
        return f"<PostgresServer 127.0.0.1:{self.port} {self.data}>"

    def _run(self, *args: str, timeout: float = 60) -> None:
        command = _as_postgres([str(self.bin / args[0]), *args[1:]])
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            detail = f"{done.stderr[-2000:]}{self._log_tail()}"
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {detail}")

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")

    def start(self) -> None:
        """Start (or restart, on the same port) and wait until it accepts connections."""
        options = (
            f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 "
            # Durability of the throwaway cluster itself is not under test: no scenario crashes it.
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log_path), "-w", "-t", str(_START_TIMEOUT),
            "-o", options, "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """``fast`` disconnects clients and shuts down cleanly; ``immediate`` is a crash."""
        if self.running:
            self._run("pg_ctl", "-D", str(self.data), "-w", "-t", str(_START_TIMEOUT), "-m", mode, "stop")

    @property
    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def destroy(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.stop("immediate")
        shutil.rmtree(self.directory, ignore_errors=True)

    def _log_tail(self) -> str:
        try:
            return "\n" + self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    async def create_database(self, name: str) -> str:
        """CREATE DATABASE ``name`` and migrate it with the bridge's schema; returns its URL."""
        from bridge.schema import migrate

        conn = await asyncpg.connect(self.url(), timeout=10)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        url = self.url(name)
        await migrate(url)
        return url

    def create_database_sync(self, name: str) -> str:
        return asyncio.run(self.create_database(name))


def start_postgres() -> PostgresServer:
    """initdb and start a throwaway cluster on a free port; the caller calls ``destroy()``."""
    directory = Path(tempfile.mkdtemp(prefix="afpg-"))  # short: the socket path has a 107-byte limit
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(directory, user.pw_uid, user.pw_gid)
    last: Exception | None = None
    for _ in range(5):  # the free port may be taken between the probe and the bind: retry
        server = PostgresServer(directory, free_port())
        try:
            if not server.data.exists():
                server.init()
            server.start()
        except RuntimeError as exc:
            last = exc
            continue
        return server
    shutil.rmtree(directory, ignore_errors=True)
    raise RuntimeError(f"could not start a throwaway PostgreSQL: {last}")
