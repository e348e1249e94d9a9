"""`analytics-bridge status`: judge the figures (warnings) and render them as a table.

Pure functions over the dict :func:`bridge.cli._status.collect_status` returns, so every rule here
can be read (and tested) without a service.

"Is a worker running?" is judged from what the drains themselves leave in Redis, never from an
event's ``created_at``: the client sets that (a backfill of two-year-old events is normal) and the wire
format carries no queued-at time. The signals are the drains' ``last_flush_at`` (every drain records
it, idle or not) and the freshest lease (a drain at work claims or renews one every few seconds).
``created_at`` only ever *silences* the alarm: an event created a minute ago cannot have waited longer.
"""

from __future__ import annotations

from typing import Any

__all__ = ["render_status", "warnings_for"]

_STALE_INTERVALS = 3  # flush intervals without a drain (and with events waiting) before warning

_REDIS_PROBLEM = {
    "unreachable": "Redis unreachable",
    "auth": "Redis refused the credentials",
    "refused": "Redis refused status's reads",
}
_DATABASE_PROBLEM = {
    "unreachable": "PostgreSQL unreachable",
    "no_database": "PostgreSQL: the database is missing",
    "not_migrated": "PostgreSQL: the table analytics_events is missing (not migrated)",
    "auth": "PostgreSQL refused the credentials",
    "refused": "PostgreSQL refused the row count",
}


def _service_warnings(status: dict[str, Any]) -> list[str]:
    out = []
    if "redis_error" in status:
        problem = _REDIS_PROBLEM[status["redis_error_kind"]]
        out.append(f"{problem}: {status['redis_error']}; {status['redis_advice']}")
    database = status["database"]
    if "error" in database:
        problem = _DATABASE_PROBLEM[database["error_kind"]]
        out.append(f"{problem}: {database['error']}; {database['advice']}")
    return out


def _stale_queue(status: dict[str, Any]) -> str | None:
    """The "is a worker running?" warning, or None."""
    queue, flight, last = status["queue"], status["in_flight"], status["last_flush"]
    limit = _STALE_INTERVALS * float(status["flush_interval"])
    newest = flight.get("newest_age_seconds")
    if not queue["depth"] or (newest is not None and newest <= limit):
        return None  # nothing waits, or a drain claimed or renewed a lease recently: it is at work
    if last is not None:
        if last["age_seconds"] <= limit:
            return None
        return (
            f"{queue['depth']:,} event(s) queued, the last drain finished {last['age_seconds']:.0f}s ago"
            f" (> {_STALE_INTERVALS} flush intervals) and none holds a fresh lease: is a worker (and beat)"
            " running? If one is, its log says why its drains fail"
        )
    created_age = queue["oldest_age_seconds"]
    if created_age is not None and created_age <= limit:
        return None  # created that recently, so queued no earlier: too soon to worry
    return (
        f"{queue['depth']:,} event(s) queued and no drain has ever finished for this key prefix: is a"
        " worker (and beat) running? (`analytics-bridge flush` drains now)"
    )


def warnings_for(status: dict[str, Any]) -> list[str]:
    """What needs an operator's attention, one line each (the README says what to do)."""
    out = _service_warnings(status)
    if "queue" not in status:
        return out
    stale = _stale_queue(status)
    if stale:
        out.append(stale)
    # The cap applies to each shard's queue (the push trims the shard it pushes to).
    fullest = max((shard["depth"] for shard in status.get("shards") or ()), default=status["queue"]["depth"])
    if fullest >= 0.8 * status["queue"]["cap"]:
        out.append("the queue is at 80% of its cap: events will be dropped; add workers")
    flight = status["in_flight"]
    shown = flight["shown"]
    more = "+" if flight["batches"] > len(shown) else ""  # only the oldest are shown (and judged)
    expired = [
        b for b in shown if b["age_seconds"] is not None and b["age_seconds"] > flight["visibility_timeout"]
    ]
    if expired:
        out.append(
            f"{len(expired)}{more if len(expired) == len(shown) else ''} in-flight batch(es) past the"
            " visibility timeout: the next drain reclaims them (`analytics-bridge flush` does it now)"
        )
    released = [b for b in shown if b.get("released")]
    if released:
        out.append(
            f"{len(released)}{more if len(released) == len(shown) else ''} in-flight batch(es) released by"
            " their drain (an outage or a shutdown): the next drain takes them at once"
        )
    if status["dead_letters"]:
        out.append(f"{status['dead_letters']} dead letter(s): see `analytics-bridge dead-letters list`")
    if status["dropped"]:
        out.append(f"{status['dropped']} event(s) dropped by the queue cap since the counter was created")
    if status["last_flush"] is None:
        out.append("no flush recorded yet for this key prefix")
    return out


def _age(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f}s"


def _shard_lines(shards: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """A line per shard, when there are several (K > 1, or several K recorded); none for one."""
    if len(shards) <= 1:
        return []
    lines = [("shards", f"{len(shards)}  (figures above are totals)")]
    width = max(len(shard["shard"]) for shard in shards)
    for shard in shards:
        lines.append(
            (
                "",
                f"  {shard['shard']:<{width}}  depth {shard['depth']:,},"
                f" oldest {_age(shard['oldest_age_seconds'])}, in flight {shard['in_flight']},"
                f" dead {shard['dead_letters']:,}",
            )
        )
    return lines


def render_status(status: dict[str, Any]) -> str:
    """The readable table of `status`."""
    lines = [("redis", f"{status['redis']}  (prefix {status['key_prefix']!r})")]
    if "queue" in status:
        queue, flight = status["queue"], status["in_flight"]
        oldest = queue.get("oldest_error") or (
            "-" if queue["oldest_age_seconds"] is None else f"created {_age(queue['oldest_age_seconds'])} ago"
        )
        lines += [
            ("queue depth", f"{queue['depth']:,} of cap {queue['cap']:,}"),
            ("oldest queued", oldest),
            (
                "in-flight batches",
                f"{flight['batches']}  (oldest {_age(flight['oldest_age_seconds'])},"
                f" newest {_age(flight['newest_age_seconds'])})",
            ),
        ]
        for batch in flight["shown"]:
            age = "released" if batch["age_seconds"] is None else f"age {batch['age_seconds']:.1f}s"
            lines.append(
                (
                    "",
                    f"  {batch['batch_id']}: {batch['events']} events, {age}, reclaimed {batch['reclaims']}x",
                )
            )
        lines += _shard_lines(status.get("shards") or [])
        totals = status["totals"]
        lines += [
            ("dead letters", f"{status['dead_letters']:,}"),
            ("dropped (cap)", f"{status['dropped']:,}"),
            ("totals", ", ".join(f"{k} {v:,}" for k, v in totals.items())),
        ]
        last = status["last_flush"]
        if last is None:
            lines.append(("last flush", "never"))
        else:
            lines.append(("last flush", f"{last['at']} ({_age(last['age_seconds'])} ago)"))
            summary = last["summary"] or {}
            lines.append(("", "  " + ", ".join(f"{k} {v}" for k, v in summary.items())))
    database = status["database"]
    if "error" in database:
        lines.append(("rows in table", f"unknown ({database['url']})"))
    else:
        approx = "~" if database["estimated"] else ""
        lines.append(("rows in table", f"{approx}{database['rows']:,}  ({database['url']})"))
    width = max(len(label) for label, _ in lines)
    text = [f"{label:<{width}}  {value}" for label, value in lines]
    text += [f"WARNING: {w}" for w in warnings_for(status)]
    return "\n".join(text)
