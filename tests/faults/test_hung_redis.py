"""A Redis that accepts connections and never answers (issue 11 §10), under concurrent producers.

A hung server (a socket that accepts and never replies: a wedged Redis, a blackholed proxy) sits on
the port the producers are configured with. Each track() must fail within its deadline
(ANALYTICS_PUBLISH_TIMEOUT) and, once the first wave has shown Redis down, every later one at once
(the breaker), never held for the socket timeout times the tries. Then a real redis-server comes up
on the same port: the same client's probe notices, tracking resumes, a drain lands it all, and the
ledger checks I1-I4 (refused events never reached Redis: none of them may appear).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from hung_server import HungServer

from analytics_sdk import AnalyticsClient, PublishError, Settings
from analytics_sdk._breaker import PROBE_INTERVAL
from analytics_sdk._event import new_event_id

from .conftest import base_settings, new_database
from .ledger import Ledger, collect, quiesce
from .servers import PostgresServer, RedisServer

pytestmark = pytest.mark.faults

PRODUCERS = 40
EVENTS_EACH = 25
SLACK = 1.0  # a loaded 2-core machine; far below what the missing deadline cost (5 s x 3 tries)


async def _wave(client: AnalyticsClient, tag: str) -> tuple[list[tuple[str, float, bool]], list[str]]:
    """PRODUCERS coroutines x EVENTS_EACH track() calls: (event_id, seconds, accepted) and other errors."""
    outcomes: list[tuple[str, float, bool]] = []
    errors: list[str] = []

    async def producer(number: int) -> None:
        for i in range(EVENTS_EACH):
            event_id = new_event_id()
            started = time.monotonic()
            try:
                await client.track("hung", event_id=event_id, user_id=f"{tag}-{number}", entity_id=i)
                outcomes.append((event_id, time.monotonic() - started, True))
            except PublishError:
                outcomes.append((event_id, time.monotonic() - started, False))
            except Exception as exc:  # anything but PublishError is a bug
                errors.append(f"{type(exc).__name__}: {exc}")

    await asyncio.gather(*(producer(n) for n in range(PRODUCERS)))
    return outcomes, errors


@pytest.mark.timeout(120)
def test_29_redis_that_accepts_and_never_answers(pg_cluster: PostgresServer, tmp_path: Path) -> None:
    hung = HungServer()
    server: RedisServer | None = None
    try:
        settings: Settings = base_settings(hung.url, database_url=new_database(pg_cluster))
        deadline = settings.analytics_publish_timeout
        ledger = Ledger()

        async def scenario() -> tuple[
            list[tuple[str, float, bool]], list[tuple[str, float, bool]], list[str]
        ]:
            nonlocal server
            async with AnalyticsClient(settings) as client:
                down, errors = await _wave(client, "down")
                server = RedisServer(tmp_path / "revived", hung.port, ())
                hung.stop()
                server.start()
                give_up = time.monotonic() + PROBE_INTERVAL + deadline + 10
                while client._breaker.is_open:  # the probe, not a caller, finds Redis back
                    assert time.monotonic() < give_up, "the breaker never closed"
                    await asyncio.sleep(0.05)
                up, more_errors = await _wave(client, "up")
            return down, up, errors + more_errors

        down, up, errors = asyncio.run(scenario())
        assert not errors, errors[:5]

        # Down: nothing accepted; each call bounded by the deadline; the first wave (one call per
        # producer, all in the MULTI in flight or waiting behind it) waits, every later call is at once.
        assert len(down) == PRODUCERS * EVENTS_EACH and not any(ok for _, _, ok in down)
        slowest = max(seconds for _, seconds, _ in down)
        assert slowest <= deadline + SLACK, f"a track() took {slowest:.2f}s against a {deadline}s deadline"
        waited = [seconds for _, seconds, _ in down if seconds >= 0.5]
        assert len(waited) <= PRODUCERS, f"{len(waited)} calls waited: the breaker did not fail them at once"
        assert len(down) - len(waited) >= PRODUCERS * (EVENTS_EACH - 1)

        # Up again on the same port: the same client tracks everything.
        assert all(ok for _, _, ok in up), [s for _, s, ok in up if not ok][:5]
        ledger.refuse([event_id for event_id, _, _ in down])
        ledger.accept([event_id for event_id, _, _ in up])

        asyncio.run(quiesce(settings, timeout=60))
        outcome = asyncio.run(collect(settings))
        outcome.check(ledger)
        assert outcome.row_ids == ledger.accepted
        assert not outcome.row_ids & ledger.refused, "an event refused by a hung Redis never reached it"
    finally:
        hung.stop()
        if server is not None:
            server.stop()
