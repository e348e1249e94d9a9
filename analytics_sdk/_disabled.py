"""The switch that turns every client of a process off: ``ANALYTICS_ENABLED=false``.

A disabled client validates and encodes each event exactly as an enabled one does and returns its
event_id, but never connects to anything: no Redis, no broker, no thread. It is for local development
and CI without a Redis; the test kit (:mod:`analytics_sdk.testing`) is for asserting on events.

The environment variable is read by every client when it is made, whatever ``Settings`` it was given:
PostHog's users were bitten by a client built with explicit options that ignored the global switch
(``disabled`` had to be repeated on every instance). ``Settings(analytics_enabled=False)`` switches
off one client; ``ANALYTICS_ENABLED=false`` switches off all of them, and a client is enabled only if
both say so. Each process says once in its log that analytics is off, so a forgotten switch in
production is visible.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping

from ._settings import Settings, env_name, parse_env

__all__ = ["announce_disabled", "client_enabled"]

logger = logging.getLogger(__name__)

_VARIABLE = env_name("analytics_enabled")
_announced = [False]
_lock = threading.Lock()
# A forked child is a new process with its own log stream: it says so again.
os.register_at_fork(after_in_child=lambda: _announced.__setitem__(0, False))


def client_enabled(settings: Settings, environ: Mapping[str, str] | None = None) -> bool:
    """Whether a client made now with ``settings`` sends events; logs once per process if not.

    Raises :class:`ConfigurationError` for a value of ``ANALYTICS_ENABLED`` that is not a boolean.
    """
    env = os.environ if environ is None else environ
    raw = env.get(_VARIABLE)
    globally = True if raw is None or raw == "" else parse_env(_VARIABLE, raw, bool)
    enabled = settings.analytics_enabled and bool(globally)
    if not enabled:
        announce_disabled("the environment" if settings.analytics_enabled else "its Settings")
    return enabled


def announce_disabled(where: str) -> None:
    with _lock:
        if _announced[0]:
            return
        _announced[0] = True
    logger.warning(
        "analytics is disabled (%s=false, set in %s): events are validated and get ids but are not "
        "sent anywhere, and nothing connects to Redis or the broker",
        _VARIABLE,
        where,
    )
