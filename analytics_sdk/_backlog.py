"""What a client does after each acknowledged push: report events dropped by the cap, and send the
flush task when the queue has reached a batch (the backlog trigger).

Both run on the client's loop, called by the group commit (:class:`._batcher.GroupCommit`) once per
acknowledged MULTI, never per event; the flush task is sent from a background task so that no
``track()`` waits for the broker. They log through the client's logger (``analytics_sdk._client``):
these warnings are the client's, and applications filter on that name.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import anyio.to_thread
import redis.asyncio as aioredis

from ._keys import QueueKeys
from ._queue import PushResult
from ._sender import TaskSender
from ._settings import Settings

__all__ = ["DROP_LOG_EVERY", "AfterPush"]

DROP_LOG_EVERY = 10.0  # seconds between warnings about events dropped by the cap


class AfterPush:
    """The group commit's after-push callback of one client, and the background tasks it starts."""

    def __init__(
        self, settings: Settings, keys: QueueKeys, sender: TaskSender, logger: logging.Logger
    ) -> None:
        self.settings = settings
        self._logger = logger
        self.keys = keys
        self._sender = sender
        self.background: set[asyncio.Task[Any]] = set()
        self._trigger_after = 0.0  # monotonic time before which no backlog flush is attempted
        self._dropped_unlogged = 0
        self._drop_logged_at = 0.0

    def __call__(self, client: aioredis.Redis, result: PushResult) -> None:
        settings = self.settings
        if result.dropped:
            self._note_dropped(result.dropped)
        if settings.analytics_backlog_trigger and result.length >= settings.analytics_batch_size:
            now = time.monotonic()
            if now >= self._trigger_after:
                self._trigger_after = now + settings.analytics_backlog_trigger_cooldown
                task = asyncio.get_running_loop().create_task(self._trigger_flush(client))
                self.background.add(task)
                task.add_done_callback(self.background.discard)

    async def stop(self) -> None:
        """Cancel the flush sends still running (the client is closing) and wait for them to end."""
        for task in list(self.background):
            task.cancel()
        if self.background:
            await asyncio.wait(self.background)

    def forget(self) -> None:
        """Their loop is gone (or this is a forked child): the tasks are not ours to finish."""
        self.background.clear()

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

    async def _trigger_flush(self, client: aioredis.Redis) -> None:
        cooldown_ms = int(self.settings.analytics_backlog_trigger_cooldown * 1000)
        try:
            if await client.set(self.keys.flush_cooldown, b"1", nx=True, px=cooldown_ms):
                task_id = await anyio.to_thread.run_sync(self._sender.send)
                self._logger.debug("backlog: sent flush task %s", task_id)
        except Exception as exc:  # the events are safe in Redis; beat will flush them
            self._logger.warning("could not send a backlog flush (beat will drain instead): %s", exc)
