"""Printing the tables and writing the JSON."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

from ._common import Check, Context, Section, fmt_ratio


def machine(ctx: Context) -> dict[str, Any]:
    """The facts a reader needs to judge the figures: CPU, cores, versions."""
    model = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
                break
    except (OSError, subprocess.SubprocessError):
        pass
    info: dict[str, Any] = {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()}",
    }
    try:
        with redis.Redis.from_url(ctx.redis_url, socket_connect_timeout=3) as client:
            info["redis"] = client.info("server").get("redis_version")
    except redis.RedisError:
        info["redis"] = None
    return info


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in rows)]


def render(sections: Sequence[Section], info: dict[str, Any], mode: str) -> str:
    """Markdown tables (they read well in a terminal and paste into the README as they are)."""
    out = [
        f"Benchmark ({mode} mode) on {info['cpu']}, {info['cores']} cores, Python {info['python']}, "
        f"Redis {info.get('redis')}; medians of the timed repeats after a warm-up.",
        "",
    ]
    for section in sections:
        out += [f"### {section.title}", "", *_table(section.header, section.rows), ""]
        out += [f"- {note}" for note in section.notes]
        if section.notes:
            out.append("")
    checks = [c for s in sections for c in s.checks]
    if checks:
        rows = [
            [
                c.name,
                _figures(c)[0],
                ("<= " if c.at_most else ">= ") + _figures(c)[1],
                "pass" if c.passed else "SHORT",
            ]
            for c in checks
        ]
        out += ["### Targets", "", *_table(["measured", "value", "target", "mark"], rows), ""]
    return "\n".join(out)


def _figures(c: Check) -> tuple[str, str]:
    """(value, target) as shown: with the check's unit, else a ratio (x), or milliseconds by name."""
    if c.unit:
        return f"{c.value:,.2f} {c.unit}", f"{c.target:,g} {c.unit}"
    if "ms" in c.name:
        return f"{c.value:.2f}", f"{c.target:g}"
    return fmt_ratio(c.value), f"{c.target:g}x"


def write_json(path: Path, sections: Sequence[Section], info: dict[str, Any], mode: str) -> None:
    doc = {
        "mode": mode,
        "machine": info,
        "sections": {s.title: {"data": s.data, "notes": s.notes} for s in sections},
        "targets": [c.as_dict() for s in sections for c in s.checks],
    }
    path.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
