"""The operator CLI, ``analytics-bridge`` (also ``python -m bridge``): migrate, status, flush, dead
letters, the Prometheus exporter and the demo.

The click commands live in ``_commands``; ``_entry`` is the console script, which checks that the
``bridge`` extra is installed before it imports them. So ``main`` (the click group) is loaded on first
use: importing ``bridge.cli._entry`` must work where click itself is missing (an app-only install).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["main"]

if TYPE_CHECKING:
    from ._commands import main


def __getattr__(name: str) -> Any:
    if name == "main":
        from ._commands import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
