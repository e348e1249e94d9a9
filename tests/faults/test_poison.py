"""12: poison rows of every kind in one batch: dead letters with reasons, neighbours inserted, no retry."""

from __future__ import annotations

import asyncio
import pickle
import re
from pathlib import Path

import asyncpg
import msgspec
import pytest
import redis

from analytics_sdk import Settings, validate
from analytics_sdk._event import new_event_id
from analytics_sdk._queue import QueueKeys

from .conftest import Fleet
from .ledger import Ledger, collect, event_id_of, quiesce
from .tools import backlog, drive_until, rows, stats

pytestmark = pytest.mark.faults

PG_REJECTS = "pg-rejects-this"


class _Trap:
    """Unpickling this creates ``path``: proof that someone ran pickle.loads on queued bytes."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.path), "w"))


def _raw(event_id: str | None, **fields: object) -> bytes:
    doc: dict[str, object] = {"v": 1, "event_type": "poison"}
    if event_id is not None:
        doc["event_id"] = event_id
    doc.update(fields)
    return msgspec.json.encode({k: v for k, v in doc.items() if v is not _MISSING})


_MISSING = object()


@pytest.mark.timeout(120)
def test_12_poison_rows_of_every_kind_in_one_batch(
    fault_settings: Settings, fleet: Fleet, tmp_path: Path
) -> None:
    settings = fault_settings.replace(analytics_max_metadata_bytes=1_024, analytics_batch_size=200)
    marker = tmp_path / "unpickled"
    # A row only PostgreSQL refuses (Python's validation passes it): the insert's data-error path,
    # bisection down to that row, SQLSTATE 23514 in its dead letter.
    asyncio.run(_add_check_constraint(settings.database_url))

    ids = {
        name: new_event_id() for name in ("nul", "meta_nul", "inet", "big", "no_type", "old", "future", "pg")
    }
    poison: dict[str, bytes] = {
        "nul": _raw(ids["nul"], event_type="page\u0000view"),
        "meta_nul": _raw(ids["meta_nul"], event_metadata={"k": "a\u0000b"}),
        "inet": _raw(ids["inet"], ip_address="127.1"),
        "not_json": b"{this is not JSON",
        "pickle": pickle.dumps(_Trap(marker)),
        "big": _raw(ids["big"], event_metadata={"blob": "x" * 4_000}),
        "no_type": _raw(ids["no_type"], event_type=_MISSING),
        "old": _raw(ids["old"], created_at="1970-01-01T00:00:00+00:00"),
        "future": _raw(ids["future"], created_at="9999-12-31T23:59:59+00:00"),
        "pg": validate({"event_id": ids["pg"], "event_type": PG_REJECTS}).encode(),
    }
    ledger = Ledger()
    for name in poison:
        ledger.inject(ids.get(name), "dead")
    good = [validate({"event_type": "good", "event_metadata": {"n": n}}) for n in range(90)]
    ledger.accept([e.event_id for e in good])
    # interleave: every poison row sits between good neighbours, all in one claim of 200
    payloads: list[bytes] = []
    bad = list(poison.values())
    for n, event in enumerate(good):
        payloads.append(event.encode())
        if n % 9 == 4 and bad:
            payloads.append(bad.pop())
    payloads += bad
    with redis.Redis.from_url(settings.redis_dsn) as r:
        r.rpush(QueueKeys(settings.analytics_key_prefix).queue, *payloads)

    worker = fleet.worker(settings)
    drive_until(
        lambda: backlog(settings) == (0, 0),
        lambda: fleet.send_flush(settings),
        timeout=60,
        every=5.0,
        message="one drain takes the batch",
    )
    log = worker.log()
    assert worker.count(r"flush_analytics_events\[[^\]]+\] succeeded") == 1, log[-3000:]
    assert not re.search(r"Retry in", log), "a data error was retried"
    final = stats(settings)
    assert int(final["claimed"]) == len(payloads)
    assert int(final["dead"]) == len(poison)

    fleet.close()
    asyncio.run(quiesce(settings))
    outcome = asyncio.run(collect(settings))
    outcome.check(ledger)
    assert not marker.exists(), "queued bytes were unpickled"
    assert rows(settings) == len(good)
    assert len(outcome.dead) == len(poison)
    by_id = {event_id_of(d["payload"]): d for d in outcome.dead}
    expected_field = {
        "nul": "event_type",
        "meta_nul": "event_metadata",
        "inet": "ip_address",
        "big": "event_metadata",
        "no_type": "event_type",
        "old": "created_at",
        "future": "created_at",
    }
    for name, field in expected_field.items():
        entry = by_id[ids[name]]
        assert field in entry["error"], (name, entry)
        assert entry["payload"] == poison[name].decode(), name  # kept verbatim for a replay
    pg = by_id[ids["pg"]]
    assert pg.get("sqlstate") == "23514", pg
    anonymous = [d for d in outcome.dead if event_id_of(d["payload"]) is None]
    assert len(anonymous) == 2  # not JSON, and the pickle
    assert all("payload" in d["error"] for d in anonymous), anonymous


async def _add_check_constraint(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "ALTER TABLE analytics_events ADD CONSTRAINT faults_pg_rejects "
            f"CHECK (event_type <> '{PG_REJECTS}')"
        )
    finally:
        await conn.close()
