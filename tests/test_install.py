"""bridge.install(app) on applications' own Celery apps: what it adds, what it leaves, what it refuses.

Apps are built in-process (nothing connects until a message is sent); messages are read raw from a
throwaway broker to see their content type. The real worker runs in test_existing_celery_app.py.
"""

from __future__ import annotations

import copy
import json
import logging
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery
from celery.schedules import crontab
from celery.signals import celeryd_after_setup, worker_shutting_down

import bridge
from analytics_sdk import ConfigurationError, Settings
from bridge import _shutdown
from bridge._errors import CONNECTION_ERRORS
from bridge.celery_app import app as bridge_app
from bridge.tasks import flush, flush_analytics_events
from tests.worker_proc import private_broker

THEIR_CONFIG: dict[str, Any] = {
    "broker_url": "redis://127.0.0.1:1/0",
    "task_serializer": "yaml",
    "accept_content": ["yaml", "json"],
    "result_serializer": "yaml",
    "task_default_queue": "default",
    "task_routes": [{"billing.*": {"queue": "billing"}}],
    "task_time_limit": 5,
    "task_acks_late": False,
    "worker_prefetch_multiplier": 8,
    "timezone": "Europe/Paris",
    "beat_schedule": {"nightly": {"task": "billing.invoice", "schedule": crontab(hour=3, minute=0)}},
}


def their_app(**overrides: Any) -> Celery:
    app = Celery("theirs", set_as_current=False)
    app.conf.update({**THEIR_CONFIG, **overrides})

    @app.task(name="billing.invoice", shared=False)
    def invoice(n: int) -> int:
        return n * 2

    return app


def snapshot(app: Celery) -> dict[str, Any]:
    return {key: copy.deepcopy(app.conf[key]) for key in app.conf}


@pytest.fixture(autouse=True)
def _flush_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ANALYTICS_TASK_TIME_LIMIT", "ANALYTICS_TASK_SOFT_TIME_LIMIT", "ANALYTICS_FAILPOINTS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ANALYTICS_FLUSH_INTERVAL", "30")


def test_install_adds_the_task_route_and_beat_entry_and_nothing_else() -> None:
    app = their_app()
    before, tasks_before = snapshot(app), set(app.tasks)  # finalized first: install works either way
    task = bridge.install(app)
    after = snapshot(app)
    changed = {key for key in before.keys() | after.keys() if before.get(key) != after.get(key)}
    assert changed == {"task_routes", "beat_schedule"}
    assert after["task_routes"] == [
        {"analytics.maintain_partitions": {"queue": "analytics", "serializer": "json"}},
        {"flush_analytics_events": {"queue": "analytics", "serializer": "json"}},
        {"billing.*": {"queue": "billing"}},
    ]
    assert after["beat_schedule"] == {
        **before["beat_schedule"],
        "flush-analytics-events": {
            "task": "flush_analytics_events",
            "schedule": timedelta(seconds=30),
            "options": {"queue": "analytics", "expires": 30.0},
        },
        # the partition maintenance (issue 10), daily
        "maintain-analytics-partitions": {
            "task": "analytics.maintain_partitions",
            "schedule": crontab(minute=7, hour=3),
            "options": {"queue": "analytics", "expires": 3600},
        },
    }
    assert set(app.tasks) - tasks_before == {"flush_analytics_events", "analytics.maintain_partitions"}
    # the task: the same policy as the bridge's own, its limits its own, JSON whatever the app says
    settings = Settings.from_env()
    ours = bridge_app.tasks["flush_analytics_events"]
    assert task is app.tasks["flush_analytics_events"] and task is not ours
    for attribute in ("name", "acks_late", "reject_on_worker_lost", "max_retries", "retry_backoff"):
        assert getattr(task, attribute) == getattr(ours, attribute), attribute
    assert tuple(task.autoretry_for) == CONNECTION_ERRORS and task.retry_jitter
    assert task.serializer == "json" and task.ignore_result is True and task.acks_late is True
    assert (task.time_limit, task.soft_time_limit) == (
        settings.analytics_task_time_limit,
        settings.analytics_task_soft_time_limit,
    )
    assert type(task).__wrapped__ is flush is type(ours).__wrapped__  # one body, bound twice
    assert app.amqp.router.route({}, "flush_analytics_events")["queue"].name == "analytics"
    assert app.amqp.router.route({}, "billing.invoice")["queue"].name == "billing"
    assert app.tasks["billing.invoice"].serializer == "yaml"


def test_a_dict_of_routes_stays_a_dict_and_no_routes_get_one() -> None:
    app = their_app(task_routes={"billing.*": "billing"})
    bridge.install(app)
    assert app.conf.task_routes == {
        "flush_analytics_events": {"queue": "analytics", "serializer": "json"},
        "billing.*": "billing",
        "analytics.maintain_partitions": {"queue": "analytics", "serializer": "json"},
    }
    bare = Celery("bare", set_as_current=False)
    bridge.install(bare, beat=False)
    assert bare.conf.task_routes == {
        "flush_analytics_events": {"queue": "analytics", "serializer": "json"},
        "analytics.maintain_partitions": {"queue": "analytics", "serializer": "json"},
    }
    assert bare.conf.beat_schedule == {}
    assert Celery("fresh", set_as_current=False).conf.beat_schedule == {}  # no shared default mutated


def test_install_twice_changes_nothing_and_other_apps_do_not_get_the_task() -> None:
    app = their_app()
    task = bridge.install(app)
    routes, schedule = copy.deepcopy(app.conf.task_routes), copy.deepcopy(app.conf.beat_schedule)
    assert bridge.install(app) is task
    assert app.conf.task_routes == routes and app.conf.beat_schedule == schedule
    other = Celery("other", set_as_current=False)
    assert "flush_analytics_events" not in other.tasks  # registered on the app, not shared


