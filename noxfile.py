"""Developer sessions. ``nox -s tests -- -k drain -x`` passes everything after ``--`` to pytest."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True

PYPROJECT = nox.project.load_toml("pyproject.toml")


def _group(name: str) -> list[str]:
    return nox.project.dependency_groups(PYPROJECT, name)


@nox.session
def tests(session: nox.Session) -> None:
    """The whole suite against the real Redis, PostgreSQL and a real Celery worker."""
    # The bench group too: tests/test_bench_smoke.py runs the benchmark program in its tiny mode.
    session.install("-e", ".[bridge]", *_group("test"), *_group("bench"))
    session.run("pytest", *session.posargs)


@nox.session(python="3.11", reuse_venv=False)
def tests_lowest(session: nox.Session) -> None:
    """The whole suite against the LOWEST versions pyproject declares (its floors), Python 3.11.

    uv's ``--resolution lowest-direct`` takes every direct requirement (runtime, the bridge extra, the
    test and bench groups) at its floor and the transitive ones at their newest, as a user pinning our
    floors would get. A fresh venv each run: a reused one would keep whatever an earlier run installed.
    """
    session.install("uv")
    session.run(
        "uv", "pip", "install", "--resolution", "lowest-direct",
        "-e", ".[bridge]", *_group("test"), *_group("bench"),
    )  # fmt: skip
    # the versions actually tested, in the log
    session.run("uv", "pip", "freeze")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install(*_group("lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[bridge]", *_group("typecheck"), *_group("test"))
    session.run("mypy")


@nox.session
def demo(session: nox.Session) -> None:
    """The main job end to end: Redis -> a real Celery worker -> PostgreSQL, with a summary.

    ``nox -s demo -- --users 50 --events-per-user 20`` passes options to the demo (``--help``).
    """
    session.install("-e", ".[bridge]")
    session.run("python", "-m", "bridge.demo", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Side-by-side benchmarks (docs/benchmarks.md): prints the table, writes bench-results.json.

    ``nox -s bench`` is the full run; ``nox -s bench -- --quick`` the CI-sized one (under 2 minutes);
    other options: ``nox -s bench -- --help``.
    """
    session.install("-e", ".[bridge]", *_group("bench"))
    session.run("python", "-m", "benchmarks", *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site (mkdocs.yml, docs/), API reference from the docstrings; warnings fail.

    ``nox -s docs`` builds into site/; ``nox -s docs -- serve`` previews it on http://127.0.0.1:8000.
    """
    # Not the package: mkdocstrings reads the source under the repo root statically (mkdocs.yml paths).
    session.install(*_group("docs"))
    session.env["NO_MKDOCS_2_WARNING"] = "1"  # mkdocs-material's banner about its successor, every build
    if session.posargs[:1] == ["serve"]:
        session.run("mkdocs", "serve", *session.posargs[1:])
    else:
        session.run("mkdocs", "build", "--strict", *session.posargs)
