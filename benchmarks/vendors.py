"""Segment's and PostHog's Python SDKs: the per-call cost of ``track()``/``capture()`` in memory.

Configuration, chosen after reading both SDKs' source:

- Segment (``segment.analytics.Client``): built with ``send=False``, so ``__init__`` starts no consumer
  thread and registers no atexit join; then ``send`` is switched on, so ``track()`` runs its whole
  path including the ``queue.put`` (with ``send=False`` it would return just before it).
- PostHog (``posthog.Posthog``): built with ``send=False``, so its lanes build consumers but never
  start them; then ``send`` is switched on, so ``capture()`` reaches ``lane.enqueue`` -> ``queue.put``.
  (``disabled=True`` would return before doing any of the work, measuring nothing.)

Both therefore do everything but the upload, which is their background thread's job. While they
run, ``socket.connect`` raises: proof that nothing tried the network (there is none here).
Their queues are emptied after each run. These packages are benchmark-only dependencies.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

from ._common import EVENT_TYPE, FIELDS, METADATA, Run

PROPERTIES: dict[str, Any] = {
    **METADATA,
    "entity_type": FIELDS["entity_type"],
    "entity_id": FIELDS["entity_id"],
    "session_id": FIELDS["session_id"],
    "referrer": FIELDS["referrer"],
}
CONTEXT: dict[str, Any] = {"ip": FIELDS["ip_address"], "userAgent": FIELDS["user_agent"]}


@contextlib.contextmanager
def no_network() -> Iterator[None]:
    original = socket.socket.connect

    def refuse(self: socket.socket, address: Any) -> None:
        raise RuntimeError(f"benchmark: a vendor SDK tried to connect to {address!r}")

    socket.socket.connect = refuse  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        socket.socket.connect = original  # type: ignore[method-assign]


def _timed(call: Callable[[], object], calls: int) -> Run:
    clock = time.perf_counter
    start = clock()
    for _ in range(calls):
        call()
    return Run(calls, clock() - start)


class Segment:
    name = "Segment track()"

    def __init__(self) -> None:
        from segment.analytics import Client

        self.client = Client("bench-write-key", send=False, max_queue_size=10_000_000)
        self.client.send = True  # the full enqueue path; no consumer was started (see module doc)

    def call(self) -> None:
        ok, _ = self.client.track(
            user_id=FIELDS["user_id"], event=EVENT_TYPE, properties=dict(PROPERTIES), context=dict(CONTEXT)
        )
        if not ok:
            raise RuntimeError("Segment refused the event (queue full?)")

    def run(self, calls: int) -> Run:
        with no_network():
            run = _timed(self.call, calls)
        queued = self.client.queue.qsize()
        if queued < calls:
            raise RuntimeError(f"Segment queued {queued} of {calls} events")
        self.client.queue.queue.clear()
        return run

    def close(self) -> None:
        self.client.send = False
        self.client.queue.queue.clear()


class PostHog:
    name = "PostHog capture()"

    def __init__(self) -> None:
        from posthog import Posthog

        self.client = Posthog(
            "phc_bench_project_key",
            send=False,
            max_queue_size=10_000_000,
            enable_exception_autocapture=False,
        )
        self.client.send = True  # reach lane.enqueue -> queue.put; consumers were never started

    def call(self) -> None:
        properties = dict(PROPERTIES)
        properties["$ip"] = FIELDS["ip_address"]
        properties["$user_agent"] = FIELDS["user_agent"]
        if self.client.capture(EVENT_TYPE, distinct_id=FIELDS["user_id"], properties=properties) is None:
            raise RuntimeError("PostHog did not queue the event")

    def _queue(self) -> Any:
        return self.client._analytics_lane.queue

    def run(self, calls: int) -> Run:
        with no_network():
            run = _timed(self.call, calls)
        queued = self._queue().qsize()
        if queued < calls:
            raise RuntimeError(f"PostHog queued {queued} of {calls} events")
        self._queue().queue.clear()
        return run

    def close(self) -> None:
        self.client.send = False
        self._queue().queue.clear()