def test_messages_are_json_whatever_the_apps_serializer(tmp_path: Path) -> None:
    with private_broker(tmp_path) as broker:
        app = their_app(broker_url=broker.url)
        task = bridge.install(app)
        task.apply_async()  # as beat and the task's own re-send do
        app.send_task("flush_analytics_events")  # by name: the route says JSON
        app.tasks["billing.invoice"].apply_async((1,))  # theirs: their serializer
        with broker.client() as client:
            ours = [json.loads(m) for m in client.lrange("analytics", 0, -1)]
            theirs = [json.loads(m) for m in client.lrange("billing", 0, -1)]
    assert [m["content-type"] for m in ours] == ["application/json", "application/json"]
    assert all(m["headers"]["task"] == "flush_analytics_events" for m in ours)
    # Celery 5.7 copies the task's own limits into the message; older releases send [None, None] and
    # the worker applies the task's attributes (pinned by the first test of this module).
    limits = [
        Settings.from_env().analytics_task_time_limit,
        Settings.from_env().analytics_task_soft_time_limit,
    ]
    assert ours[0]["headers"]["timelimit"] in (limits, [None, None])
    assert [m["content-type"] for m in theirs] == ["application/x-yaml"]


@pytest.mark.parametrize(
    ("overrides", "setting"),
    [
        ({"accept_content": ["pickle"]}, "accept_content"),
        ({"task_routes": {"flush_analytics_events": {"queue": "celery"}}}, "task_routes"),
        (
            {"beat_schedule": {"flush": {"task": "flush_analytics_events", "schedule": 60.0}}},
            "beat_schedule",
        ),
    ],
)
def test_what_cannot_work_is_refused_naming_the_setting_and_the_app_is_left_as_it_was(
    overrides: dict[str, Any], setting: str
) -> None:
    app = their_app(**overrides)
    before = snapshot(app)
    with pytest.raises(ConfigurationError) as info:
        bridge.install(app)
    assert info.value.variable == setting and str(info.value).startswith(f"{setting}=")
    assert snapshot(app) == before
    assert "flush_analytics_events" not in app.tasks


def test_pickle_only_message_says_what_to_add() -> None:
    with pytest.raises(ConfigurationError, match=r"add 'json' to the app's accept_content"):
        bridge.install(their_app(accept_content=["pickle"]))
    bridge.install(their_app(accept_content=["application/json", "pickle"]))  # a content type counts


def test_an_old_task_of_the_same_name_is_refused() -> None:
    app = their_app()

    @app.task(name="flush_analytics_events", shared=False, lazy=False)
    def legacy() -> None:  # the task of the service the bridge replaces
        pass

    # (Celery 5.7 also warns "already registered" on its own; older releases do not.)
    with pytest.raises(ConfigurationError, match=r"already has a task of this name.*legacy"):
        bridge.install(app)
    assert app.conf.task_routes == THEIR_CONFIG["task_routes"]


def test_time_limits_are_checked_at_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANALYTICS_TASK_SOFT_TIME_LIMIT", "60")
    monkeypatch.setenv("ANALYTICS_TASK_TIME_LIMIT", "60")
    with pytest.raises(ConfigurationError, match="ANALYTICS_TASK_SOFT_TIME_LIMIT"):
        bridge.install(their_app())


def test_worker_start_up_runs_the_checks_for_an_installed_app(caplog: pytest.LogCaptureFixture) -> None:
    """celeryd_after_setup as a worker of the user's app sends it: the Redis/table preflight runs for
    it; the app's settings that hurt the drain are named in a WARNING; an app without the task is
    left alone."""
    caplog.set_level(logging.INFO, logger="bridge")
    app = their_app()
    bridge.install(app)
    plain = Celery("plain", set_as_current=False)
    celeryd_after_setup.send(sender="w@host", instance=SimpleNamespace(app=plain), conf=plain.conf)
    assert not caplog.records, "a worker of an app without the task ran the checks"
    celeryd_after_setup.send(sender="w@host", instance=SimpleNamespace(app=app), conf=app.conf)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("start-up check: Redis 7.") for m in messages), messages
    assert any(m.startswith("start-up check: PostgreSQL") for m in messages), messages
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith("worker_cancel_long_running_tasks_on_connection_loss is off") for m in warnings)
    assert any("this worker consumes from broker redis://127.0.0.1:1/0" in m for m in warnings)


def test_a_pickle_only_app_configured_after_install_refuses_to_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = their_app()
    bridge.install(app)
    app.conf.accept_content = ["pickle"]
    with pytest.raises(SystemExit) as info:
        celeryd_after_setup.send(sender="w@host", instance=SimpleNamespace(app=app), conf=app.conf)
    assert info.value.code == 2
    assert any("refusing to start: accept_content=" in r.getMessage() for r in caplog.records)


def test_worker_shutdown_raises_the_stop_flag_for_installed_apps() -> None:
    bridge.install(their_app())
    _shutdown.reset()
    try:
        worker_shutting_down.send(sender="w@host", sig="SIGTERM", how="Warm", exitcode=0)
        assert _shutdown.stop_requested()
    finally:
        _shutdown.reset()


def test_bridge_tasks_still_exposes_the_bridge_apps_task() -> None:
    assert flush_analytics_events is bridge_app.tasks["flush_analytics_events"]
    assert bridge.install(bridge_app) is flush_analytics_events
