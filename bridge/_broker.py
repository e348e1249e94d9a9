"""The Celery broker next to a Redis Cluster: never the cluster itself.

kombu's Redis transport does not support Redis Cluster: it sends multi-key commands and pipelines
over keys of different slots (CROSSSLOT) and knows nothing of MOVED. So with
``ANALYTICS_REDIS_CLUSTER=true`` the broker must be RabbitMQ or a separate, plain Redis, and
``ANALYTICS_BROKER_URL`` must say which: its default, the Redis URL, is the cluster.

:func:`check_broker` refuses (:class:`~analytics_sdk.ConfigurationError` naming the variable) a
broker URL that is missing or names a node of the cluster (the host and port of
``ANALYTICS_REDIS_URL`` or of any of ``ANALYTICS_REDIS_CLUSTER_NODES``). It runs in
:func:`bridge.install` (so ``celery -A bridge worker`` refuses at import), at worker start-up
(:mod:`bridge._worker_start`, for an app whose broker changed after install) and in
``analytics-bridge flush``. A cluster node this process was not told about cannot be recognised;
the documentation (docs/cluster-operations.md) states the rule.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from analytics_sdk._exceptions import ConfigurationError
from analytics_sdk._settings import Settings, env_name, redact_url

__all__ = ["check_broker"]

_LOOPBACK = {"localhost", "127.0.0.1", "::1", "[::1]"}
_REDIS_SCHEMES = {"redis", "rediss", "sentinel"}
_ADVICE = (
    "kombu's Redis transport does not support Redis Cluster (its multi-key commands fail with "
    "CROSSSLOT): use RabbitMQ (amqp://...) or a separate, non-cluster Redis as the Celery broker"
)


def _host(host: str) -> str:
    host = host.lower()
    return "127.0.0.1" if host in _LOOPBACK else host


def _cluster_nodes(settings: Settings) -> set[tuple[str, int]]:
    parts = urlsplit(settings.redis_dsn)
    nodes = {(_host(parts.hostname or "localhost"), parts.port or 6379)}
    nodes |= {(_host(host), port) for host, port in settings.cluster_startup_nodes}
    return nodes


def check_broker(settings: Settings, broker_url: str | None = None, *, where: str | None = None) -> None:
    """With ``ANALYTICS_REDIS_CLUSTER``, refuse a broker that is missing or is the cluster.

    ``broker_url`` is the URL to judge (a Celery app's ``broker_url``), named ``where`` in the
    message; by default the SDK's own, ``ANALYTICS_BROKER_URL``, to which the clients send the flush
    task. Without the cluster setting nothing is checked: a plain Redis is a fine broker."""
    if not settings.analytics_redis_cluster:
        return
    variable = where or env_name("broker_url")
    url = broker_url if broker_url is not None else settings.broker_url
    if not url:
        raise ConfigurationError(
            variable,
            None,
            f"must be set with {env_name('analytics_redis_cluster')}=true: it defaults to "
            f"{env_name('redis_url')}, the cluster, and {_ADVICE}",
        )
    nodes = _cluster_nodes(settings)
    # kombu takes several URLs separated by ';' (failover): each must stay off the cluster.
    for one in str(url).split(";"):
        parts = urlsplit(one.strip())
        if parts.scheme.split("+")[0] not in _REDIS_SCHEMES:
            continue
        try:
            address = (_host(parts.hostname or "localhost"), parts.port or 6379)
        except ValueError:  # a port that is no number: kombu refuses it on its own
            continue
        if address in nodes:
            raise ConfigurationError(
                variable,
                redact_url(str(url)),
                f"points at the Redis Cluster ({address[0]}:{address[1]} is a node of "
                f"{env_name('redis_url')} / {env_name('redis_cluster_nodes')}): {_ADVICE}",
            )
