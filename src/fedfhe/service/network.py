"""How the service meets the network: uvicorn, with a deadline for every request and a cap on connections.

uvicorn 0.49 waits without limit for a connection's first request and for a slow body, so 1,100
connections that never finish their headers hold every descriptor of a server at `ulimit -n 1024`.
Here a request must arrive whole within `read_timeout` seconds of the connection (or of the previous
answer on it), and past `max_connections` the connection that has waited longest for its request is
closed to make room: slow clients lose their place, never the clients that send a request. Over TLS
the same holds from the TCP accept: asyncio's own TLS layer kept a connection that never sent a
ClientHello for 60 s, out of uvicorn's sight and out of the count.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import ssl
import time
from asyncio.sslproto import SSLProtocol
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, cast

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from fedfhe.errors import FedfheError

log = logging.getLogger("fedfhe.service")  # the server's log: one JSON object a line

FULL = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
HANDSHAKE_S = 10  # seconds from TCP accept to the end of the TLS handshake (milliseconds here; asyncio waits 60)
BACKLOG = 128  # connections the kernel queues and one event-loop tick accepts; kept below the spare descriptors


def default_max_connections() -> int:
    """As many connections as this process's descriptors allow, leaving room for files, workers and one accept burst."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, min(10_000, soft - 2 * BACKLOG - 64))


def guarded_protocol(
    read_timeout: float, max_connections: int, tls: ssl.SSLContext | None = None
) -> Callable[..., asyncio.BaseProtocol]:
    """uvicorn's HTTP/1.1 protocol with a per-request arrival deadline and eviction of the slowest waiters.

    With `tls`, the TLS layer is ours too (asyncio's own would hold a silent TCP connection for 60 s before
    uvicorn ever saw it): a connection counts from its TCP accept, its handshake must end within HANDSHAKE_S,
    and while handshaking it is the first to go when the cap is reached. Eviction prefers connections still
    without a request's headers over those whose body is arriving (a slow honest upload).
    """
    early: OrderedDict[Any, None] = OrderedDict()  # handshaking, or waiting for a request's headers
    late: OrderedDict[Any, None] = OrderedDict()  # headers in, body arriving
    tally = {"open": 0, "evicted": 0, "logged": 0.0}  # TCP connections, evictions not yet logged, last log time

    def admit(newcomer: Any) -> None:
        """Past the cap, close the connection that has waited longest (or refuse the newcomer if none waits)."""
        if tally["open"] <= max_connections:
            return
        others = (c for waiting in (early, late) for c in waiting if c is not newcomer)
        victim = next(others, None)  # the oldest without a request's headers, else the oldest body arriving
        if victim is None:  # nobody else waits (all are being answered or closing)
            newcomer.refuse()
        else:
            victim.evict()
        tally["evicted"] += 1
        now = time.monotonic()
        if now - tally["logged"] >= 1:  # one line a second while the cap bites, not one per connection
            event = {"ts": round(time.time(), 3), "event": "connections-full", "open": tally["open"]}
            log.warning(json.dumps({**event, "closed": tally["evicted"], "limit": max_connections}))
            tally.update(evicted=0, logged=now)

    class Guarded(HttpToolsProtocol):
        """One connection: waiting for a whole request, or being answered."""

        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._wait()
            if tls is None:  # over TLS the connection was counted and admitted at its TCP accept
                tally["open"] += 1
                admit(self)

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            if self in early:  # its body may be a large key arriving at a fair pace: evicted last
                early.pop(self)
                late[self] = None

        def on_message_complete(self) -> None:
            self._stop_waiting()
            super().on_message_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._wait()  # a kept-alive connection waits for its next request under the same rule

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_waiting()
            if tls is None:
                tally["open"] -= 1
            super().connection_lost(exc)

        def refuse(self) -> None:
            """No room: say so, then close."""
            self.transport.write(FULL)
            self._close()

        def evict(self) -> None:
            """Make room: close at once (a graceful close waits for unsent data or, over TLS, the peer's goodbye)."""
            self._stop_waiting()
            self.transport.abort()

        def _expire(self) -> None:
            """A request did not arrive in time: close plainly over http (the peer sees the end), at once over TLS."""
            if tls is None:
                self._close()
            else:
                self.evict()

        def _wait(self) -> None:
            early[self] = None
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self.loop.call_later(read_timeout, self._expire)

        def _stop_waiting(self) -> None:
            early.pop(self, None)
            late.pop(self, None)
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _close(self) -> None:
            self._stop_waiting()
            if not self.transport.is_closing():
                self.transport.close()

    class Handshake(SSLProtocol):
        """A TLS connection from its TCP accept: counted, admitted and timed before any request can arrive."""

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            tally["open"] += 1
            early[self] = None
            super().connection_made(transport)
            admit(self)

        def _on_handshake_complete(self, handshake_exc: BaseException | None) -> None:
            early.pop(self, None)
            super()._on_handshake_complete(handshake_exc)

        def connection_lost(self, exc: BaseException | None) -> None:
            early.pop(self, None)
            tally["open"] -= 1
            super().connection_lost(exc)

        def refuse(self) -> None:
            """No room, and no TLS yet to say so in: close."""
            self.evict()

        def evict(self) -> None:
            """Close the TCP connection at once."""
            early.pop(self, None)
            transport = cast(asyncio.Transport | None, self._transport)  # uvloop's is not an asyncio.Transport
            if transport is not None:
                transport.abort()

    def protocol(**kwargs: Any) -> asyncio.BaseProtocol:
        """What uvicorn calls for each accepted connection."""
        http = Guarded(**kwargs)
        if tls is None:
            return http
        no_waiter = cast(Any, None)  # typeshed asks for a future; asyncio's own servers pass None
        return Handshake(
            asyncio.get_running_loop(), http, tls, no_waiter, server_side=True, ssl_handshake_timeout=HANDSHAKE_S
        )

    return protocol


