"""The demo's site: concurrent users tracking realistic events, and the read-back from PostgreSQL.

Every event of one demo run carries ``event_metadata.demo_run``, so the read-back counts this run's
rows only, however many earlier runs (or real events) the table holds.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Float, and_, cast, func, select
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.sql.elements import ColumnElement

from analytics_sdk import AnalyticsClient

from ..schema import events_table, sqlalchemy_url

__all__ = ["EVENT_TYPES", "Readback", "count_rows", "engine_for", "read_back", "simulate"]

#: event type -> relative weight: mostly page views, a few purchases.
EVENT_TYPES = {"page_view": 60, "click": 20, "search": 10, "add_to_cart": 7, "purchase": 3}
_PAGES = ["/", "/pricing", "/docs", "/blog/launch", "/products/kettle", "/products/mug", "/cart"]
_QUERIES = ["kettle", "blue mug", "gift card", "tea", "pricing"]
_AGENTS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
    "Mozilla/5.0 (X11; Linux x86_64; rv:127.0) Gecko/20100101 Firefox/127.0",
]
_REFERRERS = [None, "https://www.google.com/", "https://news.ycombinator.com/", "https://t.co/x1"]


def _ip(rng: random.Random) -> str:
    # Documentation ranges (RFC 5737, RFC 3849): realistic shape, nobody's real address.
    if rng.random() < 0.2:
        return f"2001:db8::{rng.randrange(1, 0xFFFF):x}"
    return f"{rng.choice(('192.0.2', '198.51.100', '203.0.113'))}.{rng.randrange(1, 255)}"


def _event(rng: random.Random, kind: str, page: str) -> tuple[str | None, str | None, dict[str, object]]:
    """(entity_type, entity_id, metadata) for one event of ``kind``."""
    product = str(rng.randrange(1, 500))
    if kind == "page_view":
        return (
            "page",
            page,
            {"path": page, "scroll": round(rng.random(), 2), "load_ms": rng.randrange(80, 2500)},
        )
    if kind == "click":
        return "button", rng.choice(("signup", "buy", "menu", "share")), {"path": page}
    if kind == "search":
        return None, None, {"q": rng.choice(_QUERIES), "results": rng.randrange(0, 80)}
    if kind == "add_to_cart":
        return "product", product, {"quantity": rng.randrange(1, 4), "price": round(rng.uniform(3, 90), 2)}
    return "order", f"o-{rng.randrange(10**6)}", {"total": round(rng.uniform(10, 400), 2), "currency": "EUR"}


async def simulate(
    client: AnalyticsClient, users: int, events_per_user: int, run_id: str, advance: Callable[[int], None]
) -> None:
    """``users`` concurrent visitors, each tracking ``events_per_user`` events through ``client``."""
    kinds, weights = list(EVENT_TYPES), list(EVENT_TYPES.values())

    async def visitor(n: int) -> None:
        rng = random.Random(f"{run_id}-{n}")
        ip, agent, referrer = _ip(rng), rng.choice(_AGENTS), rng.choice(_REFERRERS)
        session = f"{run_id}-s{n}"
        for i in range(events_per_user):
            kind = rng.choices(kinds, weights)[0]
            page = rng.choice(_PAGES)
            entity_type, entity_id, metadata = _event(rng, kind, page)
            await client.track(
                kind,
                user_id=f"u{n}",
                session_id=session,
                entity_type=entity_type,
                entity_id=entity_id,
                event_metadata={**metadata, "demo_run": run_id},
                ip_address=ip,
                user_agent=agent,
                referrer=referrer if i == 0 else f"https://shop.example{page}",
            )
            advance(1)

    await asyncio.gather(*(visitor(n) for n in range(users)))


def engine_for(database_url: str) -> AsyncEngine:
    """An async engine; the caller disposes of it inside the same event loop."""
    return create_async_engine(sqlalchemy_url(database_url), pool_size=2, max_overflow=0)


def _this_run(run_id: str, since: datetime) -> ColumnElement[bool]:
    t = events_table.c
    # created_at and event_type narrow the scan through the (event_type, created_at) index first.
    return and_(
        t.event_type.in_(list(EVENT_TYPES)),
        t.created_at >= since,
        t.event_metadata["demo_run"].astext == run_id,
    )


async def count_rows(engine: AsyncEngine, run_id: str, since: datetime) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).where(_this_run(run_id, since))) or 0)


@dataclass
class Readback:
    per_type: dict[str, int]
    latency_p50: float
    latency_p99: float
    latency_max: float


async def read_back(engine: AsyncEngine, run_id: str, since: datetime) -> Readback:
    """Rows per event_type and created_at -> received_at latency percentiles, in SQL."""
    t = events_table.c
    where = _this_run(run_id, since)
    latency = cast(func.extract("epoch", t.received_at - t.created_at), Float)
    async with engine.connect() as conn:
        per_type = {
            str(kind): int(n)
            for kind, n in await conn.execute(
                select(t.event_type, func.count())
                .where(where)
                .group_by(t.event_type)
                .order_by(func.count().desc())
            )
        }
        row = (
            await conn.execute(
                select(
                    func.percentile_cont(0.5).within_group(latency),
                    func.percentile_cont(0.99).within_group(latency),
                    func.max(latency),
                ).where(where)
            )
        ).one()
    return Readback(per_type, float(row[0] or 0), float(row[1] or 0), float(row[2] or 0))


async def wait_for_rows(
    engine: AsyncEngine,
    run_id: str,
    since: datetime,
    expected: int,
    deadline_s: float,
    on_count: Callable[[int], None],
    check: Callable[[], None],
) -> float:
    """Poll until ``expected`` rows are there (``check`` raises if the worker died); returns the time."""
    deadline = time.monotonic() + deadline_s
    while True:
        check()
        count = await count_rows(engine, run_id, since)
        on_count(count)
        if count >= expected:
            return time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {count} of {expected} rows arrived within {deadline_s:.0f}s")
        await asyncio.sleep(0.25)
