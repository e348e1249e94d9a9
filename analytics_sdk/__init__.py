"""Async-first product-analytics SDK: validated events, durably queued in Redis, drained to PostgreSQL.

>>> async with AnalyticsClient.from_env() as client:          # doctest: +SKIP
...     event_id = await client.track("page_view", user_id="42")
"""

from ._client import AnalyticsClient
from ._event import Event, decode, validate
from ._exceptions import (
    AnalyticsError,
    ClientClosedError,
    ConfigurationError,
    PublishError,
    ValidationError,
)
from ._settings import Settings
from ._sync import SyncAnalyticsClient

__all__ = [
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

__version__ = "0.1.0"