def check_tls(cert: str | os.PathLike[str], key: str | os.PathLike[str]) -> ssl.SSLContext:
    """The server's TLS context; a certificate and key that do not load together are one line, before listening."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise FedfheError(f"--tls-cert {cert} / --tls-key {key}: cannot be used ({exc})") from None
    return context


class Listener(uvicorn.Server):
    """uvicorn's server, which calls `ready(url)` once it accepts connections."""

    def __init__(self, config: uvicorn.Config, url: str, ready: Callable[[str], None]) -> None:
        super().__init__(config)
        self.url, self.ready = url, ready

    async def startup(self, sockets: list[Any] | None = None) -> None:
        """Listen; then say so (a port that cannot be bound ends the process before: uvicorn's exit 1)."""
        await super().startup(sockets)
        if self.started:
            self.ready(self.url)


def listener(
    app: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    tls: tuple[str | os.PathLike[str], str | os.PathLike[str]] | None = None,
    read_timeout: float = 30.0,
    max_connections: int | None = None,
    ready: Callable[[str], None] = lambda url: None,
) -> Listener:
    """A server for the app, every setting checked (nothing listens yet); HTTPS when `tls` (cert, key) is given.

    `.run()` answers until SIGINT or SIGTERM, calling `ready` with the server's URL once it accepts connections.
    """
    if not 1 <= port <= 65535:
        raise FedfheError(f"--port must be between 1 and 65535 (got {port})")
    if not read_timeout > 0:
        raise FedfheError(f"--read-timeout must be > 0 seconds (got {read_timeout})")
    limit = default_max_connections() if max_connections is None else max_connections
    if limit < 1:
        raise FedfheError(f"--max-connections must be at least 1 (got {limit})")
    context = None if tls is None else check_tls(*tls)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=cast(Any, guarded_protocol(read_timeout, limit, context)),  # a factory: uvicorn only calls it
        backlog=BACKLOG,
        log_level="warning",
        access_log=False,
    )
    address = f"[{host}]" if ":" in host else host
    return Listener(config, f"{'http' if tls is None else 'https'}://{address}:{port}", ready)
