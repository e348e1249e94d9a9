"""`analytics-bridge`: every command against the real Redis and PostgreSQL (sync tests: the CLI runs
asyncio.run itself)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
import redis
from click.testing import CliRunner, Result

from analytics_sdk import AnalyticsClient, Settings, validate
from analytics_sdk._queue import QueueKeys, claim, dead_letter_entry, push
from bridge._cli_dead import purge_dead, replay_dead, snapshot_dead
from bridge._cli_status import redis_client
from bridge.cli import main
from tests.conftest import PG_ADMIN_URL, run_blocking
from tests.helpers import wait_for_sync
from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent


def invoke(settings: Settings, *args: str, input: str | None = None) -> Result:
    env = {
        "ANALYTICS_REDIS_URL": settings.redis_dsn,
        "ANALYTICS_KEY_PREFIX": settings.analytics_key_prefix,
        "ANALYTICS_DATABASE_URL": settings.database_url,
        "ANALYTICS_BACKLOG_TRIGGER": "0",
    }
    return CliRunner().invoke(main, list(args), env=env, input=input, catch_exceptions=False)


def status_json(settings: Settings) -> dict[str, Any]:
    result = invoke(settings, "status", "--json")
    assert result.exit_code == 0, result.output
    data: dict[str, Any] = orjson.loads(result.stdout)
    return data


def track(settings: Settings, count: int, **fields: Any) -> list[str]:
    async def go() -> list[str]:
        async with AnalyticsClient(settings) as client:
            return await client.track_many([{"event_type": "cli_test", "user_id": "u1", **fields}] * count)

    return run_blocking(go())


async def _rows(database_url: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM analytics_events"))
    finally:
        await conn.close()


def test_status_of_an_empty_queue(db_settings: Settings) -> None:
    data = status_json(db_settings)
    assert data["queue"]["depth"] == 0 and data["queue"]["oldest_age_seconds"] is None
    assert data["in_flight"]["batches"] == 0
    assert (data["dead_letters"], data["dropped"], data["last_flush"]) == (0, 0, None)
    assert data["database"]["rows"] == 0 and data["database"]["estimated"] is False
    assert "no flush recorded yet for this key prefix" in data["warnings"]


def test_status_reports_every_figure(db_settings: Settings, sync_redis: redis.Redis) -> None:
    keys = QueueKeys(db_settings.analytics_key_prefix)
    track(db_settings, 3, created_at=datetime.now(UTC) - timedelta(seconds=600))
    track(db_settings, 2)

    async def setup() -> None:
        client = redis_client(db_settings)
        try:
            await claim(client, keys, 2, "batch-under-test")  # two events in flight
            await push(client, keys, [validate({"event_type": "x"}).encode()] * 3, cap=4)  # drops 2
            await client.rpush(keys.dead, dead_letter_entry(b"{bad", "payload: is not JSON"))
        finally:
            await client.aclose()

    run_blocking(setup())
    data = status_json(db_settings)
    assert data["queue"]["depth"] == 4  # 5 tracked - 2 claimed + 3 pushed, capped at 4 -> 2 dropped
    assert data["dropped"] == 2
    assert data["queue"]["oldest_age_seconds"] >= 0  # the 600 s old ones were claimed or trimmed
    assert data["in_flight"]["batches"] == 1
    (batch,) = data["in_flight"]["shown"]
    assert (batch["batch_id"], batch["events"], batch["reclaims"]) == ("batch-under-test", 2, 0)
    assert 0 <= batch["age_seconds"] < 60
    assert data["dead_letters"] == 1

    table = invoke(db_settings, "status")
    assert table.exit_code == 0
    for label in ("queue depth", "oldest queued", "in-flight batches", "batch-under-test", "dead letters"):
        assert label in table.stdout
    assert "WARNING: 1 dead letter(s)" in table.stdout
    assert "WARNING: 2 event(s) dropped" in table.stdout


def test_status_age_of_the_oldest_event(settings: Settings) -> None:
    track(settings, 1, created_at=datetime.now(UTC) - timedelta(seconds=500))
    track(settings, 1)
    data = status_json(settings)
    assert 500 <= data["queue"]["oldest_age_seconds"] < 560
    # The default flush interval is 60 s: an event waiting over three intervals is worth a warning.
    assert any("the oldest queued event waits for" in w for w in data["warnings"])


def test_flush_drains_with_the_task_code_and_status_shows_it(db_settings: Settings) -> None:
    ids = track(db_settings, 250)
    result = invoke(db_settings, "flush", "--json")
    assert result.exit_code == 0, result.output
    summary = orjson.loads(result.stdout)
    assert (summary["claimed"], summary["inserted"], summary["dead_lettered"], summary["backlog"]) == (
        250,
        250,
        0,
        0,
    )
    assert run_blocking(_rows(db_settings.database_url)) == len(ids)
    data = status_json(db_settings)
    assert data["queue"]["depth"] == 0 and data["in_flight"]["batches"] == 0
    assert data["totals"]["inserted"] == 250
    assert data["last_flush"]["summary"]["inserted"] == 250
    assert data["database"]["rows"] == 250
    assert invoke(db_settings, "flush").exit_code == 0  # an empty queue is fine


def test_migrate_creates_a_database(settings: Settings) -> None:
    name = f"analytics_cli_{os.getpid()}_{int(time.time())}"
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        result = invoke(settings.replace(database_url=url), "migrate")
        assert result.exit_code == 0, result.output
        assert run_blocking(_rows(url)) == 0
        assert invoke(settings.replace(database_url=url), "migrate").exit_code == 0  # idempotent
    finally:

        async def drop() -> None:
            conn = await asyncpg.connect(PG_ADMIN_URL)
            try:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await conn.close()

        run_blocking(drop())


def test_unreachable_redis_says_how_to_start_it(settings: Settings) -> None:
    dead = settings.replace(redis_url=f"redis://127.0.0.1:{free_port()}/0", analytics_redis_timeout=2.0)
    for args in (["status"], ["flush"], ["dead-letters", "list"]):
        result = invoke(dead, *args)
        assert result.exit_code == 2, (args, result.output)
        assert "redis-server --daemonize yes" in result.output


def test_dead_letters_list_replay_purge(settings: Settings, sync_redis: redis.Redis) -> None:
    keys = QueueKeys(settings.analytics_key_prefix)
    good = validate({"event_type": "signup", "user_id": "7"})
    sync_redis.rpush(
        keys.dead,
        dead_letter_entry(good.encode(), "event_metadata: over the limit", stage="decode"),
        dead_letter_entry(b"\x80not json at all" + b"x" * 300, "payload: is not JSON"),
        b"not even a dead-letter record",
    )
    listed = invoke(settings, "dead-letters", "list", "--width", "40")
    assert listed.exit_code == 0
    assert "3 dead letter(s)" in listed.stdout
    assert "event_metadata: over the limit" in listed.stdout and "'stage': 'decode'" in listed.stdout
    assert "unreadable dead-letter entry" in listed.stdout
    assert max(len(line) for line in listed.stdout.splitlines()) < 120  # payloads shortened

    replayed = invoke(settings, "dead-letters", "replay", "--json")
    assert replayed.exit_code == 0, replayed.output
    outcome = orjson.loads(replayed.stdout)
    assert (outcome["examined"], outcome["requeued"], outcome["kept"]) == (3, 1, 2)
    queued = sync_redis.lrange(keys.queue, 0, -1)
    assert [orjson.loads(q)["event_id"] for q in queued] == [good.event_id]  # same id: at most one row
    assert sync_redis.llen(keys.dead) == 2

    refused = invoke(settings, "dead-letters", "purge", input="n\n")
    assert refused.exit_code == 1 and sync_redis.llen(keys.dead) == 2
    purged = invoke(settings, "dead-letters", "purge", "--yes")
    assert purged.exit_code == 0 and "purged 2" in purged.stdout
    assert sync_redis.llen(keys.dead) == 0


def test_replay_that_crashes_midway_loses_nothing(settings: Settings, sync_redis: redis.Redis) -> None:
    """The push fails (the queue key holds the wrong type): the entry must still be dead-lettered."""
    keys = QueueKeys(settings.analytics_key_prefix)
    entries = [dead_letter_entry(validate({"event_type": f"e{n}"}).encode(), "transient") for n in range(3)]
    sync_redis.rpush(keys.dead, *entries)
    sync_redis.set(keys.queue, b"not a list")

    async def crash() -> None:
        client = redis_client(settings)
        try:
            await replay_dead(client, settings)
        finally:
            await client.aclose()

    with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
        run_blocking(crash())
    assert sorted(sync_redis.lrange(keys.dead, 0, -1)) == sorted(entries)


def test_purge_removes_only_what_was_confirmed(settings: Settings, sync_redis: redis.Redis) -> None:
    keys = QueueKeys(settings.analytics_key_prefix)
    sync_redis.rpush(keys.dead, b"old-1", b"twin", b"twin")

    async def go() -> tuple[list[bytes], int]:
        client = redis_client(settings)
        try:
            confirmed = await snapshot_dead(client, keys)
            await client.rpush(keys.dead, b"arrived-after-the-prompt", b"twin")
            return confirmed, await purge_dead(client, keys, confirmed)
        finally:
            await client.aclose()

    confirmed, removed = run_blocking(go())
    assert (confirmed, removed) == ([b"old-1", b"twin", b"twin"], 3)
    # Two equal entries confirmed, two removed: the third twin arrived later and stays.
    assert sync_redis.lrange(keys.dead, 0, -1) == [b"arrived-after-the-prompt", b"twin"]


def test_python_m_bridge_runs_the_cli() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "bridge", "--help"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    for command in ("migrate", "status", "flush", "dead-letters", "demo"):
        assert command in proc.stdout


def _cli_env(settings: Settings) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "ANALYTICS_REDIS_URL": settings.redis_dsn,
        "ANALYTICS_KEY_PREFIX": settings.analytics_key_prefix,
        "ANALYTICS_DATABASE_URL": settings.database_url,
        "ANALYTICS_BACKLOG_TRIGGER": "0",
    }


class _PromptedPurge:
    """`analytics-bridge dead-letters purge` in its own process, held at its confirmation prompt."""

    PROMPT = "cannot be recovered"

    def __init__(self, settings: Settings) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bridge", "dead-letters", "purge"],
            env=_cli_env(settings),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.out = bytearray()
        # The prompt ends without a newline: read bytes as they come, in a thread (no blocking read).
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        wait_for_sync(lambda: self.PROMPT.encode() in self.out, timeout=30, message="purge's prompt")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while chunk := self.proc.stdout.read1(4096):
            self.out += chunk

    def answer(self, text: str) -> tuple[int, str, str]:
        assert self.proc.stdin is not None and self.proc.stderr is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.close()
        self.proc.wait(timeout=60)  # its stderr is a few log lines: no pipe fills up meanwhile
        self.reader.join(timeout=10)
        return self.proc.returncode, self.out.decode(), self.proc.stderr.read().decode()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


def _run_cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        env=_cli_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_purge_never_deletes_a_dead_letter_a_concurrent_replay_moved(
    settings: Settings, sync_redis: redis.Redis
) -> None:
    """Item 8: purge asks about [A, B]; while its prompt is open a drain dead-letters D and a replay
    (another process) rotates A behind D. Purging "the first two" would delete B and D, never shown."""
    keys = QueueKeys(settings.analytics_key_prefix)
    seen = [dead_letter_entry(f"{{bad-{n}".encode(), "payload: is not JSON") for n in "AB"]
    sync_redis.rpush(keys.dead, *seen)
    purge = _PromptedPurge(settings)
    try:
        assert "Delete 2 dead letter(s)" in purge.out.decode()
        unseen = dead_letter_entry(b"{bad-D", "payload: is not JSON")  # what a drain's ack appends
        sync_redis.rpush(keys.dead, unseen)
        replay = _run_cli(settings, "dead-letters", "replay", "--limit", "1", "--json")
        assert replay.returncode == 0, replay.stderr
        assert orjson.loads(replay.stdout)["kept"] == 1  # A examined, kept, now behind D
        assert sync_redis.lrange(keys.dead, 0, -1) == [seen[1], unseen, seen[0]]
        code, out, err = purge.answer("y\n")
    finally:
        purge.kill()
    assert code == 0, err
    assert "purged 2 dead letter(s)" in out
    assert sync_redis.lrange(keys.dead, 0, -1) == [unseen]


def test_purge_and_replay_in_two_processes_at_once(settings: Settings, sync_redis: redis.Redis) -> None:
    """Purge confirmed while a whole replay runs in another process: every dead letter that arrived
    after the prompt survives, dead-lettered still or re-queued; every confirmed one is gone."""
    keys = QueueKeys(settings.analytics_key_prefix)
    old_bad = [dead_letter_entry(f"{{old-bad-{n}".encode(), "payload: is not JSON") for n in range(300)]
    old_good = [dead_letter_entry(validate({"event_type": f"old-{n}"}).encode(), "fixed") for n in range(300)]
    sync_redis.rpush(keys.dead, *[e for pair in zip(old_bad, old_good, strict=True) for e in pair])
    purge = _PromptedPurge(settings)
    try:
        assert "Delete 600 dead letter(s)" in purge.out.decode()
        new_good_events = [validate({"event_type": f"new-{n}"}) for n in range(50)]
        new_bad = [dead_letter_entry(f"{{new-bad-{n}".encode(), "payload: is not JSON") for n in range(50)]
        new_good = [dead_letter_entry(e.encode(), "fixed") for e in new_good_events]
        sync_redis.rpush(keys.dead, *[e for pair in zip(new_bad, new_good, strict=True) for e in pair])
        replay = subprocess.Popen(
            [sys.executable, "-m", "bridge", "dead-letters", "replay", "--json"],
            env=_cli_env(settings),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            # Answer as soon as the replay is under way, so the two really interleave.
            wait_for_sync(lambda: sync_redis.llen(keys.queue) > 0 or replay.poll() is not None, timeout=30)
            code, out, err = purge.answer("y\n")
            replay_out, replay_err = replay.communicate(timeout=120)
        finally:
            if replay.poll() is None:
                replay.kill()
                replay.wait(timeout=10)
    finally:
        purge.kill()
    assert code == 0, err
    assert replay.returncode == 0, replay_err.decode()
    purged = int(out.rsplit("purged ", 1)[1].split()[0])
    requeued = orjson.loads(replay_out)["requeued"]
    assert purged + requeued >= 600  # each confirmed entry went one way or the other (or both)
    left = sync_redis.lrange(keys.dead, 0, -1)
    queued = {orjson.loads(q)["event_id"] for q in sync_redis.lrange(keys.queue, 0, -1)}
    assert set(new_bad) <= set(left)  # unseen and still failing: must still be there
    for entry, event in zip(new_good, new_good_events, strict=True):
        assert entry in left or event.event_id in queued, "an unseen dead letter vanished"
    assert not set(left) & (set(old_bad) | set(old_good))  # every confirmed entry is gone
    assert len(left) == len(set(left))
