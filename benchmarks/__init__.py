"""Side-by-side benchmarks: ``nox -s bench`` (or ``python -m benchmarks --quick``).

Every speed claim is a ratio of two figures measured in the same run on the same machine. Each
section module exposes ``run(ctx) -> Section``; :mod:`benchmarks.__main__` runs them, prints the
table and writes the JSON. Nothing here is imported by ``analytics_sdk`` or ``bridge``.
"""
