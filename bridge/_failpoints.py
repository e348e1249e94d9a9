"""Named fail points for the fault-injection tests, in the manner of etcd's gofail.

Inert unless the environment variable ``ANALYTICS_FAILPOINTS`` is set, which only tests do. Its value
is a comma-separated list of ``name=action``; actions:

- ``kill``          SIGKILL this process (a worker dying with no chance to clean up)
- ``sleep:SECONDS`` block the event loop's thread this long (a hung insert, a time limit hit)
- ``hang:SECONDS``  the same with SIGUSR1/SIGTERM/SIGINT blocked: a C call that never returns to the
                    interpreter, so Celery's soft time limit (SIGUSR1) cannot interrupt it and only the
                    hard limit's SIGKILL ends it
- ``raise``         raise :class:`FailPointError`

Points the drain passes: ``after_claim`` (claimed, nothing inserted), ``before_commit`` (rows sent,
transaction open), ``after_commit`` (committed, not acked). ``crash_on_event=<event_id>`` SIGKILLs
a drain whose batch holds that event, every time (a poison batch that crashes its worker).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable

__all__ = ["FailPointError", "crash_on_event", "hit"]

ENV = "ANALYTICS_FAILPOINTS"


class FailPointError(RuntimeError):
    """Raised by a fail point armed with ``raise``."""


def _armed() -> dict[str, str]:
    raw = os.environ.get(ENV, "")
    if not raw:
        return {}
    points = {}
    for item in raw.split(","):
        name, _, action = item.strip().partition("=")
        if name:
            points[name] = action
    return points


def _act(name: str, action: str) -> None:
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action.startswith("sleep:"):
        time.sleep(float(action.split(":", 1)[1]))
    elif action.startswith("hang:"):
        blocked = {signal.SIGUSR1, signal.SIGTERM, signal.SIGINT}
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            time.sleep(float(action.split(":", 1)[1]))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    elif action == "raise":
        raise FailPointError(f"fail point {name} armed")


def hit(name: str) -> None:
    """Run the action armed for ``name``, if any. Costs one dict lookup when nothing is armed."""
    if ENV not in os.environ:
        return
    action = _armed().get(name)
    if action:
        _act(name, action)


def crash_on_event(event_ids: Iterable[str]) -> None:
    """SIGKILL this process if the armed poison event_id is among ``event_ids``."""
    if ENV not in os.environ:
        return
    poison = _armed().get("crash_on_event")
    if poison and poison in set(event_ids):
        os.kill(os.getpid(), signal.SIGKILL)
