"""The `analytics-bridge` console script: checks the `bridge` extra is installed, then runs the CLI.

An application installs the distribution without extras (``pip install durable-analytics``) and
still gets the ``bridge`` package and this command; without the check every command would die
with a traceback ending in ``No module named 'asyncpg'``. Nothing is imported to check: a missing
module is found by its spec, so the check costs nothing when the extra is there.
"""

from __future__ import annotations

import sys
from importlib.util import find_spec

__all__ = ["DISTRIBUTION", "EXTRA_MODULES", "main", "missing_extra_modules"]

#: The name the package is published under (``analytics-sdk`` on PyPI is somebody else's).
DISTRIBUTION = "durable-analytics"
#: Module -> the requirement of the ``bridge`` extra that provides it (pyproject.toml).
EXTRA_MODULES = {
    "asyncpg": "asyncpg",
    "sqlalchemy": "sqlalchemy[asyncio]",
    "alembic": "alembic",
    "click": "click",
    "prometheus_client": "prometheus-client",
}


def missing_extra_modules() -> list[str]:
    """The modules of the ``bridge`` extra that cannot be imported here."""
    missing = []
    for module in EXTRA_MODULES:
        try:
            spec = find_spec(module)
        except (ImportError, ValueError):  # a broken install reads as missing
            spec = None
        if spec is None:
            missing.append(module)
    return missing


def main() -> None:
    missing = missing_extra_modules()
    if missing:
        needs = ", ".join(EXTRA_MODULES[m] for m in missing)
        sys.stderr.write(
            f"analytics-bridge needs the 'bridge' extra, which is not installed here (missing: {needs}).\n"
            f"Install it with: python -m pip install '{DISTRIBUTION}[bridge]'"
            " (from a checkout: python -m pip install '.[bridge]').\n"
            "An application that only tracks events does not need this command.\n"
        )
        # 2: the CLI's exit code for a setup that cannot work (see `analytics-bridge --help`)
        raise SystemExit(2)
    from ._commands import main as cli_main

    cli_main(prog_name="analytics-bridge")
