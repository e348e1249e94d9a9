"""17: a visibility timeout the lease heartbeat cannot keep (under twice the Redis timeout) is refused
at start-up; one shorter than the time limits is fine (leases are renewed and fenced)."""

from __future__ import annotations

import re

import pytest
from helpers import wait_for_sync

from analytics_sdk import ConfigurationError, Settings

from .conftest import Fleet

pytestmark = pytest.mark.faults


@pytest.mark.timeout(60)
def test_17_visibility_timeout_the_heartbeat_cannot_keep_is_refused_at_startup(
    sdk_settings: Settings, fleet: Fleet
) -> None:
    from bridge.celery_app import check_time_limits

    bad = sdk_settings.replace(analytics_visibility_timeout=9.5, analytics_redis_timeout=5.0)
    with pytest.raises(ConfigurationError) as refused:
        check_time_limits(bad)
    assert refused.value.variable == "ANALYTICS_VISIBILITY_TIMEOUT"

    # The real start-up: the worker process must exit non-zero, naming the variable and its value,
    # before it consumes anything.
    worker = fleet.worker(bad, wait=False)
    wait_for_sync(lambda: not worker.alive(), timeout=45, message="the worker refuses to start")
    assert worker.process.returncode != 0
    log = worker.log()
    assert re.search(r"ANALYTICS_VISIBILITY_TIMEOUT=9\.5", log), log[-3000:]
    assert not re.search(r"\S+@\S+ ready\.", log)

    # Exactly twice is accepted, and so is a visibility timeout below the hard time limit: a drain
    # renews its leases while it works, so a long drain keeps them.
    check_time_limits(bad.replace(analytics_visibility_timeout=10.0))
    check_time_limits(
        bad.replace(
            analytics_visibility_timeout=10.0,
            analytics_task_time_limit=20.0,
            analytics_task_soft_time_limit=15.0,
        )
    )
    with pytest.raises(ConfigurationError):  # the soft limit still comes first
        check_time_limits(bad.replace(analytics_task_soft_time_limit=20.0, analytics_task_time_limit=20.0))
