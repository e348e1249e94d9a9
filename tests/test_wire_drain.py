"""The wire format end to end: the documented `redis-cli RPUSH` becomes a row, metadata types reach
jsonb as documented, and `analytics-bridge wire-schema` prints the shipped schema."""

from __future__ import annotations

import enum
import json
import re
import shlex
import shutil
import subprocess
import uuid
from datetime import UTC, date, datetime, time
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from click.testing import CliRunner

from analytics_sdk import AnalyticsClient, Settings
from analytics_sdk._queue import QueueKeys
from bridge.cli import main
from bridge.drain import drain

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "wire-format.md"


async def _rows(settings: Settings, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(settings.database_url)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


def _documented_rpush() -> list[str]:
    """The `redis-cli RPUSH` line of docs/wire-format.md, as argv."""
    lines = [line for line in DOC.read_text().splitlines() if line.startswith("redis-cli RPUSH ")]
    assert len(lines) == 1, "docs/wire-format.md shows one redis-cli RPUSH example"
    return shlex.split(lines[0])


async def test_the_documented_redis_cli_rpush_becomes_a_row(db_settings: Settings) -> None:
    redis_cli = shutil.which("redis-cli")
    assert redis_cli, "redis-cli is not installed (Debian: apt-get install redis-tools)"
    argv = _documented_rpush()
    assert argv[:3] == ["redis-cli", "RPUSH", "analytics:events:batch"], "the default prefix's queue"
    payload = argv[3]
    # The same command, pointed at this test's Redis and prefix instead of the defaults.
    queue = QueueKeys(db_settings.analytics_key_prefix).queue
    done = subprocess.run(
        [redis_cli, "-u", db_settings.redis_dsn, "RPUSH", queue, payload],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0 and done.stdout.strip() == "1", (done.stdout, done.stderr)

    summary = await drain(db_settings)
    assert (summary.inserted, summary.dead_lettered) == (1, 0)
    sent = json.loads(payload)
    [row] = await _rows(
        db_settings,
        "SELECT event_id::text AS id, event_type, user_id, event_metadata, host(ip_address) AS ip, "
        "created_at FROM analytics_events",
    )
    assert (row["id"], row["event_type"], row["user_id"]) == (sent["event_id"], "signup", "42")
    assert json.loads(row["event_metadata"]) == sent["event_metadata"]
    assert row["ip"] == sent["ip_address"]
    assert row["created_at"] == datetime.fromisoformat(sent["created_at"])


async def test_an_event_without_v_or_event_id_is_dead_lettered(
    db_settings: Settings, redis_client: aioredis.Redis
) -> None:
    """The user story of issue 13: what the doc calls required is required, and says why."""
    keys = QueueKeys(db_settings.analytics_key_prefix)
    sent = json.loads(_documented_rpush()[3])
    without = [{k: v for k, v in sent.items() if k != name} for name in ("v", "event_id")]
    redis_cli = shutil.which("redis-cli")
    assert redis_cli, "redis-cli is not installed (Debian: apt-get install redis-tools)"
    for doc in without:
        subprocess.run(
            [redis_cli, "-u", db_settings.redis_dsn, "RPUSH", keys.queue, json.dumps(doc)],
            capture_output=True,
            timeout=30,
            check=True,
        )
    summary = await drain(db_settings)
    assert (summary.inserted, summary.dead_lettered) == (0, 2)
    dead = [json.loads(raw) for raw in await redis_client.lrange(keys.dead, 0, -1)]
    assert sorted(d["field"] for d in dead) == ["event_id", "v"]


class Plan(enum.Enum):
    PRO = "pro"


class Tier(enum.IntEnum):
    GOLD = 3


async def test_each_converted_metadata_type_reaches_jsonb(
    db_settings: Settings, client: AnalyticsClient
) -> None:
    """Issue 13 item 7, through track(), the queue and a real drain, down to the jsonb value."""
    exact = Decimal("12345678901234567890.123456789012345678901")
    metadata = {
        "aware": datetime(2024, 5, 17, 12, 30, 45, 123456, tzinfo=UTC),
        "naive": datetime(2024, 5, 17, 12, 30),
        "day": date(2024, 5, 17),
        "clock": time(12, 30, 45),
        "id": uuid.UUID("0190A0B0-1C2D-7E3F-8A4B-5C6D7E8F9A0B"),
        "price": exact,
        "cents": Decimal("1.10"),
        "plan": Plan.PRO,
        "tier": Tier.GOLD,
        "tags": {"b", "c", "a"},
        "sizes": frozenset({3, 1, 2}),
        "nested": [{"when": date(2024, 1, 2), "plans": {Plan.PRO}}],
    }
    await client.track("typed", event_metadata=metadata)
    summary = await drain(db_settings)
    assert (summary.inserted, summary.dead_lettered) == (1, 0)
    [row] = await _rows(
        db_settings,
        "SELECT event_metadata::text AS text, event_metadata->>'price' AS price, "
        "event_metadata->'cents' AS cents, jsonb_typeof(event_metadata->'price') AS price_type "
        "FROM analytics_events",
    )
    assert json.loads(row["text"]) == {
        "aware": "2024-05-17T12:30:45.123456+00:00",
        "naive": "2024-05-17T12:30:00",
        "day": "2024-05-17",
        "clock": "12:30:45",
        "id": "0190a0b0-1c2d-7e3f-8a4b-5c6d7e8f9a0b",
        "price": float(exact),
        "cents": 1.1,
        "plan": "pro",
        "tier": 3,
        "tags": ["a", "b", "c"],
        "sizes": [1, 2, 3],
        "nested": [{"when": "2024-01-02", "plans": ["pro"]}],
    }
    # Decimal exactly: a jsonb number with every digit, no float rounding on the way.
    assert row["price_type"] == "number"
    assert row["price"] == "12345678901234567890.123456789012345678901"
    assert row["cents"] == "1.10"
    assert re.search(r'"price": 12345678901234567890\.123456789012345678901\b', row["text"])


def test_wire_schema_command_prints_the_shipped_file() -> None:
    result = CliRunner().invoke(main, ["wire-schema"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    shipped = (ROOT / "analytics_sdk" / "wire-schema-v1.json").read_text()
    assert result.stdout == shipped
    assert json.loads(result.stdout)["required"] == ["v", "event_id", "event_type"]


@pytest.mark.parametrize("name", ["user_agent", "referrer"])
async def test_over_long_header_is_stored_truncated(
    db_settings: Settings, client: AnalyticsClient, name: str
) -> None:
    await client.track("page_view", **{name: "h" * 5000})
    await drain(db_settings)
    [row] = await _rows(db_settings, f"SELECT {name} AS value FROM analytics_events")
    assert row["value"] == "h" * 2048
