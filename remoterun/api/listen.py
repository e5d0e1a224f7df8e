"""The listening socket: HTTPS/WSS when configured, a bound on open connections, and
deadlines for every request's headers and body (slowloris, slow bodies, stalled keep-alive).

aiohttp's server has none of these bounds, so each connection's protocol (aiohttp's own
handler) is wrapped in a thin one that counts connections and passes every byte through
unchanged, with one timer: armed while the connection waits for a request's headers (from its
start, and again from the end of each request: idle keep-alive time counts) and while a
request's body is still arriving. `deadline_middleware` tells it where each request begins and
ends; when the timer fires the connection is cut.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import structlog
from aiohttp import StreamReader, web

from remoterun.config import ConfigError, Settings

log = structlog.get_logger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
END_OF_HEADERS = b"\r\n\r\n"


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """A server TLS context from server.tls_cert / server.tls_key, or None for plain HTTP."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"server.tls_cert: cannot load {settings.tls_cert} with "
                          f"{settings.tls_key}: {exc}") from exc
    return context


def _busy_response() -> bytes:
    body = orjson.dumps({"error": "too_many_connections",
                         "message": "the server is at server.max_connections; retry"})
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Retry-After: 1\r\nConnection: close\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


class _Guard(asyncio.Protocol):
    """One connection: counted against the bound, cut if a request's headers or body are slow."""

    def __init__(self, inner: asyncio.Protocol, site: GuardedSite):
        self.inner = inner
        self.site = site
        self.counted = False
        self.tail = b""  # the last bytes seen, for a terminator split across reads
        self.timer: asyncio.TimerHandle | None = None
        self.waiting_for = ""  # what the timer waits for: "headers", "body" or nothing
        self.in_app = False  # a request of this connection is being handled
        self.transport: asyncio.Transport | None = None
        self.raw: asyncio.BaseTransport | None = None  # the socket's own transport (under TLS)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        ssl_protocol = getattr(transport, "_ssl_protocol", None)
        self.raw = getattr(ssl_protocol, "_transport", None) or transport
        if self.site.open >= self.site.max_connections:
            self.site.refused += 1
            transport.write(_busy_response())
            transport.close()
            return
        self.site.open += 1
        self.counted = True
        self.transport = transport
        self._arm("headers")
        self.inner.connection_made(transport)

    def _arm(self, waiting_for: str) -> None:
        self._disarm()
        self.waiting_for, self.tail = waiting_for, b""
        self.timer = asyncio.get_running_loop().call_later(
            self.site.header_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer, self.waiting_for = None, ""

    def _too_slow(self) -> None:
        self.site.timed_out += 1
        if self.transport is not None:
            log.info("request_timeout", waiting_for=self.waiting_for,
                     peer=self.transport.get_extra_info("peername"))
            self.transport.abort()

    def request_started(self) -> None:
        """A request's headers are in (aiohttp parsed them)."""
        self.in_app = True
        self._disarm()

    def body_expected(self, content: StreamReader) -> None:
        """The request has a body still arriving: it must be whole within the deadline."""
        self._arm("body")
        content.on_eof(self._body_done)

    def _body_done(self) -> None:
        if self.waiting_for == "body":
            self._disarm()
            if not self.in_app:  # answered before its body came (aiohttp read it after)
                self._arm("headers")

    def request_ended(self) -> None:
        """The request was answered: the next one's headers (or the body aiohttp still reads
        from this one) must come within the deadline."""
        self.in_app = False
        if self.counted and self.waiting_for != "body":
            self._arm("headers")

    def data_received(self, data: bytes) -> None:
        if not self.counted:
            return
        if self.waiting_for == "headers":
            seen = self.tail + data
            if END_OF_HEADERS in seen:
                self._disarm()
            else:
                self.tail = seen[-3:]
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.counted else None

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.raw is not None:  # the transport closes its socket once this returns
            asyncio.get_running_loop().call_soon(_release, self.raw)
            self.raw = None
        self.transport = None
        if not self.counted:
            return
        self.counted = False
        self.site.open -= 1
        self._disarm()
        self.inner.connection_lost(exc)


@web.middleware
async def deadline_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Tell the connection's guard where a request begins, whether its body is still coming,
    and where it ends (a test client's connections have no guard: nothing to tell)."""
    transport = request.transport
    guard = transport.get_protocol() if transport is not None else None
    if not isinstance(guard, _Guard):
        return await handler(request)
    guard.request_started()
    if not request.content.is_eof():
        guard.body_expected(request.content)
    try:
        return await handler(request)
    finally:
        guard.request_ended()


def _release(transport: asyncio.BaseTransport) -> None:
    """Break a closed socket transport's cycle with its own read callback.

    Python 3.11's selector transport keeps `_read_ready_cb`, a bound method of itself, after
    the connection is lost (3.12 clears it: CPython gh-100348), so each closed connection
    waits for a full collection, and its few small objects, scattered over the allocator's
    arenas, keep those arenas resident: 2,000 replays that left held ~50 MB (bench replay).
    """
    if getattr(transport, "_sock", True) is None and hasattr(transport, "_read_ready_cb"):
        transport._read_ready_cb = None


class GuardedSite(web.TCPSite):
    """A TCPSite (TLS when configured) whose connections are bounded and header-timed."""

    def __init__(self, runner: web.BaseRunner, settings: Settings,
                 sock: socket.socket | None = None, **kwargs: Any):
        super().__init__(runner, settings.host, settings.port,
                         ssl_context=tls_context(settings), **kwargs)
        self.sock = sock  # already bound and listening (the CLI checks the port first)
        self.max_connections = settings.max_connections
        self.header_timeout_s = settings.header_timeout_s
        self.open = 0
        self.refused = 0
        self.timed_out = 0

    async def start(self) -> None:
        """Listen, as TCPSite does, with each connection's protocol guarded."""
        self._runner._reg_site(self)  # BaseSite.start: TCPSite.start would listen unguarded
        server = self._runner.server
        assert server is not None
        # a TLS handshake that stalls is the same attack one layer down
        handshake_s = self.header_timeout_s if self._ssl_context else None
        loop = asyncio.get_running_loop()
        if self.sock is not None:
            self._server = await loop.create_server(
                lambda: _Guard(server(), self), sock=self.sock, ssl=self._ssl_context,
                backlog=self._backlog, ssl_handshake_timeout=handshake_s)
            return
        self._server = await loop.create_server(
            lambda: _Guard(server(), self), self._host, self._port, ssl=self._ssl_context,
            backlog=self._backlog, reuse_address=self._reuse_address,
            reuse_port=self._reuse_port, ssl_handshake_timeout=handshake_s)

    @property
    def scheme(self) -> str:
        """http or https."""
        return "https" if self._ssl_context is not None else "http"
