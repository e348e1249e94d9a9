"""A TCP proxy in front of a Redis server that can lose the reply to a request: the request reaches
Redis and runs, the client never hears back (its connection is closed), as when a network drops
the answer or a load balancer resets an idle connection at the wrong moment.

It runs in a thread with its own event loop (made and closed there), so sync scenarios can use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

__all__ = ["ReplyLosingProxy"]

_CHUNK = 1 << 16


class ReplyLosingProxy:
    """Forwards 127.0.0.1:``port`` to ``target_port``. :meth:`lose_replies` arms it: each of the next
    ``count`` requests (reads from a client) that contain ``marker`` is forwarded to Redis, and that
    connection's replies are then swallowed and the connection closed after ``grace`` seconds."""

    def __init__(self, target_port: int, grace: float = 0.3) -> None:
        self.target_port = target_port
        self.grace = grace
        self.port = 0
        self.lost = 0  # replies lost so far
        self._marker = b""
        self._armed = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reply-losing-proxy", daemon=True)

    def __enter__(self) -> ReplyLosingProxy:
        self._thread.start()
        if not self._ready.wait(10) or not self.port:
            raise RuntimeError("the proxy did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def lose_replies(self, marker: bytes, count: int) -> None:
        with self._lock:
            self._marker, self._armed = marker, count

    def _take(self, data: bytes) -> bool:
        with self._lock:
            if self._armed and self._marker in data:
                self._armed -= 1
                self.lost += 1
                return True
            return False

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()
            server.close()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            redis_r, redis_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.close()
            return
        swallow = asyncio.Event()

        async def upstream() -> None:
            while data := await client_r.read(_CHUNK):
                if self._take(data):
                    swallow.set()  # before forwarding: no byte of the answer may get through
                    redis_w.write(data)
                    await redis_w.drain()
                    await asyncio.sleep(self.grace)  # Redis runs the request meanwhile
                    return
                redis_w.write(data)
                await redis_w.drain()

        async def downstream() -> None:
            while data := await redis_r.read(_CHUNK):
                if not swallow.is_set():
                    client_w.write(data)
                    await client_w.drain()

        pumps = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
        with contextlib.suppress(Exception):
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for pump in pumps:
            pump.cancel()
        for writer in (client_w, redis_w):
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
