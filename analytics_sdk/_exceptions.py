"""Exceptions raised by the analytics SDK.

The hierarchy::

    AnalyticsError                     base of everything this package raises on purpose
    ├── ConfigurationError(ValueError) a setting or environment variable has a bad value
    ├── ValidationError(ValueError)    an event field is missing, of the wrong type or out of range
    ├── PublishError                   Redis did not acknowledge the event (unreachable, timed out, OOM)
    └── ClientClosedError(RuntimeError) the client was used after ``aclose()`` / ``close()``

The ``ValueError`` bases mean "bad input": code that already catches ``ValueError`` around argument
handling keeps working. A ``PublishError`` is chained (``__cause__``) from the Redis error behind it.
"""

from __future__ import annotations

import reprlib

__all__ = [
    "AnalyticsError",
    "ClientClosedError",
    "ConfigurationError",
    "PublishError",
    "ValidationError",
]

_MAX_SHOWN = 80

# reprlib bounds the work as well as the text: a huge or deeply nested (or self-containing) value is
# never rendered whole just to be cut.
_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxdict = _REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxfrozenset = 6
_REPR.maxstring = _REPR.maxother = _MAX_SHOWN


def shorten(value: object, limit: int = _MAX_SHOWN) -> str:
    """repr() of a value, cut so a multi-megabyte bad value never floods a log line."""
    if isinstance(value, str | bytes) and len(value) > limit:
        unit = "chars" if isinstance(value, str) else "bytes"
        return f"{repr(value[:limit])[: limit - 15]}... ({len(value)} {unit})"
    try:
        text = _REPR.repr(value)
    except Exception:  # a broken __repr__ must not replace the error being reported
        text = f"<{type(value).__name__} object>"
    if len(text) <= limit:
        return text
    return f"{text[: limit - 15]}... ({len(text)} chars)"


class AnalyticsError(Exception):
    """Base class of every error the SDK raises on purpose."""


class ConfigurationError(AnalyticsError, ValueError):
    """A setting has a bad value; the message names the variable and shows the value."""

    def __init__(self, variable: str, value: object, reason: str) -> None:
        self.variable = variable
        self.value = value
        self.reason = reason
        super().__init__(f"{variable}={shorten(value)}: {reason}")

    def __reduce__(self) -> tuple[type[ConfigurationError], tuple[str, object, str]]:
        # Exception's default rebuilds from self.args (the one message): copy.copy() and pickle
        # (process pools, test runners) would call __init__ with the wrong arguments.
        return (type(self), (self.variable, self.value, self.reason))


class ValidationError(AnalyticsError, ValueError):
    """An event failed validation; ``field`` names it, ``value`` is what was given."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"{field}={shorten(value)}: {reason}")

    def __reduce__(self) -> tuple[type[ValidationError], tuple[str, object, str]]:
        return (type(self), (self.field, self.value, self.reason))


class PublishError(AnalyticsError):
    """Redis did not acknowledge the event(s): nothing this call carried may be assumed queued."""


class ClientClosedError(AnalyticsError, RuntimeError):
    """The client was used after it was closed."""
