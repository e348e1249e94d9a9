"""`analytics-bridge`: every command against the real Redis and PostgreSQL (sync tests: the CLI runs
asyncio.run itself)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest
import redis
from click.testing import CliRunner, Result

from analytics_sdk import AnalyticsClient, Settings, validate
from analytics_sdk._queue import QueueKeys, claim, dead_letter_entry, push
from bridge.cli import main
from bridge.cli._dead import purge_dead, replay_dead, snapshot_dead
from bridge.cli._status import redis_client
from tests.conftest import PG_ADMIN_URL, run_blocking
from tests.helpers import wait_for_sync
from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent


def invoke(settings: Settings, *args: str, input: str | None = None, **extra_env: str) -> Result:
    env = {
        "ANALYTICS_REDIS_URL": settings.redis_dsn,
        "ANALYTICS_KEY_PREFIX": settings.analytics_key_prefix,
        "ANALYTICS_DATABASE_URL": settings.database_url,
        "ANALYTICS_BACKLOG_TRIGGER": "0",
        **extra_env,
    }
    return CliRunner().invoke(main, list(args), env=env, input=input, catch_exceptions=False)


def status_json(settings: Settings, exit_code: int = 0, **env: str) -> dict[str, Any]:
    result = invoke(settings, "status", "--json", **env)
    assert result.exit_code == exit_code, result.output
    data: dict[str, Any] = msgspec.json.decode(result.stdout)
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
    # The 600 s old ones were claimed (two) or trimmed (one): the head is one tracked just now.
    assert 0 <= data["queue"]["oldest_age_seconds"] < 60
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


def test_status_age_of_the_oldest_event(db_settings: Settings) -> None:
    track(db_settings, 1, created_at=datetime.now(UTC) - timedelta(seconds=500))
    track(db_settings, 1)
    data = status_json(db_settings)
    assert 500 <= data["queue"]["oldest_age_seconds"] < 560  # the figure: from the head's created_at
    # No drain ever finished and the head was created over three (default 60 s) intervals ago, so it
    # may have waited that long: worth a warning, which says what is known (no drain) and no more.
    assert [w for w in data["warnings"] if "is a worker" in w] == [
        "2 event(s) queued and no drain has ever finished for this key prefix: is a worker (and beat)"
        " running? (`analytics-bridge flush` drains now)"
    ]


def _worker_warnings(data: dict[str, Any]) -> list[str]:
    return [w for w in data["warnings"] if "is a worker" in w]


def test_status_does_not_take_a_backfill_for_a_stopped_worker(db_settings: Settings) -> None:
    """Item 13: events created two years ago (a backfill) and a drain that finished just now: nothing
    has waited, so no "is a worker running?" (main warned from the client's created_at)."""
    assert invoke(db_settings, "flush").exit_code == 0  # a drain finishes: last_flush_at is now
    track(db_settings, 5, created_at=datetime.now(UTC) - timedelta(days=730))
    data = status_json(db_settings)
    assert data["queue"]["oldest_age_seconds"] > 729 * 86400  # the figure is still shown, as created_at
    assert data["last_flush"]["age_seconds"] < 60
    assert _worker_warnings(data) == []
    assert "created" in invoke(db_settings, "status").stdout  # the table says what the age is from


def test_status_warns_when_no_drain_finishes_for_three_intervals(db_settings: Settings) -> None:
    """The warning comes from the drains' own traces: the last flush ages past three intervals while
    events wait and no lease is fresh; a drain at work (a fresh claim) silences it."""
    interval = {"ANALYTICS_FLUSH_INTERVAL": "2"}  # warned past 6 s: room for a loaded machine
    assert invoke(db_settings, "flush", **interval).exit_code == 0
    track(db_settings, 3)  # created now, queued now
    assert _worker_warnings(status_json(db_settings, **interval)) == []  # the flush was just now

    def warned() -> list[str]:
        return _worker_warnings(status_json(db_settings, **interval))

    wait_for_sync(warned, timeout=30, interval=0.5, message="the stale-queue warning")
    (warning,) = warned()
    assert warning.startswith("3 event(s) queued, the last drain finished ")
    assert "(> 3 flush intervals) and none holds a fresh lease: is a worker (and beat) running?" in warning

    async def claim_one() -> None:
        client = redis_client(db_settings)
        try:
            await claim(client, QueueKeys(db_settings.analytics_key_prefix), 1, "at-work")
        finally:
            await client.aclose()

    run_blocking(claim_one())  # a drain claimed just now: it is at work, however old the last flush
    data = status_json(db_settings, **interval)
    assert data["in_flight"]["newest_age_seconds"] < 6
    assert _worker_warnings(data) == []


def test_status_with_young_events_and_no_drain_yet_only_says_so(db_settings: Settings) -> None:
    track(db_settings, 2)  # a fresh deployment: events tracked a moment ago, no drain ran yet
    data = status_json(db_settings)
    assert _worker_warnings(data) == []
    assert "no flush recorded yet for this key prefix" in data["warnings"]


def test_status_reads_lease_ages_on_redis_clock_and_tolerates_other_scores(
    db_settings: Settings, sync_redis: redis.Redis
) -> None:
    """Ages are Redis TIME minus the score (ms); a score 0 is a lease its drain released, a score
    ahead of Redis's clock (a fast host clock) is fresh, not negative."""
    keys = QueueKeys(db_settings.analytics_key_prefix)
    seconds, micros = sync_redis.time()
    now_ms = seconds * 1000 + micros // 1000
    sync_redis.zadd(keys.leases, {"released": 0, "expired": now_ms - 1_000_000, "ahead": now_ms + 60_000})
    for batch in ("released", "expired", "ahead"):
        sync_redis.rpush(keys.inflight(batch), b"{}")
    data = status_json(db_settings)
    shown = {b["batch_id"]: b for b in data["in_flight"]["shown"]}
    assert (shown["released"]["age_seconds"], shown["released"]["released"]) == (None, True)
    assert 1000 <= shown["expired"]["age_seconds"] < 1010
    assert shown["ahead"]["age_seconds"] == 0
    assert data["in_flight"]["oldest_age_seconds"] == shown["expired"]["age_seconds"]
    assert data["in_flight"]["newest_age_seconds"] == 0
    assert "1 in-flight batch(es) past the visibility timeout" in " ".join(data["warnings"])
    assert "1 in-flight batch(es) released by their drain" in " ".join(data["warnings"])
    assert "released, reclaimed 0x" in invoke(db_settings, "status").stdout


def test_status_exits_2_when_postgresql_is_down(db_settings: Settings) -> None:
    """Item 12: a probe must see PostgreSQL down in the exit code (main exited 0); the queue figures
    are still shown."""
    down = db_settings.replace(database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/analytics")
    track(down, 2)
    data = status_json(down, exit_code=2)
    assert data["queue"]["depth"] == 2
    assert data["database"]["error_kind"] == "unreachable"
    (warning,) = [w for w in data["warnings"] if "PostgreSQL" in w]
    assert warning.startswith("PostgreSQL unreachable: ") and "pg_ctlcluster" in warning
    table = invoke(down, "status")
    assert table.exit_code == 2 and re.search(r"^rows in table +unknown", table.stdout, re.MULTILINE)


@pytest.fixture
def empty_database(settings: Settings) -> Iterator[str]:
    """A database that exists but was never migrated: no analytics_events table."""
    name = f"analytics_unmigrated_{os.getpid()}_{int(time.time() * 1000)}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(PG_ADMIN_URL)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    run_blocking(admin(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        run_blocking(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def test_status_exits_2_on_an_unmigrated_or_missing_database_and_says_migrate(
    settings: Settings, empty_database: str
) -> None:
    for url, kind in (
        (empty_database, "not_migrated"),
        (empty_database + "_missing", "no_database"),
    ):
        data = status_json(settings.replace(database_url=url), exit_code=2)
        assert data["database"]["error_kind"] == kind
        (warning,) = [w for w in data["warnings"] if "PostgreSQL" in w]
        assert "analytics-bridge migrate" in warning, warning
        assert "pg_ctlcluster" not in warning  # the server is up: starting it is the wrong advice


def test_status_exits_2_on_bad_configuration(db_settings: Settings) -> None:
    result = invoke(db_settings, "status", ANALYTICS_BATCH_SIZE="abc")
    assert result.exit_code == 2
    assert "bad configuration" in result.output
    assert "ANALYTICS_BATCH_SIZE" in result.output and "abc" in result.output


def test_status_advice_fits_the_redis_error(db_settings: Settings) -> None:
    """A wrong password is not an unreachable server; a server down on another port gets the start
    command for that port."""
    wrong = db_settings.replace(redis_url=f"redis://nobody:wrong@{db_settings.redis_dsn.split('//', 1)[1]}")
    data = status_json(wrong, exit_code=2)
    (warning,) = [w for w in data["warnings"] if "Redis" in w]
    assert warning.startswith("Redis refused the credentials: ") and "ANALYTICS_REDIS_URL" in warning
    assert "redis-server" not in warning
    assert data["redis_error_kind"] == "auth"
    port = free_port()
    down = db_settings.replace(redis_url=f"redis://127.0.0.1:{port}/0", analytics_redis_timeout=2.0)
    data = status_json(down, exit_code=2)
    (warning,) = [w for w in data["warnings"] if "Redis" in w]
    assert warning.startswith("Redis unreachable: ") and f"--port {port} " in warning
    assert data["database"]["rows"] == 0  # PostgreSQL's figure is still there


def test_flush_drains_with_the_task_code_and_status_shows_it(db_settings: Settings) -> None:
    ids = track(db_settings, 250)
    result = invoke(db_settings, "flush", "--json")
    assert result.exit_code == 0, result.output
    summary = msgspec.json.decode(result.stdout)
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
    outcome = msgspec.json.decode(replayed.stdout)
    assert (outcome["examined"], outcome["requeued"], outcome["kept"]) == (3, 1, 2)
    queued = sync_redis.lrange(keys.queue, 0, -1)
    assert [msgspec.json.decode(q)["event_id"] for q in queued] == [good.event_id]  # same id: at most one row
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
        assert msgspec.json.decode(replay.stdout)["kept"] == 1  # A examined, kept, now behind D
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
    requeued = msgspec.json.decode(replay_out)["requeued"]
    assert purged + requeued >= 600  # each confirmed entry went one way or the other (or both)
    left = sync_redis.lrange(keys.dead, 0, -1)
    queued = {msgspec.json.decode(q)["event_id"] for q in sync_redis.lrange(keys.queue, 0, -1)}
    assert set(new_bad) <= set(left)  # unseen and still failing: must still be there
    for entry, event in zip(new_good, new_good_events, strict=True):
        assert entry in left or event.event_id in queued, "an unseen dead letter vanished"
    assert not set(left) & (set(old_bad) | set(old_good))  # every confirmed entry is gone
    assert len(left) == len(set(left))
