"""The benchmark program runs end to end (tiny mode): every section, the table, the JSON.

No timed assertion here: speed is shown by the ratios ``nox -s bench`` prints, never by a test that a
busy CI machine would make flaky. This only proves the program works and reports every target.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PG_ADMIN_URL

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("track", "threads", "drain", "partitions", "memory", "e2e", "scale")


@pytest.mark.e2e
def test_bench_tiny_mode_runs_every_section(redis_available: str, database_url: str, tmp_path: Path) -> None:
    # database_url: PostgreSQL must be up (the fixture fails with how to start it); the bench makes
    # and drops its own databases beside it.
    out = tmp_path / "bench.json"
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.run(
        [
            sys.executable, "-m", "benchmarks", "--tiny", "--json", str(out),
            "--redis-url", redis_available, "--pg-url", PG_ADMIN_URL,
        ],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "### Targets" in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["mode"] == "tiny"
    assert doc["machine"]["cores"] >= 1
    titles = list(doc["sections"])
    assert len(titles) == len(SECTIONS), titles
    names = {t["name"] for t in doc["targets"]}
    expected_names = (
        *("ceiling", "naive", "old design", "Segment", "PostHog", "round trip", "COPY", "JSON"),
        *("1,024 callers / 256 callers", "1 thread / raw sync pipeline"),
        # the scale section: the tiny mode starts no cluster, so only its plain-Redis targets
        *("K=1 plain Redis / track section", "drain processes / 1 over the same queue"),
    )
    for expected in expected_names:
        assert any(expected in name for name in names), (expected, names)
    assert any("end-to-end p99" in name for name in names)
    assert "no throwaway Redis Cluster started" in proc.stdout  # the tiny mode says what it skipped
    for target in doc["targets"]:
        assert isinstance(target["passed"], bool)
        assert target["value"] == target["value"], target  # a number, not NaN
