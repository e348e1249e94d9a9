"""`python -m bridge.demo` (what `nox -s demo` runs), as a subprocess against the real services."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import wait_for_sync
from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.e2e


def _env(database_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANALYTICS_")}
    env.update(PYTHONPATH=str(ROOT), ANALYTICS_DATABASE_URL=database_url, **extra)
    return env


def _demo(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge.demo", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state == "Z"  # a zombie no longer runs; its parent is about to reap it


def test_demo_end_to_end(redis_available: str, database_url: str) -> None:
    proc = _demo(_env(database_url), "--users", "20", "--events-per-user", "15")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "rows in PostgreSQL 300 in" in out
    assert re.search(r"events tracked\s+300 by 20 concurrent users", out)
    assert re.search(r"latency\s+p50 [\d,]+ ms, p99 [\d,]+ ms", out)
    assert "queue size 0, in-flight batches 0, dead letters 0, dropped 0" in out
    counts = dict(re.findall(r"^\s{4}(\w+)\s+([\d,]+)$", out, re.MULTILINE))
    assert sum(int(n.replace(",", "")) for n in counts.values()) == 300
    assert "page_view" in counts
    pid = int(re.search(r"started worker pid (\d+)", out).group(1))  # type: ignore[union-attr]
    assert _gone(pid)
    assert f"worker pid {pid} stopped" in proc.stderr


def test_demo_says_how_to_start_redis(database_url: str) -> None:
    proc = _demo(_env(database_url, ANALYTICS_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"), timeout=60)
    assert proc.returncode == 2
    assert "redis-server --daemonize yes" in proc.stderr and "ANALYTICS_REDIS_URL" in proc.stderr


def test_demo_says_how_to_start_postgres(redis_available: str) -> None:
    proc = _demo(_env(f"postgresql://postgres@127.0.0.1:{free_port()}/analytics"), timeout=60)
    assert proc.returncode == 2
    assert "pg_ctlcluster" in proc.stderr and "ANALYTICS_DATABASE_URL" in proc.stderr


def _group_alive(pgid: int) -> bool:
    """Any live process in process group ``pgid`` (the worker's own group: its pool, its beat)?"""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


@pytest.mark.parametrize(
    ("sig", "when"),
    [(signal.SIGINT, "Tracking"), (signal.SIGTERM, "started worker pid")],
    ids=["ctrl-c-while-tracking", "sigterm-while-worker-starts"],
)
def test_interrupted_demo_stops_its_worker(
    redis_available: str, database_url: str, tmp_path: Path, sig: signal.Signals, when: str
) -> None:
    out_path = tmp_path / "demo.out"
    with out_path.open("w") as out:
        demo = subprocess.Popen(
            [sys.executable, "-m", "bridge.demo", "--users", "200", "--events-per-user", "5000"],
            env=_env(database_url),
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    pid = 0
    try:
        wait_for_sync(lambda: when in out_path.read_text(), timeout=120, message=f"{when!r} printed")
        pid = int(re.search(r"started worker pid (\d+)", out_path.read_text()).group(1))  # type: ignore[union-attr]
        demo.send_signal(sig)
        code = demo.wait(90)
        text = out_path.read_text()
        assert code == 130, text
        assert "interrupted" in text and f"worker pid {pid} stopped" in text, text
        wait_for_sync(lambda: _gone(pid), timeout=30, message=f"worker {pid} gone")
        wait_for_sync(lambda: not _group_alive(pid), timeout=30, message=f"worker {pid}'s pool gone")
    except BaseException:
        # Whatever failed (a deadline included), show what the demo printed.
        print(f"--- demo output (worker pid {pid}) ---\n{out_path.read_text()}")
        raise
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait(10)
