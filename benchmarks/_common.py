"""What every section shares: run sizes per mode, the sample event, statistics, result records."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from analytics_sdk import Settings


@dataclass(frozen=True, slots=True)
class Mode:
    """How much work one run does. ``repeats`` timed runs follow one untimed warm-up."""

    name: str
    repeats: int
    track_events: int  # events per timed run of our client (per concurrency level)
    slow_events: int  # per timed run of the naive client and the old design (they are slow)
    ceiling_batches: int  # MULTI/RPUSH-1,000 batches per ceiling run
    rtt_samples: int  # single-event pipelines for the raw round-trip latency
    vendor_calls: int  # Segment/PostHog calls per run
    sync_events: int  # events per run of section 2 (8 threads)
    drain_events: int  # events per run of section 3
    memory_events: int
    e2e_seconds: float
    e2e_rate: int  # events/s offered in section 5


MODES = {
    "full": Mode("full", 5, 60_000, 3_000, 200, 1_000, 30_000, 8_000, 200_000, 100_000, 20.0, 1_000),
    "quick": Mode("quick", 5, 8_000, 600, 30, 300, 3_000, 2_000, 10_000, 20_000, 8.0, 1_000),
    # The smoke test's mode: proves every code path runs, measures nothing worth reading.
    "tiny": Mode("tiny", 1, 600, 120, 3, 20, 300, 160, 600, 500, 2.0, 200),
}

CONCURRENCY = (1, 64, 256, 1024)

#: A realistic page view, about 500 bytes as JSON: the same content goes to every contender.
METADATA: dict[str, Any] = {
    "scroll_depth": 0.8,
    "section": "news",
    "experiment": "checkout-v2",
    "variant": "b",
    "items": [101, 202, 303],
    "logged_in": True,
}
FIELDS: dict[str, Any] = {
    "user_id": "user-4242",
    "session_id": "sess-7f3a9c1e2b",
    "entity_type": "article",
    "entity_id": "98765",
    "event_metadata": METADATA,
    "ip_address": "203.0.113.9",
    "user_agent": (
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36"
    ),
    "referrer": "https://news.example.com/front-page?utm_source=newsletter&utm_medium=email",
}
EVENT_TYPE = "page_view"


@dataclass(slots=True)
class Check:
    """One target: ``value`` compared with ``target`` (``>=`` unless ``at_most``)."""

    name: str
    value: float
    target: float
    at_most: bool = False
    note: str = ""
    unit: str = ""  # "" for a ratio (shown with x); else shown after the figures ("us", "events/s")

    @property
    def passed(self) -> bool:
        return self.value <= self.target if self.at_most else self.value >= self.target

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": round(self.value, 4),
            "target": self.target,
            "comparison": "<=" if self.at_most else ">=",
            "passed": self.passed,
            "note": self.note,
        }


@dataclass(slots=True)
class Section:
    """A section's table (header + rows of cells), its raw figures and its target checks."""

    title: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Context:
    """Where the services are, and the run's unique names (so nothing is shared with other runs)."""

    mode: Mode
    redis_url: str
    pg_admin_url: str
    run_id: str = field(default_factory=lambda: f"{os.getpid()}-{uuid.uuid4().hex[:8]}")

    @property
    def prefix(self) -> str:
        return f"bench-{self.run_id}"

    def settings(self, suffix: str, **overrides: Any) -> Settings:
        """Settings on the machine's Redis under this run's prefix; no backlog trigger (no Celery)."""
        base = Settings(
            redis_url=self.redis_url,
            analytics_key_prefix=f"{self.prefix}-{suffix}",
            analytics_backlog_trigger=False,
        )
        return base.replace(**overrides)


def delete_prefix(redis_url: str, prefix: str) -> int:
    """Delete this run's keys only: the machine's Redis is shared, so never FLUSHDB."""
    deleted = 0
    with redis.Redis.from_url(redis_url) as client:
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                deleted += int(client.delete(*batch))
                batch.clear()
        if batch:
            deleted += int(client.delete(*batch))
    return deleted


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, round(q / 100 * len(sorted_values) + 0.5 - 1e-9))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass(slots=True)
class Run:
    """One timed run: how many operations, how long, and each operation's latency (seconds)."""

    ops: int
    seconds: float
    latencies: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.ops / self.seconds

    def pct(self, q: float) -> float:
        return percentile(sorted(self.latencies), q)


@dataclass(slots=True)
class Summary:
    """Medians over the timed runs: rate (ops/s) and the p50/p99 latency (seconds)."""

    rate: float
    p50: float
    p99: float
    runs: int

    @classmethod
    def of(cls, runs: Sequence[Run]) -> Summary:
        return cls(
            rate=statistics.median(r.rate for r in runs),
            p50=statistics.median(r.pct(50) for r in runs) if runs[0].latencies else float("nan"),
            p99=statistics.median(r.pct(99) for r in runs) if runs[0].latencies else float("nan"),
            runs=len(runs),
        )

    def as_dict(self) -> dict[str, float]:
        return {
            "rate": round(self.rate, 1),
            "p50_ms": _ms(self.p50),
            "p99_ms": _ms(self.p99),
            "runs": self.runs,
        }


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 4)


async def run_callers(call: Callable[[], Awaitable[object]], total: int, callers: int) -> Run:
    """``callers`` coroutines, each awaiting ``call()`` in turn, ``total`` calls in all."""
    per = max(1, total // callers)
    latencies: list[float] = []
    clock = time.perf_counter

    async def caller() -> None:
        for _ in range(per):
            start = clock()
            await call()
            latencies.append(clock() - start)

    start = clock()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return Run(per * callers, clock() - start, latencies)


def fmt_rate(rate: float) -> str:
    if rate >= 100_000:
        return f"{rate / 1000:,.0f} k/s"
    if rate >= 10_000:
        return f"{rate / 1000:,.1f} k/s"
    return f"{rate:,.0f} /s"


def fmt_ms(seconds: float) -> str:
    if seconds != seconds:  # NaN: not measured
        return "-"
    ms = seconds * 1000
    return f"{ms:.3f} ms" if ms < 10 else f"{ms:,.1f} ms"


def fmt_ratio(value: float) -> str:
    if value < 1:  # three digits, so that 0.498 (short of 0.5) does not print as 0.50
        return f"{value:.3f}x"
    return f"{value:,.2f}x" if value < 100 else f"{value:,.0f}x"
