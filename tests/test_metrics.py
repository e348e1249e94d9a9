"""`analytics-bridge metrics`: the real command in a subprocess, scraped over HTTP, parsed with
prometheus_client's own parser; and the shipped alert rules and dashboard checked against what it exports.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from analytics_sdk import AnalyticsClient, Settings
from analytics_sdk._queue import QueueKeys, claim
from analytics_sdk._redis import redis_client
from bridge.cli._metrics import make_registry
from bridge.drain import drain
from tests.conftest import run_blocking
from tests.helpers import wait_for_sync
from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "examples" / "prometheus-alerts.yml"
DASHBOARD = ROOT / "examples" / "grafana-dashboard.json"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Exporter:
    """`python -m bridge metrics` on a free port, as an operator would start it."""

    def __init__(self, settings: Settings, *extra: str) -> None:
        self.port = free_port()
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "ANALYTICS_REDIS_URL": settings.redis_dsn,
            "ANALYTICS_KEY_PREFIX": settings.analytics_key_prefix,
            "ANALYTICS_DATABASE_URL": settings.database_url,
            "ANALYTICS_BACKLOG_TRIGGER": "0",
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bridge", "metrics", "--port", str(self.port), *extra],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        wait_for_sync(self._listening, timeout=20, message="the metrics server to listen")

    def _listening(self) -> bool:
        if self.process.poll() is not None:
            output = self.process.stdout.read().decode() if self.process.stdout else ""
            pytest.fail(f"metrics exited with {self.process.returncode}:\n{output}")
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def scrape_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=30) as response:
            assert response.status == 200
            body: bytes = response.read()
            return body.decode()

    def scrape(self) -> Samples:
        return _samples(self.scrape_text())

    def stop(self) -> str:
        self.process.terminate()
        output, _ = self.process.communicate(timeout=15)
        return output.decode()


def _samples(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _up(samples: Samples, backend: str) -> float:
    return samples[("analytics_backend_up", (("backend", backend),))]


@pytest.fixture
def exporter_for() -> Iterator[Any]:
    started: list[Exporter] = []

    def start(settings: Settings, *extra: str) -> Exporter:
        started.append(Exporter(settings, *extra))
        return started[-1]

    yield start
    for exporter in started:
        if exporter.process.poll() is None:
            exporter.stop()


async def _build_state(settings: Settings) -> dict[str, Any]:
    """Every figure made to a known value: rows, a duplicate, a dead letter, a lease, drops, a queue."""
    keys = QueueKeys(settings.analytics_key_prefix)
    async with AnalyticsClient(settings) as client:
        at = datetime.now(UTC)
        first = await client.track_many(
            [{"event_type": "m", "user_id": str(i), "created_at": at} for i in range(3)]
        )
        r = redis_client(settings)
        try:
            await r.rpush(keys.queue, b'{"not": "an event"}')  # the drain dead-letters it
            await drain(settings)  # 3 inserted, 1 dead letter
            # the same event again (event_id and created_at: the table's key): a duplicate
            await client.track("m", event_id=first[0], created_at=at)
            await drain(settings)
            await client.track_many([{"event_type": "m"}] * 2)
            await claim(r, keys, 2, uuid.uuid4().hex)  # a drain that claimed and has not acked: 1 lease
            last_flush_at = float(await r.hget(keys.stats, "last_flush_at") or 0)
        finally:
            await r.aclose()
    # The cap of 3 keeps the newest 3 of 5: two dropped; the head was created 120 s ago.
    capped = settings.replace(analytics_max_queue_size=3)
    created = datetime.now(UTC) - timedelta(seconds=120)
    async with AnalyticsClient(capped) as client:
        await client.track_many([{"event_type": "m", "created_at": created}] * 5)
    return {"last_flush_at": last_flush_at}


def test_scrape_reports_the_queue_and_table_state(db_settings: Settings, exporter_for: Any) -> None:
    state = run_blocking(_build_state(db_settings))
    exporter = exporter_for(db_settings)
    samples = exporter.scrape()
    assert _up(samples, "redis") == 1.0 and _up(samples, "postgresql") == 1.0
    assert samples[("analytics_queue_length", ())] == 3
    assert 118 <= samples[("analytics_queue_latency_seconds", ())] <= 118 + 60
    assert samples[("analytics_inflight_batches", ())] == 1
    assert samples[("analytics_dead_letters", ())] == 1
    assert samples[("analytics_dropped_events_total", ())] == 2
    assert samples[("analytics_inserted_events_total", ())] == 3
    assert samples[("analytics_duplicate_events_total", ())] == 1
    assert state["last_flush_at"] > 0
    assert abs(samples[("analytics_last_flush_timestamp_seconds", ())] - state["last_flush_at"]) < 1.0

    # Read afresh on every scrape, not cached at start-up.
    run_blocking(_track_one(db_settings))
    assert exporter.scrape()[("analytics_queue_length", ())] == 4
    output = exporter.stop()
    assert exporter.process.returncode == 0, output  # SIGTERM is a clean stop


async def _track_one(settings: Settings) -> None:
    async with AnalyticsClient(settings) as client:
        await client.track("m")


def test_empty_queue_and_no_drain_yet(db_settings: Settings, exporter_for: Any) -> None:
    samples = exporter_for(db_settings).scrape()
    assert samples[("analytics_queue_length", ())] == 0
    assert samples[("analytics_queue_latency_seconds", ())] == 0  # nothing waits
    assert samples[("analytics_last_flush_timestamp_seconds", ())] == 0  # never: "no flush" alerts fire


def test_postgresql_unreachable_reads_zero_and_the_scrape_succeeds(
    settings: Settings, exporter_for: Any
) -> None:
    down = settings.replace(database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/analytics")
    run_blocking(_track_one(down))
    exporter = exporter_for(down)
    samples = exporter.scrape()
    assert _up(samples, "postgresql") == 0.0
    assert _up(samples, "redis") == 1.0
    assert samples[("analytics_queue_length", ())] == 1  # the queue's figures are still there
    output = exporter.stop()
    assert "postgresql at postgresql://postgres@127.0.0.1" in output, output  # which one, and what to do
    assert "start it: pg_ctlcluster" in output, output


def test_postgresql_down_is_logged_once_across_scrapes(settings: Settings, exporter_for: Any) -> None:
    down = settings.replace(database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/analytics")
    exporter = exporter_for(down)
    for _ in range(3):
        assert _up(exporter.scrape(), "postgresql") == 0.0
    output = exporter.stop()
    assert output.count("is down") == 1, output


def test_redis_unreachable_reads_zero_and_the_scrape_succeeds(
    db_settings: Settings, exporter_for: Any
) -> None:
    down = db_settings.replace(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    samples = exporter_for(down).scrape()
    assert _up(samples, "redis") == 0.0
    assert _up(samples, "postgresql") == 1.0
    # No made-up zeros: what could not be read is absent, so alerts on it cannot fire falsely.
    assert ("analytics_queue_length", ()) not in samples


def test_a_hanging_backend_costs_one_timeout_not_the_scrape(settings: Settings, exporter_for: Any) -> None:
    # A socket that completes the TCP handshake (the kernel does) but never answers PostgreSQL's hello.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        hanging = settings.replace(database_url=f"postgresql://postgres@127.0.0.1:{port}/analytics")
        exporter = exporter_for(hanging, "--timeout", "1")
        started = time.monotonic()
        samples = exporter.scrape()
        elapsed = time.monotonic() - started
    assert _up(samples, "postgresql") == 0.0 and _up(samples, "redis") == 1.0
    assert elapsed < 5.0, elapsed
    assert "is down (no answer within 1s)" in exporter.stop()


def test_port_in_use_is_a_clear_error(settings: Settings) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "bridge", "metrics", "--port", str(port)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), "ANALYTICS_REDIS_URL": settings.redis_dsn},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


# -- the shipped alert rules and dashboard ------------------------------------------------------------

_METRIC = re.compile(r"\banalytics_[a-z_]+\b")


@pytest.fixture
def exported(db_settings: Settings) -> set[str]:
    """Every sample name one collect() produces (in-process: the same registry the command serves)."""
    text = generate_latest(make_registry(db_settings)).decode()
    names = {name for name, _ in _samples(text)}
    assert len(names) == 9, names  # all of them present: Redis and PostgreSQL are up
    return names


def _alert_rules(text: str) -> list[dict[str, str]]:
    """The rules of a Prometheus rule file, read by its structure (the venv has no YAML library): each
    `- alert: NAME` and the `key: value` lines one level under it; a `|` or `>-` block is joined."""
    assert "\t" not in text, "YAML must not contain tabs"
    assert text.startswith("groups:") or "\ngroups:\n" in text
    rules: list[dict[str, str]] = []
    current: dict[str, str] | None = None
    key_indent, block_key = 0, ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(line) - len(line.lstrip(" "))
        if match := re.fullmatch(r"- alert: (\S+)", stripped):
            current, key_indent, block_key = {"alert": match[1]}, indent + 2, ""
            rules.append(current)
        elif current is None:
            continue
        elif indent < key_indent:
            current = None
        elif indent == key_indent:
            key, colon, value = stripped.partition(":")
            assert colon, f"not a key: {line!r}"
            block_key = key if value.strip() in ("|", "|-", ">", ">-") else ""
            current[key] = "" if block_key else value.strip()
        elif block_key:  # a continuation line of a block scalar; deeper keys (labels...) are skipped
            current[block_key] = f"{current[block_key]} {stripped}".strip()
    return rules


def test_alert_rules_cover_the_issue_and_name_only_exported_metrics(exported: set[str]) -> None:
    rules = _alert_rules(ALERTS.read_text())
    by_name = {rule["alert"]: rule for rule in rules}
    assert len(by_name) == len(rules), "alert names must be unique"
    for rule in rules:
        assert {"expr", "for", "labels", "annotations"} <= rule.keys(), rule
        used = set(_METRIC.findall(rule["expr"]))
        assert used, rule
        assert used <= exported, (
            f"{rule['alert']} names metrics the exporter does not export: {used - exported}"
        )
    exprs = {name: " ".join(rule["expr"].split()) for name, rule in by_name.items()}
    assert "analytics_queue_latency_seconds > 300" in exprs["AnalyticsQueueLatencyHigh"]
    assert "delta(analytics_dead_letters[" in exprs["AnalyticsDeadLettersGrowing"]
    assert "increase(analytics_dropped_events_total[" in exprs["AnalyticsEventsDropped"]
    assert "time() - analytics_last_flush_timestamp_seconds > 180" in exprs["AnalyticsNoRecentFlush"]
    assert "analytics_backend_up == 0" in exprs["AnalyticsBackendDown"]


def test_dashboard_parses_and_queries_only_exported_metrics(exported: set[str]) -> None:
    dashboard = msgspec.json.decode(DASHBOARD.read_bytes())
    assert dashboard["title"] and dashboard["panels"]
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert exprs
    shown: set[str] = set()
    for expr in exprs:
        used = set(_METRIC.findall(expr))
        assert used, expr
        assert used <= exported, f"{expr!r} names metrics the exporter does not export: {used - exported}"
        shown |= used
    assert shown == exported, f"exported but not on the dashboard: {exported - shown}"
