"""Installing: the distribution's name, the install lines, and `analytics-bridge` in an app-only install
(no `bridge` extra: asyncpg made unimportable in a subprocess)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# Run an entry point ("module:function") with the bridge extra's driver missing, as in
# `pip install durable-analytics` without [bridge]: None in sys.modules makes `import asyncpg` fail.
_WITHOUT_ASYNCPG = """
import sys
from importlib import import_module
sys.modules["asyncpg"] = None
module, _, function = sys.argv[1].partition(":")
sys.argv = ["analytics-bridge", *sys.argv[2:]]
getattr(import_module(module), function)()
"""


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )


def _says_which_extra(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "No module named" not in proc.stderr, proc.stderr
    assert "needs the 'bridge' extra" in proc.stderr and "missing: asyncpg" in proc.stderr, proc.stderr
    assert "python -m pip install 'durable-analytics[bridge]'" in proc.stderr, proc.stderr


@pytest.mark.parametrize("command", [["status"], ["migrate"], ["--help"]])
def test_console_script_without_the_bridge_extra_says_which_extra_to_install(command: list[str]) -> None:
    entry_point = PYPROJECT["project"]["scripts"]["analytics-bridge"]
    _says_which_extra(_run("-c", _WITHOUT_ASYNCPG, entry_point, *command))


def test_python_m_bridge_without_the_bridge_extra_says_which_extra_to_install() -> None:
    code = "import runpy, sys; sys.modules['asyncpg'] = None; sys.argv = ['bridge', 'status']; "
    code += "runpy.run_module('bridge', run_name='__main__', alter_sys=True)"
    _says_which_extra(_run("-c", code))


def test_console_script_with_the_extra_runs_the_cli() -> None:
    entry_point = PYPROJECT["project"]["scripts"]["analytics-bridge"]
    code = _WITHOUT_ASYNCPG.replace('sys.modules["asyncpg"] = None', "")
    proc = _run("-c", code, entry_point, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "Usage: analytics-bridge" in proc.stdout and "status" in proc.stdout


def test_the_distribution_is_ours_and_every_install_line_names_it() -> None:
    """`analytics-sdk` on PyPI is an unrelated package importing the same `analytics_sdk`: no install
    line may fetch it."""
    from bridge.cli._entry import DISTRIBUTION

    assert PYPROJECT["project"]["name"] == DISTRIBUTION == "durable-analytics"
    files = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "examples").rglob("*.py")]
    files += [*(ROOT / "analytics_sdk").rglob("*.py"), *(ROOT / "bridge").rglob("*.py")]
    install_lines = []
    for path in files:
        for line in path.read_text().splitlines():
            if re.search(r"pip install\b", line):
                install_lines.append((path.relative_to(ROOT), line))
                assert not re.search(r"\banalytics[-_]sdk\b", line.split("pip install", 1)[1]), (path, line)
    assert any("'durable-analytics[bridge]'" in line for _, line in install_lines)


def test_readme_keeps_the_two_commands_and_its_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "nox -s demo" in readme and "nox -s tests" in readme
    links = re.findall(r"\]\(((?:docs|examples)/[^)#]+)(?:#[^)]*)?\)", readme)
    assert links, "the README links into the docs"
    for link in links:
        assert (ROOT / link).is_file(), link
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in ("celery.md", "middleware.md", "testing.md", "deployment.md", "configuration.md"):
        assert f": {page}" in nav, page


def test_the_wheel_ships_the_migrations_and_they_run_from_it(tmp_path: Path) -> None:
    """The Alembic revisions live inside the package: built into a wheel (hatchling, the build backend)
    and imported from it alone, they still produce the upgrade's SQL (no alembic.ini, no checkout)."""
    import zipfile

    from hatchling.builders.wheel import WheelBuilder

    (wheel,) = WheelBuilder(str(ROOT)).build(directory=str(tmp_path / "dist"), versions=["standard"])
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "site")
    shipped_files = (
        "env.py",
        "script.py.mako",
        "versions/r0001_baseline.py",
        "versions/r0002_partitioned.py",
    )
    for shipped in shipped_files:
        assert f"bridge/migrations/{shipped}" in names, sorted(n for n in names if "migrations" in n)
    code = "from bridge.migrations._run import offline_sql; print(offline_sql('month'))"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "PARTITION BY RANGE (created_at)" in proc.stdout and "analytics_alembic_version" in proc.stdout
