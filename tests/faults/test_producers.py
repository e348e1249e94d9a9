"""Producer-side scenarios: 14 (queue cap overflow) and 15 (10 processes x 200 coroutines)."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import msgspec
import pytest
import redis

from analytics_sdk import AnalyticsClient, Settings
from analytics_sdk._queue import QueueKeys

from .ledger import Ledger, collect, event_id_of, quiesce
from .producer import Production, run_in_subprocess_args
from .workers import REPO_ROOT, settings_env

pytestmark = pytest.mark.faults


def _queued(settings: Settings) -> list[dict[str, object]]:
    with redis.Redis.from_url(settings.redis_dsn) as r:
        return [
            msgspec.json.decode(raw)
            for raw in r.lrange(QueueKeys(settings.analytics_key_prefix).queue, 0, -1)
        ]


def _dropped(settings: Settings) -> int:
    with redis.Redis.from_url(settings.redis_dsn) as r:
        return int(r.get(QueueKeys(settings.analytics_key_prefix).dropped) or 0)


@pytest.mark.timeout(60)
def test_14_cap_overflow_drops_exactly_the_oldest(sdk_settings: Settings) -> None:
    cap = 1_000
    settings = sdk_settings.replace(analytics_max_queue_size=cap, analytics_key_prefix="faults14a")

    # Phase A: one client, a burst of 3x the cap from concurrent callers. The sequence number is taken
    # in the same synchronous step that hands the event to the client, so it is the push order.
    async def burst() -> list[str]:
        async with AnalyticsClient(settings) as client:
            return list(
                await asyncio.gather(
                    *(client.track("burst", event_metadata={"seq": i}) for i in range(3 * cap))
                )
            )

    ids = asyncio.run(burst())
    queued = _queued(settings)
    assert len(set(ids)) == 3 * cap
    assert [e["event_metadata"]["seq"] for e in queued] == list(range(2 * cap, 3 * cap))  # type: ignore[index]
    assert [e["event_id"] for e in queued] == ids[2 * cap :]
    assert _dropped(settings) == 2 * cap

    # Phase B: four clients (four connections) at once, one of them pushing a single track_many
    # bigger than the cap. Redis decides the global order; each client's own survivors must be
    # the newest of what it pushed, and the counter exact.
    settings_b = settings.replace(analytics_key_prefix="faults14b")
    per_client = 750

    async def client_burst(number: int) -> list[str]:
        async with AnalyticsClient(settings_b) as client:
            if number == 0:
                batch = [{"event_type": "many", "event_metadata": {"c": 0, "seq": i}} for i in range(1_500)]
                return await client.track_many(batch)
            return list(
                await asyncio.gather(
                    *(
                        client.track("burst", event_metadata={"c": number, "seq": i})
                        for i in range(per_client)
                    )
                )
            )

    async def all_bursts() -> list[list[str]]:
        return list(await asyncio.gather(*(client_burst(n) for n in range(4))))

    pushed = asyncio.run(all_bursts())
    total = sum(map(len, pushed))
    queued_b = _queued(settings_b)
    assert len(queued_b) == cap
    assert _dropped(settings_b) == total - cap
    survivors_by_client: dict[int, list[int]] = {}
    for event in queued_b:
        meta = event["event_metadata"]
        survivors_by_client.setdefault(meta["c"], []).append(meta["seq"])  # type: ignore[index]
    for number, ids_pushed in enumerate(pushed):
        seqs = survivors_by_client.get(number, [])
        # in queue order, and exactly the newest len(seqs) of this client's pushes
        assert seqs == list(range(len(ids_pushed) - len(seqs), len(ids_pushed))), number
    accepted = {i for ids_pushed in pushed for i in ids_pushed}
    in_queue = {e["event_id"] for e in queued_b}
    assert in_queue <= accepted
    assert len(accepted - in_queue) == _dropped(settings_b)  # I1/I2 on the queue: nothing else lost


@pytest.mark.timeout(240)
def test_15_ten_processes_of_200_coroutines(fault_settings: Settings, tmp_path: Path) -> None:
    processes, coroutines, per_coroutine = 10, 200, 20
    settings = fault_settings
    start_at = time.time() + 3.0  # every process waits for this instant, then tracks at once
    outputs = [tmp_path / f"producer-{n}.json" for n in range(processes)]
    env = settings_env(settings)
    env["PYTHONPATH"] = f"{REPO_ROOT}:{REPO_ROOT / 'tests'}"
    children = [
        subprocess.Popen(
            run_in_subprocess_args(
                settings, str(out), start_at, coroutines=coroutines, events=per_coroutine, tag=f"p{n}"
            ),
            cwd=REPO_ROOT,
            env=env,
        )
        for n, out in enumerate(outputs)
    ]
    try:
        for child in children:
            assert child.wait(180) == 0
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait(10)

    ledger = Ledger()
    for out in outputs:
        result = Production.from_json(out.read_bytes())
        assert not result.errors, result.errors[:5]
        assert not result.hung
        ledger.accept(result.accepted)
        ledger.refuse(result.refused)
    expected = processes * coroutines * per_coroutine
    assert len(ledger.accepted) == expected and not ledger.refused

    # accepted == queued as a set: no event lost. A push retried after a timeout (its reply lost on
    # a loaded machine) may have queued an event twice, as the README says; the invariant is one
    # row per event, so copies are allowed here and must all be copies of accepted events.
    queued_ids = [event_id_of(msgspec.json.encode(e)) for e in _queued(settings)]
    copies = len(queued_ids) - expected
    assert copies >= 0 and set(queued_ids) == ledger.accepted
    assert _dropped(settings) == 0

    # ... and == stored, once drained: one row per event, each extra copy counted as a duplicate
    totals = asyncio.run(quiesce(settings, timeout=120))
    outcome = asyncio.run(collect(settings))
    outcome.check(ledger)
    assert outcome.row_ids == ledger.accepted and outcome.row_count == expected
    assert totals.get("duplicates", 0) == copies
