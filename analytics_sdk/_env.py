"""Reading ``ANALYTICS_*`` variables: names, parsing, range checks and URLs with their secrets hidden.

The helpers :class:`._settings.Settings` is built with; kept apart so the settings module holds the
settings themselves.
"""

from __future__ import annotations

import math
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ._exceptions import ConfigurationError

__all__ = ["env_name", "parse_env", "redact_url"]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def redact_url(url: str | None) -> str | None:
    """The URL with its password replaced by ``***``, for logs and reprs."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparseable url>"
    if password is not None:
        # The netloc as written, minus the password: .port would raise on a bad port.
        userinfo, _, hostport = parts.netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        parts = parts._replace(netloc=f"{user}:***@{hostport}")
    if parts.query and "password" in parts.query.lower():
        # redis-py also reads ?password=... from the query string.
        query = [(k, "***" if k.lower() == "password" else v) for k, v in parse_qsl(parts.query, True)]
        parts = parts._replace(query=urlencode(query, safe="*"))
    return urlunsplit(parts)


def env_name(attribute: str) -> str:
    """The environment variable that sets ``attribute``."""
    return "ANALYTICS_" + attribute.removeprefix("analytics_").upper()


def _positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    # not (value > 0): NaN compares false both ways and must not slip through; inf is no timeout.
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        reason = "must be a finite number " + ("of 0 or more" if allow_zero else "greater than 0")
        raise ConfigurationError(env_name(name), value, reason)


def _parse_type(annotation: object) -> type:
    text = str(annotation)
    for name, kind in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if text.startswith(name):
            return kind
    raise TypeError(f"unsupported settings type {annotation!r}")


def parse_env(variable: str, raw: str, kind: type) -> object:
    """``raw`` (the text of ``variable``) as ``kind``, as :meth:`Settings.from_env` reads it."""
    return _convert(variable, raw, kind, secret=False)


def _convert(variable: str, raw: str, kind: type, *, secret: bool) -> object:
    shown = "***" if secret else raw
    if kind is str:
        return raw
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigurationError(variable, shown, "must be one of 1/0, true/false, yes/no, on/off")
    try:
        return kind(raw.strip())
    except ValueError:
        expected = "an integer" if kind is int else "a number"
        raise ConfigurationError(variable, shown, f"must be {expected}") from None
