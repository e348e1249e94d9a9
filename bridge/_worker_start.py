"""What a worker of an app with the flush task does at start-up and at shutdown.

:func:`bridge.install` records each app it installed on (:func:`remember`) and calls :func:`connect`,
which wires two Celery signals once per process:

- ``celeryd_after_setup`` (logging set up, pool not yet forked): for an installed app only, the app's
  configuration is checked again (it may have changed after ``install``: a pickle-only
  ``accept_content`` or a broker on the queue's Redis Cluster refuses to start, exit code 2), a
  setting that hurts the drain is named in a WARNING, and :func:`bridge._preflight.worker_preflight`
  checks Redis >= 7.0 (every primary of a cluster), loads the scripts, and checks the table. A worker
  of any other app in the same process is left alone.
- ``worker_shutting_down``: raises the stop flag (:mod:`bridge._shutdown`) so every drain of the pool
  stops claiming; the flag itself is made by ``install``, before the pool forks.

Signals are wired, not sent, at import: nothing here connects to a server until a worker starts.
"""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING, Any, NamedTuple

from celery.signals import celeryd_after_setup, worker_shutting_down

from analytics_sdk._exceptions import ConfigurationError
from analytics_sdk._sender import FLUSH_QUEUE, FLUSH_TASK
from analytics_sdk._settings import Settings, env_name, redact_url

from . import _shutdown
from ._broker import check_broker

if TYPE_CHECKING:
    from celery import Celery, Task

__all__ = ["Installed", "accepts_json", "check_accepts_json", "connect", "installed", "remember"]

logger = logging.getLogger(__name__)

_JSON = {"json", "application/json"}


class Installed(NamedTuple):
    task: Task[Any, Any]
    settings: Settings


_apps: weakref.WeakKeyDictionary[Celery, Installed] = weakref.WeakKeyDictionary()


def remember(app: Celery, entry: Installed) -> None:
    _apps[app] = entry


def installed(app: object) -> Installed | None:
    """What :func:`bridge.install` put on ``app``, or None if it is not one of ours."""
    try:
        return _apps.get(app)  # type: ignore[call-overload, no-any-return]
    except TypeError:  # not weak-referenceable: certainly not an app we installed on
        return None


def accepts_json(accept_content: object) -> bool:
    if isinstance(accept_content, str):
        names: list[object] = [accept_content]
    elif isinstance(accept_content, (list, tuple, set, frozenset)):
        names = list(accept_content)
    else:
        names = []
    return any(str(name).strip().lower() in _JSON for name in names)


def check_accepts_json(app: Celery) -> None:
    """The worker decodes the flush task's JSON messages only if ``accept_content`` lists json.

    Refused rather than fixed: adding json to someone's accept list is a security decision of theirs.
    """
    accept = app.conf.accept_content
    if not accepts_json(accept):
        raise ConfigurationError(
            "accept_content",
            accept,
            f"the Celery app {app.main!r} does not accept JSON, and {FLUSH_TASK}'s messages are JSON "
            "only (nothing of the bridge is ever pickled): add 'json' to the app's accept_content "
            "(CELERY_ACCEPT_CONTENT with a CELERY namespace), e.g. accept_content=['json', 'pickle']",
        )


def _warn_about(app: Celery, entry: Installed) -> None:
    conf = app.conf
    if not conf.worker_cancel_long_running_tasks_on_connection_loss:
        # Seen in fault scenario 7 with the bridge's own app: a drain left running through a broker
        # reconnect outlives its soft time limit, billiard signals a child that already finished and
        # the worker stops for good ("Unrecoverable error"). Their setting: named, not changed.
        logger.warning(
            "worker_cancel_long_running_tasks_on_connection_loss is off for app %r: when the broker "
            "connection drops, a running %s keeps going while the consumer reconnects; set it to True "
            "(the drain's batches stay leased and are reclaimed, nothing is lost)",
            app.main,
            FLUSH_TASK,
        )
    route = app.amqp.router.route({}, FLUSH_TASK)
    queue = route.get("queue")
    if getattr(queue, "name", None) != FLUSH_QUEUE:
        logger.warning(
            "%s is routed to %r, not %r: task_routes was replaced after bridge.install(app); "
            "call install after configuring the app",
            FLUSH_TASK,
            getattr(queue, "name", queue),
            FLUSH_QUEUE,
        )
    broker, sdk_broker = conf.broker_url, entry.settings.broker_dsn
    if broker and str(broker) != sdk_broker:
        logger.warning(
            "this worker consumes from broker %s, but %s is %s: client.flush_events_now() and the "
            "backlog trigger send %s there; set %s to the app's broker",
            redact_url(str(broker)),
            env_name("broker_url"),
            redact_url(sdk_broker),
            FLUSH_TASK,
            env_name("broker_url"),
        )


def _on_worker_setup(sender: object = None, instance: object = None, **_: object) -> None:
    app = getattr(instance, "app", None)
    entry = installed(app)
    if entry is None:
        return  # another app's worker in this process
    assert app is not None
    try:
        check_accepts_json(app)
        # the app's broker may have changed since install (kombu cannot consume from a cluster)
        check_broker(entry.settings, app.conf.broker_url or None, where="broker_url")
    except ConfigurationError as exc:
        logger.critical("refusing to start: %s", exc)
        raise SystemExit(2) from exc  # a signal handler's Exception would only be logged
    _warn_about(app, entry)
    from ._preflight import worker_preflight  # asyncpg and redis.asyncio: worker processes only

    worker_preflight(entry.settings)


def _on_worker_shutting_down(**_: Any) -> None:
    _shutdown.request_stop()


def connect() -> None:
    """Wire the start-up and shutdown handlers (idempotent: one connection per process)."""
    celeryd_after_setup.connect(_on_worker_setup, weak=False, dispatch_uid="analytics-bridge-start")
    worker_shutting_down.connect(
        _on_worker_shutting_down, weak=False, dispatch_uid="analytics-bridge-shutdown"
    )
