"""The listening socket: HTTPS/WSS when configured, a bound on open connections, and a
deadline for a new connection's request headers (slowloris).

aiohttp's server has neither bound, so each connection's protocol (aiohttp's own handler) is
wrapped in a thin one that counts connections and watches the headers arrive before passing
every byte through unchanged.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any

import orjson
import structlog
from aiohttp import web

from remoterun.config import ConfigError, Settings

log = structlog.get_logger(__name__)
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
    """One connection: counted against the bound, closed if its first headers are slow."""

    def __init__(self, inner: asyncio.Protocol, site: GuardedSite):
        self.inner = inner
        self.site = site
        self.counted = False
        self.tail = b""  # the last bytes seen, for a terminator split across reads
        self.timer: asyncio.TimerHandle | None = None
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
        self.timer = asyncio.get_running_loop().call_later(
            self.site.header_timeout_s, self._too_slow, transport)
        self.inner.connection_made(transport)

    def _too_slow(self, transport: asyncio.Transport) -> None:
        self.site.timed_out += 1
        log.info("header_timeout", peer=transport.get_extra_info("peername"))
        transport.abort()

    def data_received(self, data: bytes) -> None:
        if not self.counted:
            return
        if self.timer is not None:
            seen = self.tail + data
            if END_OF_HEADERS in seen:
                self.timer.cancel()
                self.timer = None
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
        if not self.counted:
            return
        self.counted = False
        self.site.open -= 1
        if self.timer is not None:
            self.timer.cancel()
        self.inner.connection_lost(exc)


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
