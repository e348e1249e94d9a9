"""Fixtures of the fault suite: throwaway servers, fresh databases, and a fleet of celery processes.

Every scenario gets its own redis-server (queue and Celery broker at once) on a free port, so it may
fill, kill or restart it; the suite shares one throwaway PostgreSQL cluster, with a fresh migrated
database per scenario. The scenarios that stop PostgreSQL itself take a cluster of their own
(``own_pg``). Everything a fixture starts, it stops, by PID; nothing touches the machine's services.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from analytics_sdk import Settings
from analytics_sdk._sender import TaskSender

from .servers import PostgresServer, RedisServer, start_postgres, start_redis
from .workers import CeleryProcess, settings_env, start_beat, start_worker


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresServer]:
    server = start_postgres()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def own_pg() -> Iterator[PostgresServer]:
    """A cluster this scenario alone uses: it may stop and start it."""
    server = start_postgres()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def fault_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = start_redis(tmp_path)
    try:
        yield server
    finally:
        server.stop()


def base_settings(redis_url: str, **changes: object) -> Settings:
    """Fast settings for the scenarios: short timeouts, beat effectively off, no backlog trigger."""
    values: dict[str, object] = {
        "redis_url": redis_url,
        "analytics_key_prefix": "faults",
        "analytics_backlog_trigger": False,
        "analytics_flush_interval": 3600.0,
        "analytics_redis_timeout": 2.0,
        "analytics_publish_retries": 2,
        "analytics_visibility_timeout": 30.0,
        "analytics_task_time_limit": 20.0,
        "analytics_task_soft_time_limit": 15.0,
        "analytics_drain_time_budget": 10.0,
    }
    values.update(changes)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def sdk_settings(fault_redis: RedisServer) -> Settings:
    """The throwaway Redis only: for the producer-side scenarios."""
    return base_settings(fault_redis.url)


def new_database(server: PostgresServer) -> str:
    return asyncio.run(server.create_database(f"faults_{uuid.uuid4().hex[:10]}"))


@pytest.fixture
def fault_settings(fault_redis: RedisServer, pg_cluster: PostgresServer) -> Settings:
    """The throwaway Redis plus a fresh migrated database on the shared throwaway cluster."""
    return base_settings(fault_redis.url, database_url=new_database(pg_cluster))


class Fleet:
    """The celery processes of one scenario; all are killed at teardown, their logs kept in tmp_path."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.processes: list[CeleryProcess] = []
        self._senders: list[TaskSender] = []

    def worker(
        self,
        settings: Settings,
        *,
        failpoints: str = "",
        concurrency: int = 1,
        name: str | None = None,
        extra: tuple[str, ...] = (),
        wait: bool = True,
        **env: str,
    ) -> CeleryProcess:
        name = name or f"w{len(self.processes) + 1}"
        variables = settings_env(settings, **env)
        if failpoints:
            variables["ANALYTICS_FAILPOINTS"] = failpoints
        log = self.directory / f"{name}.log"
        worker = start_worker(variables, log, concurrency=concurrency, name=name, extra=extra, wait=wait)
        self.processes.append(worker)
        return worker

    def beat(self, settings: Settings, name: str | None = None) -> CeleryProcess:
        name = name or f"beat{len(self.processes) + 1}"
        beat = start_beat(settings_env(settings), self.directory, name)
        self.processes.append(beat)
        return beat

    def send_flush(self, settings: Settings, times: int = 1) -> list[str]:
        sender = TaskSender(settings)
        self._senders.append(sender)
        return [sender.send() for _ in range(times)]

    def close(self) -> None:
        for sender in self._senders:
            sender.close()
        for process in self.processes:
            process.kill()

    def logs(self) -> str:
        return "\n".join(f"==== {p!r}\n{p.log()[-3000:]}" for p in self.processes)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path)
    try:
        yield fleet
    finally:
        fleet.close()
        # shown by pytest only when the scenario failed: the workers' side of the story
        print(fleet.logs())
