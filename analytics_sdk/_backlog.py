"""What a client does after each acknowledged push: report events dropped by the cap, and send the
flush task so that queued events reach PostgreSQL within a bounded time (see :mod:`._debounce`):

- the backlog trigger: a push that makes the queue reach a batch sends a flush now, or, inside the
  cooldown, schedules one for the cooldown's end (a debounce with a trailing edge). With K shards a
  push only learns its own shard's length; pushes go round-robin, so the shards fill evenly and the
  queue holds about K times that: the trigger fires when ``length * K`` reaches the batch size
  (with K = 1, the queue reaching it, as before). Its keys are not per shard
  (:func:`._topology.trigger_keys`), so the cooldown is shared by every shard and client;
- the max delay: a flush is always due within ``analytics_max_delay`` seconds of any push.

Both run on the client's loop, called by the group commit (:class:`._batcher.GroupCommit`) once per
acknowledged MULTI, never per event. On that path they cost a clock read and two comparisons: the
Redis script that decides and the send go to a background task, and only when a local gate has
passed, which each reply moves to the time the decided flush runs, so a client asks a few times per
cooldown or max delay, however fast it pushes. No ``track()`` waits for Redis's decision or for the
broker. They log through the client's logger (``analytics_sdk._client``): these warnings are the
client's, and applications filter on that name.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Coroutine
from typing import Any

import anyio.to_thread

from ._debounce import Decision, reserve_backlog_flush, reserve_delayed_flush
from ._keys import QueueKeys
from ._queue import PushResult
from ._redis import AnyRedis
from ._sender import TaskSender
from ._settings import Settings
from ._spread import Shards

__all__ = ["DROP_LOG_EVERY", "AfterPush"]

DROP_LOG_EVERY = 10.0  # seconds between warnings about events dropped by the cap


class AfterPush:
    """The group commit's after-push callback of one client, and the background tasks it starts."""

    def __init__(
        self,
        settings: Settings,
        keys: QueueKeys,
        shards: Shards,
        sender: TaskSender,
        logger: logging.Logger,
    ) -> None:
        self.settings = settings
        self._logger = logger
        self.keys = keys  # the trigger's keys (_topology.trigger_keys), not a shard's
        self._shards = settings.analytics_queue_shards
        self.shards = shards  # the producer's (whether its K is recorded for the drains yet)
        self._recording = False
        self._sender = sender
        self.background: set[asyncio.Task[Any]] = set()
        # Monotonic times before which this client need not ask Redis again (inf: a request is out).
        self._trigger_after = 0.0
        self._delay_after = 0.0
        self._send_failing = False  # the last send failed: further failures are not logged again
        self._dropped_unlogged = 0
        self._drop_logged_at = 0.0

    def __call__(self, client: AnyRedis, result: PushResult) -> None:
        settings = self.settings
        if not self.shards.recorded and not self._recording:
            # K goes in the set the drains read (_topology.record_shard_count) alongside the loop's
            # first push (_breaker); this is for a sync client whose pushes all went the direct
            # way, or a first record that failed: in the background, one at a time
            self._recording = True
            self._spawn(self._record(client))
        if result.dropped:
            self._note_dropped(result.dropped)
        if not settings.analytics_backlog_trigger:
            return
        now = time.monotonic()
        if now >= self._trigger_after and result.length * self._shards >= settings.analytics_batch_size:
            self._trigger_after = math.inf
            self._spawn(self._backlog_flush(client))
        if now >= self._delay_after and settings.analytics_max_delay > 0:
            self._delay_after = math.inf
            self._spawn(self._delayed_flush(client))

    async def _record(self, client: AnyRedis) -> None:
        try:
            await self.shards.record(client)
        finally:
            self._recording = False

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def stop(self) -> None:
        """The client is closing: let the flush requests already out finish, within the publish
        timeout (the events just tracked may depend on one: a short-lived process must not leave them
        to beat), then cancel what is left and wait for it to end."""
        if self.background:
            await asyncio.wait(self.background, timeout=self.settings.analytics_publish_timeout)
        for task in list(self.background):
            task.cancel()
        if self.background:
            await asyncio.wait(self.background)

    def forget(self) -> None:
        """Their loop is gone (or this is a forked child): the tasks are not ours to finish, and a
        request they had out will not move the gates, so the next push may ask again."""
        self.background.clear()
        self._recording = False
        self._trigger_after = self._delay_after = 0.0

    def _note_dropped(self, count: int) -> None:
        # Rate-limited: a queue at its cap drops on every push; the exact total is in the counter.
        self._dropped_unlogged += count
        now = time.monotonic()
        if now - self._drop_logged_at >= DROP_LOG_EVERY:
            self.report_dropped()
            self._drop_logged_at = now

    def report_dropped(self) -> None:
        """Log the drops not reported yet (also at close, so that the warnings add up to the total)."""
        if self._dropped_unlogged:
            self._logger.warning(
                "queue %s is at its cap of %s: dropped the %s oldest event(s) since the last warning",
                self.keys.queue,
                self.settings.analytics_max_queue_size,
                self._dropped_unlogged,
            )
            self._dropped_unlogged = 0

    async def _backlog_flush(self, client: AnyRedis) -> None:
        cooldown = self.settings.analytics_backlog_trigger_cooldown
        wait = cooldown  # after a failure: the next push past the threshold asks again in a cooldown
        try:
            decision, seconds = await reserve_backlog_flush(client, self.keys, cooldown)
            if decision is Decision.NOW:
                # The next push past the threshold asks again: inside this window it schedules the
                # trailing flush, which covers what this one's drain will not see.
                wait = 0.0
                await self._send("backlog", None)
            elif decision is Decision.TRAILING:
                wait = seconds
                await self._send("trailing", seconds)
            else:  # a trailing flush is scheduled already: it covers every push until it runs
                wait = seconds
        except Exception as exc:  # the events are safe in Redis; beat will flush them
            self._send_failed(exc)
        finally:
            self._trigger_after = time.monotonic() + wait

    async def _delayed_flush(self, client: AnyRedis) -> None:
        delay = self.settings.analytics_max_delay
        wait = delay
        try:
            pending = await reserve_delayed_flush(client, self.keys, delay)
            if pending:
                wait = pending  # the pending flush runs after every push until then
            else:
                await self._send("delayed", delay)
        except Exception as exc:
            self._send_failed(exc)
        finally:
            self._delay_after = time.monotonic() + wait

    async def _send(self, kind: str, countdown: float | None) -> None:
        send = functools.partial(self._sender.send, countdown=countdown)
        task_id = await anyio.to_thread.run_sync(send)
        if self._send_failing:
            self._send_failing = False
            self._logger.info("the broker takes flush tasks again")
        self._logger.debug("%s: sent flush task %s (countdown %s)", kind, task_id, countdown)

    def _send_failed(self, exc: Exception) -> None:
        # Once per outage: with the broker down every cooldown and max delay would warn again.
        if self._send_failing:
            self._logger.debug("could not send a backlog flush: %s", exc)
            return
        self._send_failing = True
        self._logger.warning("could not send a backlog flush (beat will drain instead): %s", exc)
