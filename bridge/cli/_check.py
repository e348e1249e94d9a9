"""`analytics-bridge status --check`: is the queue stuck? A pure function over `collect_status`'s dict.

"Stuck" is the one condition a probe or a cron alert should fire on: work waits and nothing drains
it. Other warnings of `status` are deliberately left out. Dead letters and drops need a person, not a
restart, and a one-shot check cannot tell whether they grow (the Prometheus rules alert on that);
a full queue is capacity (also a metrics alert); a fresh deployment with nothing queued is healthy.
Failing on those would make a liveness probe restart healthy workers over and over.
"""

from __future__ import annotations

from typing import Any

# the same rule and threshold as the warning of `status` ("is a worker running?")
from ._status_report import _STALE_INTERVALS as STALE_INTERVALS
from ._status_report import _stale_queue as stale_queue

__all__ = ["stuck_reasons"]


def stuck_reasons(status: dict[str, Any]) -> list[str]:
    """Why the queue is stuck, one line each; empty when it moves. ``status`` must have its Redis
    figures (a `status` that failed to read Redis exits 2 before this is asked)."""
    reasons = []
    stale = stale_queue(status)
    if stale:
        reasons.append(stale)
    limit = STALE_INTERVALS * float(status["flush_interval"])
    flight, last = status["in_flight"], status["last_flush"]
    # A lease past the visibility timeout is taken over by the next drain; one that stays unrenewed
    # for 3 more flush intervals means no drain ran since, or every drain fails before its claim.
    orphaned = [
        b
        for b in flight["shown"]
        if b["age_seconds"] is not None and b["age_seconds"] > flight["visibility_timeout"] + limit
    ]
    if orphaned:
        reasons.append(
            f"{len(orphaned)} in-flight batch(es) unrenewed for more than the visibility timeout + "
            f"{STALE_INTERVALS} flush intervals ({flight['visibility_timeout'] + limit:.0f}s): their worker"
            " died and no drain has taken them over since"
        )
    # A released batch is taken at once by the next drain, so it only waits when no drain runs.
    drained_recently = last is not None and last["age_seconds"] <= limit
    released = [b for b in flight["shown"] if b["released"]]
    if released and not drained_recently:
        reasons.append(
            f"{len(released)} released in-flight batch(es) wait and no drain finished within"
            f" {STALE_INTERVALS} flush intervals ({limit:.0f}s): is a worker (and beat) running?"
        )
    return reasons
