"""How the service meets the network: uvicorn, with a deadline for every request and a cap on connections.

uvicorn 0.49 waits without limit for a connection's first request and for a slow body, so 1,100
connections that never finish their headers hold every descriptor of a server at `ulimit -n 1024`.
Here a request must arrive whole within `read_timeout` seconds of the connection (or of the previous
answer on it), and past `max_connections` the connection that has waited longest for its request is
closed to make room: slow clients lose their place, never the clients that send a request.
"""

from __future__ import annotations

import asyncio
import os
import resource
import ssl
from collections import OrderedDict
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from fedfhe.errors import FedfheError

FULL = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
BACKLOG = 128  # connections the kernel queues and one event-loop tick accepts; kept below the spare descriptors


def default_max_connections() -> int:
    """As many connections as this process's descriptors allow, leaving room for files, workers and one accept burst."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, min(10_000, soft - 2 * BACKLOG - 64))


def guarded_protocol(read_timeout: float, max_connections: int) -> type[HttpToolsProtocol]:
    """uvicorn's HTTP/1.1 protocol with a per-request arrival deadline and eviction of the slowest waiters."""
    waiting: OrderedDict[Guarded, None] = OrderedDict()  # connections whose request has not fully arrived

    class Guarded(HttpToolsProtocol):
        """One connection: waiting for a whole request, or being answered."""

        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._wait()
            if len(self.connections) > max_connections:
                oldest = next(iter(waiting))
                if oldest is self:  # every other connection is being answered: no room
                    transport.write(FULL)
                oldest._close()

        def on_message_complete(self) -> None:
            self._stop_waiting()
            super().on_message_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._wait()  # a kept-alive connection waits for its next request under the same rule

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_waiting()
            super().connection_lost(exc)

        def _wait(self) -> None:
            waiting[self] = None
            self._deadline = self.loop.call_later(read_timeout, self._close)

        def _stop_waiting(self) -> None:
            waiting.pop(self, None)
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _close(self) -> None:
            self._stop_waiting()
            if not self.transport.is_closing():
                self.transport.close()

    return Guarded


def check_tls(cert: str | os.PathLike[str], key: str | os.PathLike[str]) -> None:
    """Refuse a certificate and key that do not load together, in one line, before listening."""
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise FedfheError(f"--tls-cert {cert} / --tls-key {key}: cannot be used ({exc})") from None


def listener(
    app: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    tls: tuple[str | os.PathLike[str], str | os.PathLike[str]] | None = None,
    read_timeout: float = 30.0,
    max_connections: int | None = None,
) -> uvicorn.Server:
    """A server for the app, every setting checked (nothing listens yet); HTTPS when `tls` (cert, key) is given.

    `.run()` answers until SIGINT or SIGTERM.
    """
    if not 1 <= port <= 65535:
        raise FedfheError(f"--port must be between 1 and 65535 (got {port})")
    if not read_timeout > 0:
        raise FedfheError(f"--read-timeout must be > 0 seconds (got {read_timeout})")
    limit = default_max_connections() if max_connections is None else max_connections
    if limit < 1:
        raise FedfheError(f"--max-connections must be at least 1 (got {limit})")
    if tls is not None:
        check_tls(*tls)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=guarded_protocol(read_timeout, limit),
        backlog=BACKLOG,
        ssl_certfile=None if tls is None else os.fspath(tls[0]),
        ssl_keyfile=None if tls is None else os.fspath(tls[1]),
        log_level="warning",
        access_log=False,
    )
    return uvicorn.Server(config)
