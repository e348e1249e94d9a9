"""A TCP proxy in front of a real Redis that can lose replies: the network fault behind a retried
command that had already run.

Runs on the test's own event loop. Requests always reach Redis; while ``lose_replies`` is above zero,
each chunk Redis sends back is dropped instead of forwarded (and the count lowered), so the client sees
its command time out although Redis executed it. Everything else is passed through unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["LossyProxy"]


class LossyProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.lose_replies = 0
        self.lost = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/0"

    async def __aenter__(self) -> LossyProxy:
        self._server = await asyncio.start_server(self._connect, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        await self._server.wait_closed()

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        for source, sink, lossy in ((reader, up_writer, False), (up_reader, writer, True)):
            task = asyncio.create_task(self._pump(source, sink, lossy))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, lossy: bool) -> None:
        try:
            while chunk := await source.read(65536):
                if lossy and self.lose_replies > 0:
                    self.lose_replies -= 1
                    self.lost += 1
                    continue
                sink.write(chunk)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            sink.close()
