"""The group commit's waiting list: events handed over and not yet taken into a push.

Parallel lists, not an object per caller: a waiting caller costs its future, its payload bytes and
its deadline (a float), and nothing else the cyclic garbage collector has to track. That is what
kept throughput from falling between 256 and 1,024 concurrent callers: with a tuple and a list per
waiter (and a coroutine more per ``track()``), 1,024 waiting callers held enough tracked objects to
set off a collection on almost every push, each walking every waiter and promoting them towards the
older generations, whose collections walk the whole heap (docs/benchmarks.md has the figures).

The common take, everything waiting fits in one push and nobody gave up, hands the lists over as
they are: O(1) in Python, however many wait. Only a take that must leave something behind (a bound,
a cancelled caller, an expired deadline) walks the callers it takes, never the rest.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import operator
from collections.abc import Callable
from typing import TypeAlias

__all__ = ["Future", "Waiting", "settle", "settle_all"]

# An async caller's future or a thread's: both have done(), set_result() and set_exception().
Future: TypeAlias = "asyncio.Future[None] | concurrent.futures.Future[None]"

_done = operator.methodcaller("done")
_INVALID_STATE = (asyncio.InvalidStateError, concurrent.futures.InvalidStateError)


def settle(future: Future, error: BaseException | None = None) -> None:
    """Resolve a caller's future unless it is done. A thread may cancel its own at any moment (it gave
    up waiting), even between done() and the set: the caller has gone, not the push loop's error."""
    if future.done():
        return
    try:
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
    except _INVALID_STATE:
        pass


def settle_all(futures: list[Future]) -> None:
    """:func:`settle` of a whole acknowledged batch, inlined: one call per push, not per caller."""
    for future in futures:
        if not future.done():
            try:  # noqa: SIM105 - contextlib.suppress costs an object per caller
                future.set_result(None)
            except _INVALID_STATE:
                pass


class Waiting:
    """Callers in hand-over order: ``futures[i]`` handed over ``counts[i]`` consecutive ``payloads``
    (``size`` bytes in all) and must be answered by ``dues[i]`` (``time.monotonic()`` seconds)."""

    __slots__ = ("counts", "dues", "futures", "payloads", "size")

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:  # new lists: a batch taken earlier still uses the old ones
        self.futures: list[Future] = []
        self.counts: list[int] = []
        self.dues: list[float] = []
        self.payloads: list[bytes] = []
        self.size = 0

    def __len__(self) -> int:
        return len(self.futures)

    def add(self, future: Future, payloads: list[bytes], due: float) -> None:
        self.futures.append(future)
        self.counts.append(len(payloads))
        self.dues.append(due)
        self.payloads += payloads
        self.size += sum(map(len, payloads))

    def clear(self) -> list[Future]:
        """Empty the list; returns the futures of every caller that was waiting."""
        futures = self.futures
        self._reset()
        return futures

    def take(
        self, now: float, max_events: int, max_bytes: int, expire: Callable[[Future], None]
    ) -> tuple[list[bytes], list[Future], float]:
        """The next push: its payloads, their callers' futures and the earliest of their deadlines.

        Callers whose future is done (cancelled before the send) are dropped unsent; those whose
        deadline passed while they waited go to ``expire``. A caller's payloads are never split
        between two pushes; the first caller goes whole even past the bounds (track_many).
        """
        futures, dues = self.futures, self.dues
        if not futures:
            return [], [], now
        deadline = min(dues)
        if (
            deadline > now
            and len(self.payloads) <= max_events
            and self.size <= max_bytes
            and not any(map(_done, futures))
        ):
            everything = self.payloads
            self._reset()
            return everything, futures, deadline
        payloads, counts = self.payloads, self.counts
        if len(payloads) > max_events:
            # More than one push's worth: split it evenly (1,024 -> 512 + 512, not 1,000 + 24). The
            # second push then goes out the moment the first is acknowledged, while the first's
            # callers run: Redis's time overlaps ours instead of adding to it.
            pushes = -(-len(payloads) // max_events)
            max_events = -(-len(payloads) // pushes)
        batch: list[bytes] = []
        taken: list[Future] = []
        size = start = callers = 0
        deadline = now
        for future, count, due in zip(futures, counts, dues, strict=True):
            mine = payloads[start : start + count]
            weight = sum(map(len, mine))
            if not future.done():
                if due <= now:  # waited out its whole publish timeout behind earlier pushes
                    expire(future)
                elif batch and (len(batch) + count > max_events or size + weight > max_bytes):
                    break
                else:
                    deadline = due if not batch else min(deadline, due)
                    batch += mine
                    taken.append(future)
                    size += weight
            start += count
            callers += 1
            self.size -= weight
        del futures[:callers], counts[:callers], dues[:callers], payloads[:start]
        return batch, taken, deadline
