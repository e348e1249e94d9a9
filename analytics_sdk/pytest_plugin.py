"""pytest fixtures for applications that track events: recorders in place of the real clients.

Installed with the package, this plugin is active in every pytest run through its ``pytest11`` entry
point; without the installed package load it with ``-p analytics_sdk.pytest_plugin`` (or
``pytest_plugins = ["analytics_sdk.pytest_plugin"]`` in a conftest.py).

- ``analytics_recorder``: a fresh :class:`~analytics_sdk.testing.RecordingClient` (the async client)
  per test, closed after it.
- ``analytics_sync_recorder``: the same for :class:`~analytics_sdk.testing.RecordingSyncClient`.
- ``analytics_recorder_settings``: the :class:`~analytics_sdk.Settings` both are made with (the
  defaults, whatever the environment says); override it in a conftest.py to test, say, a smaller
  metadata limit.

Both fixtures are plain (sync) fixtures even for the async recorder: it holds no connection and needs
no event loop until first used (it then binds to the test's loop, as the real client would), so it
works the same under pytest-asyncio in strict or auto mode and under anyio's pytest plugin.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ._settings import Settings
from .testing import RecordingClient, RecordingSyncClient

__all__ = ["analytics_recorder", "analytics_recorder_settings", "analytics_sync_recorder"]


@pytest.fixture
def analytics_recorder_settings() -> Settings:
    """The settings the recorders validate with: the defaults, not the environment's ANALYTICS_*."""
    return Settings()


@pytest.fixture
def analytics_recorder(analytics_recorder_settings: Settings) -> Iterator[RecordingClient]:
    """A RecordingClient (drop-in for AnalyticsClient) for this test; ``.events`` holds what it got."""
    client = RecordingClient(analytics_recorder_settings)
    yield client
    client._closed = True  # aclose() without a loop: closing a recorder releases nothing


@pytest.fixture
def analytics_sync_recorder(analytics_recorder_settings: Settings) -> Iterator[RecordingSyncClient]:
    """A RecordingSyncClient (drop-in for SyncAnalyticsClient) for this test."""
    with RecordingSyncClient(analytics_recorder_settings) as client:
        yield client
