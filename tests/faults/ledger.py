"""The ledger of a fault scenario, quiescing, and the invariants of DESIGN §7.

The load generator records every event_id it offered: ``accepted`` (track returned), ``refused``
(track raised; such an event may still have reached Redis, when the reply was lost after the write).
Events a test pushes around the SDK (poison payloads) are ``injected``. After the fault the test
quiesces (drains and reclaims until nothing is queued or leased) and collects what the system holds:
rows, dead letters, the dropped counter, the stats hash. ``check`` then asserts:

- I1 no loss: accepted is a subset of rows | dead | dropped (the dropped counter bounds what may be missing);
- I2 exact accounting: rows + dead + dropped == every event that reached Redis, and nothing appears
  that nobody offered;
- I3 no duplicates: one row per event_id, no event_id dead-lettered twice or both stored and dead;
- I4 nothing stuck: empty queue, no lease, no in-flight list, no reclaim counter or owner token left.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import msgspec
import redis.asyncio as aioredis

from analytics_sdk import Settings
from analytics_sdk._queue import QueueKeys

__all__ = ["Ledger", "Outcome", "collect", "event_id_of", "quiesce", "quick"]


@dataclass
class Ledger:
    accepted: set[str] = field(default_factory=set)
    refused: set[str] = field(default_factory=set)
    #: payloads pushed around the SDK: event_id (or None for ones that have none) -> expected fate
    injected: list[tuple[str | None, str]] = field(default_factory=list)

    def accept(self, event_ids: list[str] | set[str] | str) -> None:
        self.accepted.update([event_ids] if isinstance(event_ids, str) else event_ids)

    def refuse(self, event_ids: list[str] | set[str] | str) -> None:
        self.refused.update([event_ids] if isinstance(event_ids, str) else event_ids)

    def inject(self, event_id: str | None, fate: str) -> None:
        self.injected.append((event_id, fate))

    def merge(self, other: Ledger) -> None:
        self.accepted |= other.accepted
        self.refused |= other.refused
        self.injected += other.injected

    def __repr__(self) -> str:
        counts = f"accepted={len(self.accepted)} refused={len(self.refused)} injected={len(self.injected)}"
        return f"<Ledger {counts}>"


def event_id_of(payload: bytes | str) -> str | None:
    """The normalised event_id inside a queued payload, or None if it has none (not JSON...)."""
    try:
        doc = msgspec.json.decode(payload)
        return str(uuid.UUID(str(doc["event_id"])))
    except (msgspec.DecodeError, KeyError, TypeError, ValueError, AttributeError):
        return None


@dataclass
class Outcome:
    rows: list[str]
    row_count: int
    dead: list[dict[str, Any]]
    dropped: int
    stats: dict[str, str]
    queued: int
    leases: int
    inflight_keys: list[str]
    reclaims: dict[str, str]
    owners: dict[str, str] = field(default_factory=dict)

    @property
    def row_ids(self) -> set[str]:
        return set(self.rows)

    @property
    def dead_ids(self) -> list[str]:
        return [i for i in (event_id_of(d.get("payload", "")) for d in self.dead) if i is not None]

    def stat(self, name: str) -> int:
        return int(self.stats.get(name, 0))

    def check(self, ledger: Ledger) -> None:
        """Assert I1-I4 against ``ledger``; the message carries the numbers needed to debug."""
        rows, dead_ids = self.row_ids, self.dead_ids
        dead_set = set(dead_ids)
        stored = rows | dead_set
        summary = (
            f"{ledger!r}: rows={len(rows)} (count {self.row_count}) dead={len(self.dead)} "
            f"dropped={self.dropped} queued={self.queued} leases={self.leases} stats={self.stats}"
        )
        # I3 first: a duplicate would make every count below misleading.
        assert self.row_count == len(rows), f"I3: duplicate rows: {summary}"
        doubled = [i for i, n in Counter(dead_ids).items() if n > 1]
        assert not doubled, f"I3: event_ids dead-lettered more than once {doubled[:5]}: {summary}"
        both = rows & dead_set
        assert not both, f"I3: event_ids both stored and dead-lettered {sorted(both)[:5]}: {summary}"
        # I4
        assert self.queued == 0, f"I4: events still queued: {summary}"
        assert self.leases == 0, f"I4: leases left: {summary}"
        assert not self.inflight_keys, f"I4: in-flight lists left {self.inflight_keys[:5]}: {summary}"
        assert not self.reclaims, f"I4: reclaim counters left {self.reclaims}: {summary}"
        assert not self.owners, f"I4: owner tokens left {self.owners}: {summary}"
        # I1
        missing = ledger.accepted - stored
        assert len(missing) <= self.dropped, (
            f"I1: {len(missing)} accepted event(s) neither stored, dead nor counted dropped "
            f"(e.g. {sorted(missing)[:3]}): {summary}"
        )
        # I2: nothing from nowhere, and the counts add up exactly.
        injected_ids = {i for i, _ in ledger.injected if i is not None}
        known = ledger.accepted | ledger.refused | injected_ids
        phantom = stored - known
        assert not phantom, f"I2: stored event_ids nobody offered {sorted(phantom)[:3]}: {summary}"
        landed_refused = (ledger.refused - ledger.accepted) & stored
        anonymous_dead = len(self.dead) - len(dead_ids)
        expected = len(ledger.accepted) + len(landed_refused) + len(injected_ids - ledger.accepted)
        expected += sum(1 for i, _ in ledger.injected if i is None)
        got = len(rows) + len(dead_ids) + anonymous_dead + self.dropped
        if ledger.refused and self.dropped:
            # a refused event that reached Redis may itself have been trimmed: only a bound holds
            assert expected <= got, f"I2: accounting short by {expected - got}: {summary}"
        else:
            assert got == expected, f"I2: rows+dead+dropped={got} != offered-and-landed={expected}: {summary}"


async def collect(settings: Settings) -> Outcome:
    """Read what the system holds for ``settings`` (its database and its key prefix)."""
    keys = QueueKeys(settings.analytics_key_prefix)
    client = aioredis.Redis.from_url(settings.redis_dsn, socket_timeout=10)
    try:
        dead_raw = await client.lrange(keys.dead, 0, -1)
        dropped = int(await client.get(keys.dropped) or 0)
        stats = {k.decode(): v.decode() for k, v in (await client.hgetall(keys.stats)).items()}
        queued = int(await client.llen(keys.queue))
        leases = int(await client.zcard(keys.leases))
        inflight = [k.decode() async for k in client.scan_iter(match=f"{keys.inflight('*')}")]
        reclaims = {k.decode(): v.decode() for k, v in (await client.hgetall(keys.reclaims)).items()}
        owners = {k.decode(): v.decode() for k, v in (await client.hgetall(keys.owners)).items()}
    finally:
        await client.aclose()
    conn = await asyncpg.connect(settings.database_url, timeout=10)
    try:
        records = await conn.fetch("SELECT event_id::text AS id FROM analytics_events")
    finally:
        await conn.close()
    rows = [r["id"] for r in records]
    return Outcome(
        rows=rows,
        row_count=len(rows),
        dead=[msgspec.json.decode(d) for d in dead_raw],
        dropped=dropped,
        stats=stats,
        queued=queued,
        leases=leases,
        inflight_keys=inflight,
        reclaims=reclaims,
        owners=owners,
    )


def quick(settings: Settings, visibility_timeout: float = 1.0) -> Settings:
    """``settings`` with a short visibility timeout (time limits below it, and a Redis timeout of at
    most half of it, as the worker's start-up check requires)."""
    return settings.replace(
        analytics_visibility_timeout=visibility_timeout,
        analytics_redis_timeout=min(settings.analytics_redis_timeout, visibility_timeout / 2),
        analytics_task_time_limit=visibility_timeout * 0.8,
        analytics_task_soft_time_limit=visibility_timeout * 0.6,
    )


async def quiesce(
    settings: Settings, timeout: float = 60.0, visibility_timeout: float = 1.0
) -> dict[str, int]:
    """Drain and reclaim until nothing is queued or leased; return the drains' summed counters.

    Run only once every worker of the scenario is stopped: a lease of a live drain would be taken
    over after ``visibility_timeout`` (that is the protocol, but not what a quiet check wants).
    """
    from bridge.drain import drain

    fast = quick(settings, visibility_timeout)
    keys = QueueKeys(settings.analytics_key_prefix)
    totals: Counter[str] = Counter()
    deadline = time.monotonic() + timeout
    client = aioredis.Redis.from_url(settings.redis_dsn, socket_timeout=10)
    try:
        while True:
            summary = await drain(fast)
            totals.update({k: v for k, v in summary.as_dict().items() if isinstance(v, int)})
            queued = int(await client.llen(keys.queue))
            leases = int(await client.zcard(keys.leases))
            if not queued and not leases:
                return dict(totals)
            if time.monotonic() > deadline:
                raise AssertionError(f"not quiet after {timeout}s: queued={queued} leases={leases}")
            # leases of dead drains become reclaimable only once the visibility timeout has passed
            await asyncio.sleep(0.2)
    finally:
        await client.aclose()
