"""The public surface: ``__all__`` pinned, everything importable, no heavy or secret-leaking side effects."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import analytics_sdk
from analytics_sdk import AnalyticsClient, Settings, SyncAnalyticsClient

ROOT = Path(__file__).resolve().parent.parent
SECRET = "hunter2-Secret"


def test_all_is_pinned() -> None:
    assert analytics_sdk.__all__ == [
        "AnalyticsClient",
        "AnalyticsError",
        "ClientClosedError",
        "ConfigurationError",
        "Event",
        "PublishError",
        "Settings",
        "SyncAnalyticsClient",
        "ValidationError",
        "decode",
        "validate",
    ]
    assert analytics_sdk.__all__ == sorted(analytics_sdk.__all__)


def test_everything_in_all_is_importable() -> None:
    namespace: dict[str, object] = {}
    exec("from analytics_sdk import *", namespace)
    for name in analytics_sdk.__all__:
        assert namespace[name] is getattr(analytics_sdk, name)
        assert getattr(analytics_sdk, name).__module__.startswith("analytics_sdk")


def test_private_modules_declare_all() -> None:
    private = ["_batcher", "_client", "_event", "_exceptions", "_keys", "_metadata", "_queue", "_sender"]
    newer = ["_backlog", "_disabled", "_proxies", "_tracking", "asgi", "wsgi"]
    for module in [*private, "_settings", "_sync", *newer]:
        loaded = importlib.import_module(f"analytics_sdk.{module}")
        for name in loaded.__all__:
            assert hasattr(loaded, name), f"{module}.__all__ names missing {name}"


def test_version_matches_pyproject_and_typed() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert analytics_sdk.__version__ == project["version"]
    assert (ROOT / "analytics_sdk" / "py.typed").exists()


def test_import_is_light_and_never_touches_the_bridge() -> None:
    script = textwrap.dedent(
        """
        import sys
        import analytics_sdk
        heavy = ("bridge", "celery", "kombu", "asyncpg", "sqlalchemy")
        print(sorted({m.split(".")[0] for m in sys.modules} & set(heavy)))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", "celery is loaded on the first flush, the bridge never"


def test_reprs_hide_passwords() -> None:
    settings = Settings(
        redis_url=f"redis://app:{SECRET}@cache:6379/0",
        broker_url=f"redis://:{SECRET}@broker:6379/9",
        database_url=f"postgresql://app:{SECRET}@db/events",
        redis_password=SECRET,
    )
    for obj in (settings, AnalyticsClient(settings), SyncAnalyticsClient(settings)):
        assert SECRET not in repr(obj)
        assert SECRET not in str(obj)
    assert "cache" in repr(AnalyticsClient(settings)), "the repr still says where it points"
