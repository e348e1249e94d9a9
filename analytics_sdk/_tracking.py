"""What the ASGI and WSGI middlewares share: which requests are tracked, the event's fields, and how a
tracking failure is reported (a rate-limited WARNING; never an exception into the application).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ._exceptions import AnalyticsError, ConfigurationError, ValidationError
from ._proxies import LOOPBACK, ForwardedHeader, Network, client_ip, forwarded_hops, parse_networks

__all__ = ["DEFAULT_EVENT_TYPE", "FailureLog", "RequestFacts", "Tracking"]

DEFAULT_EVENT_TYPE = "http_request"
#: Longest path kept in the event: a 100 KB URL is an attack or a bug, not a page.
_MAX_PATH = 2048
_MAX_HEADER = 2048  # the user_agent and referrer columns' limit (FIELD_LIMITS)
_FAILURE_LOG_EVERY = 10.0  # seconds between two warnings about requests not tracked


@dataclass(slots=True)
class RequestFacts:
    """One finished request, as either middleware saw it."""

    method: str
    path: str
    status: int
    started_at: datetime  # wall clock, UTC: the event's created_at
    duration: float  # seconds, from the request's arrival to the end of the response body
    peer: str | None
    user_agent: str | None
    referrer: str | None
    forwarded: list[str]  # every value of the configured forwarded header, in order


class Tracking:
    """The options both middlewares take, checked once, and the event they make of a request.

    ``skip_paths``: exact paths, or prefixes written with a trailing ``*`` (``"/internal/*"``).
    ``trusted_proxies``: ``None`` trusts loopback only; an empty list trusts nobody.
    """

    def __init__(
        self,
        *,
        event_type: str = DEFAULT_EVENT_TYPE,
        skip_paths: Iterable[str] = (),
        trusted_proxies: str | Iterable[str | Network] | None = None,
        forwarded_header: ForwardedHeader = "x-forwarded-for",
    ) -> None:
        if not isinstance(event_type, str) or not event_type:  # else every request would fail later
            raise ValidationError("event_type", event_type, "must be a non-empty string")
        if forwarded_header not in ("x-forwarded-for", "forwarded"):
            reason = "must be 'x-forwarded-for' or 'forwarded'"
            raise ConfigurationError("forwarded_header", forwarded_header, reason)
        self.event_type = event_type
        paths = [skip_paths] if isinstance(skip_paths, str) else list(skip_paths)
        self._skip_exact = frozenset(p for p in paths if not p.endswith("*"))
        self._skip_prefixes = tuple(p[:-1] for p in paths if p.endswith("*"))
        # not `or`: an empty list is a choice (trust nobody), None is the default (loopback)
        self.trusted: tuple[Network, ...] = (
            LOOPBACK if trusted_proxies is None else parse_networks(trusted_proxies)
        )
        self.forwarded_header: ForwardedHeader = forwarded_header

    def skips(self, path: str) -> bool:
        return path in self._skip_exact or path.startswith(self._skip_prefixes)

    def fields(self, facts: RequestFacts, extra: Mapping[str, Any] | None) -> dict[str, Any]:
        """The event's fields; ``extra`` (the hook's answer) adds or overrides, and its
        ``event_metadata`` is merged into the request's."""
        metadata: dict[str, Any] = {
            "method": facts.method,
            "path": facts.path[:_MAX_PATH],
            "status": facts.status,
            "duration_ms": round(facts.duration * 1000, 3),
        }
        hops = forwarded_hops(facts.forwarded, self.forwarded_header)
        fields: dict[str, Any] = {
            "event_type": self.event_type,
            "ip_address": client_ip(facts.peer, hops, self.trusted),
            "user_agent": (facts.user_agent or "")[:_MAX_HEADER] or None,
            "referrer": (facts.referrer or "")[:_MAX_HEADER] or None,
            "created_at": facts.started_at,
        }
        if extra:
            extra = dict(extra)
            more = extra.pop("event_metadata", None)
            if more is not None:
                if not isinstance(more, Mapping):
                    raise ValidationError("event_metadata", more, "from the hook must be a mapping")
                metadata.update(more)
            fields.update(extra)
        fields["event_metadata"] = metadata
        return fields


def now_utc() -> datetime:
    return datetime.now(UTC)


class FailureLog:
    """At most one WARNING per ``every`` seconds about requests not tracked, with how many were missed.

    A Redis outage fails every request's tracking; one line per request would bury the log (and cost
    as much as the request). The first failure is logged at once, then a line per window counts the
    rest. Analytics' own errors (Redis down, a bad field) are logged without a traceback; anything
    else (a bug in the hook) with one.
    """

    def __init__(self, logger: logging.Logger, every: float = _FAILURE_LOG_EVERY) -> None:
        self._logger = logger
        self._every = every
        self._last = -float("inf")
        self._missed = 0
        self.failures = 0  # in total, for tests and curious operators
        self._lock = threading.Lock()  # WSGI servers call from many threads

    def failed(self, method: str, path: str, exc: BaseException) -> None:
        with self._lock:
            self.failures += 1
            now = time.monotonic()
            if now - self._last < self._every:
                self._missed += 1
                return
            missed, self._missed, self._last = self._missed, 0, now
        since = f"; {missed} more request(s) not tracked since the last warning" if missed else ""
        self._logger.warning(
            "analytics: %s %s not tracked (%s: %s); the response was served%s",
            method,
            path[:200],
            type(exc).__name__,
            exc,
            since,
            exc_info=None if isinstance(exc, AnalyticsError) else exc,
        )
