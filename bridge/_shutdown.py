"""A stop flag that a worker's shutdown raises and every drain in its pool sees.

Celery's warm shutdown (SIGTERM, one Ctrl-C) stops taking tasks and waits for the running ones. A drain
left alone would keep claiming until the whole backlog is gone (hours on a real one), far past a
container's grace period. So the worker's main process raises this flag when shutdown starts, and a
drain checks it before each claim: it stops claiming, finishes and acks the transaction in hand, and
releases what it claimed ahead, so the worker exits within about one transaction.

The flag is one byte of anonymous shared memory made before the prefork pool forks (the worker's
``worker_init``), so the pool's children, forked from that process, share it; with the solo and
threads pools it is simply this process's memory. Nothing here is an async object: it crosses forks
safely.
"""

from __future__ import annotations

import logging
import mmap

__all__ = ["arm", "request_stop", "reset", "stop_requested"]

logger = logging.getLogger(__name__)

_flag: mmap.mmap | None = None


def arm() -> None:
    """Make the shared flag (once per worker, before the pool forks)."""
    global _flag  # noqa: PLW0603 - one flag per process tree, by design
    if _flag is None:
        _flag = mmap.mmap(-1, 1)  # MAP_SHARED | MAP_ANONYMOUS: shared with the children forked later


def request_stop() -> None:
    """Ask every drain of this worker to stop claiming (the worker is shutting down)."""
    arm()
    assert _flag is not None
    _flag[0] = 1
    logger.info("worker shutting down: drains stop claiming, ack what committed and release the rest")


def stop_requested() -> bool:
    return _flag is not None and _flag[0] == 1


def reset() -> None:
    """Lower the flag (tests, or a process that starts afresh)."""
    if _flag is not None:
        _flag[0] = 0
