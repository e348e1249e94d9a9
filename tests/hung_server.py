"""A "Redis" that accepts connections and never answers: a hung server, a blackholed proxy.

A plain listening socket on a free loopback port; a thread accepts every connection and holds it
open without reading or replying, so a client's connect succeeds and its first command waits for
ever (until its own timeout). ``stop()`` closes everything, after which a real redis-server may be
started on the same port (``RedisServer(directory, server.port, ()).start()``): the client under
test then finds Redis "back" at the address it was configured with.
"""

from __future__ import annotations

import socket
import threading
from types import TracebackType

__all__ = ["HungServer"]


class HungServer:
    def __init__(self, port: int = 0) -> None:
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", port))
        self._listener.listen(128)
        self._listener.settimeout(0.05)  # the accept loop looks at the stop flag this often
        self.port: int = self._listener.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name=f"hung-server-{self.port}", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed by stop()
                return
            self.accepted.append(conn)  # held, never read, never answered

    def stop(self) -> None:
        """Close the listener and every accepted connection (clients then see a reset). Idempotent."""
        self._stop.set()
        self._thread.join(5)
        self._listener.close()
        for conn in self.accepted:
            conn.close()

    def __enter__(self) -> HungServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
