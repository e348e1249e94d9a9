"""``python -m benchmarks [--quick | --tiny] [--only track,threads,drain,partitions,...] [--json PATH]``.

Runs each section, prints the tables and the targets with a pass/SHORT mark, and writes the JSON.
Exits 1 if a section failed to run; a SHORT target is a finding to read, not an error.
Services: the machine's Redis and PostgreSQL (``--redis-url``, ``--pg-url`` or ANALYTICS_BENCH_*).
Everything the run creates lives under a unique key prefix or in its own database, removed at the end.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
import traceback
from pathlib import Path

from ._common import MODES, Context, Section, delete_prefix
from .report import machine, render, write_json

SECTIONS = ("track", "threads", "drain", "partitions", "memory", "e2e", "scale")
logger = logging.getLogger("benchmarks")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", const="quick", dest="mode", help="CI-sized (< 2 min)")
    size.add_argument("--tiny", action="store_const", const="tiny", dest="mode", help="smoke test only")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument(
        "--json", type=Path, default=Path("bench-results.json"), help="where to write results"
    )
    parser.add_argument(
        "--redis-url", default=os.environ.get("ANALYTICS_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("ANALYTICS_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="a maintenance database; the bench creates and drops its own database beside it",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    args.mode = args.mode or "full"
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(args.only) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {SECTIONS}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    ctx = Context(MODES[args.mode], args.redis_url, args.pg_url)
    info = machine(ctx)
    sections: list[Section] = []
    failed: list[str] = []
    print(f"benchmarks: {args.mode} mode, sections {', '.join(args.only)}, run {ctx.run_id}", flush=True)
    try:
        for name in SECTIONS:
            if name not in args.only:
                continue
            started = time.perf_counter()
            print(f"  running {name} ...", end="", flush=True)
            try:
                module = importlib.import_module(f"benchmarks.{name}")
                sections.append(module.run(ctx))
            except Exception:
                failed.append(name)
                print(" FAILED", flush=True)
                traceback.print_exc()
                continue
            print(f" {time.perf_counter() - started:.1f} s", flush=True)
    finally:
        delete_prefix(ctx.redis_url, ctx.prefix)
    print()
    print(render(sections, info, args.mode))
    write_json(args.json, sections, info, args.mode)
    print(f"results written to {args.json}")
    if failed:
        print(f"section(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
