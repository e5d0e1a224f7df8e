"""WebSocket endpoints: `/ws` (submit, then follow) and `/tasks/{id}/ws?since=` (attach)."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from typing import Any

import structlog
from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.abc import AbstractStreamWriter

from remoterun.api import METRICS, SCHEDULER, SETTINGS, SOCKETS, identity
from remoterun.api.guard import audit_entry, record, record_denied
from remoterun.api.http import loads, submit, task_row
from remoterun.archive.tail import MAX_TAIL_LINES
from remoterun.engine.attempt import Attempt
from remoterun.engine.hub import SlowConsumer, Subscription
from remoterun.errors import BadRequest, Forbidden, RemoteRunError
from remoterun.wire import SIGNALS, Item, dumps, encoded, ws_payload

log = structlog.get_logger(__name__)
routes = web.RouteTableDef()
TRY_AGAIN_LATER = 1013
CLOSE_TIMEOUT_S = 10.0  # how long a closed-for-slowness client has to read up to the close frame


def parse_since(raw: str | None) -> int:
    """A `since` seq: a non-negative integer, 0 when absent."""
    if raw in (None, ""):
        return 0
    try:
        since = int(raw or "")
    except ValueError:
        since = -1
    if since < 0:
        raise BadRequest("since must be a non-negative integer", code="invalid_request",
                         details=[{"field": "since", "message": "a non-negative integer"}])
    return since


def parse_tail(raw: str | None) -> int | None:
    """A `tail` line count: None when absent, at most MAX_TAIL_LINES (a larger one is cut)."""
    if raw is None:
        return None
    if not raw.isdigit():
        raise BadRequest("tail must be a non-negative integer", code="invalid_request",
                         details=[{"field": "tail", "message": "a non-negative integer"}])
    return min(int(raw), MAX_TAIL_LINES)


WRITE_BYTES = 256 * 1024  # frames joined into one socket write, at most (about)


def frame_header(size: int) -> bytes:
    """A server-to-client WebSocket text frame's header (FIN, unmasked, no extension:
    compress=False) for a payload of `size` bytes."""
    if size < 126:
        return bytes((0x81, size))
    if size < 1 << 16:
        return struct.pack("!BBH", 0x81, 126, size)
    return struct.pack("!BBQ", 0x81, 127, size)


def text_frame(payload: bytes) -> tuple[bytes, bytes]:
    """A text frame as its header and payload, joined only into the socket write."""
    return frame_header(len(payload)), payload


def wire_frame(item: Item) -> tuple[bytes, bytes]:
    """The item framed for the wire, made once and shared by every client."""
    framed: tuple[bytes, bytes] = encoded(item, "frame", lambda i: text_frame(ws_payload(i)))
    return framed


class Session:
    """One WebSocket client: reads its messages, pumps its task's stream to it.

    The stream goes out as pre-framed bytes, the frames of a batch joined into one socket
    write: on loopback each send costs the receiver's wake-up too, and a trivial task's
    task/status/output/status/exit frames are usually ready at once (aiohttp's own send_str
    would frame and send each, for each client).
    """

    def __init__(self, request: web.Request, ws: web.WebSocketResponse,
                 writer: AbstractStreamWriter):
        self.request = request
        self.ws = ws
        self.writer = writer
        self.scheduler = request.app[SCHEDULER]
        self.task_id: str | None = None
        self.script: str | None = None  # the bound task's, which the token's list must allow
        self.typed = False  # whether this client's first stdin message is in the audit yet
        self.pump: asyncio.Task[None] | None = None

    async def attach(self, task_id: str, since: int, script: str, tail: int | None = None
                     ) -> None:
        """Bind to a task and start streaming it (from its last `tail` lines, if given)."""
        sub = await self.scheduler.subscribe(task_id, since)
        sub.tail = tail
        self.task_id = task_id
        self.script = script
        self.pump = asyncio.create_task(self._pump(sub))
        sub.on_overflow = self.pump.cancel

    async def _pump(self, sub: Subscription) -> None:
        code, reason = int(WSCloseCode.OK), b"task ended"
        try:
            # The task frame goes at once: a client waits for it even if nothing else comes.
            await self._send(sub, [text_frame(dumps({"type": "task", "task": sub.task}).encode())])
            async with contextlib.aclosing(sub.batches()) as batches:
                async for batch in batches:
                    await self._send(sub, list(map(wire_frame, batch)))
        except (SlowConsumer, asyncio.CancelledError):
            if not sub.overflowed.is_set():
                raise
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            self.request.app[METRICS].slow_clients.inc()
            code, reason = TRY_AGAIN_LATER, b"client too slow: reconnect with ?since="
        except ConnectionError as exc:  # reset, or aiohttp's "Connection lost" waking a drain
            # Its traceback holds the drain's frame, whose waiter holds it: a cycle that kept
            # each reader's last batch (~2 MB of replay) until a full collection.
            _drop_tracebacks(exc)
            return
        finally:
            sub.close()
        await close_socket(self.request, self.ws, code, reason)

    async def _send(self, sub: Subscription, frames: list[tuple[bytes, bytes]]) -> None:
        transport = self.request.transport
        if self.ws.closed or transport is None or transport.is_closing():
            raise ConnectionResetError("the client went away")
        chunk: list[bytes] = []
        size = 0
        for header, payload in frames:  # joined once, into the write: the only copy
            chunk += (header, payload)
            size += len(header) + len(payload)
            if size >= WRITE_BYTES:
                transport.write(b"".join(chunk))
                chunk, size = [], 0
                await self._drain(sub, transport)
        if chunk:
            transport.write(b"".join(chunk))
            await self._drain(sub, transport)

    async def _drain(self, sub: Subscription, transport: asyncio.WriteTransport) -> None:
        """Wait for the client to take what was written; one that takes nothing for
        `stream.stall_timeout_s` is too slow (it holds memory, and maybe a replay slot)."""
        if transport.get_write_buffer_size() <= transport.get_write_buffer_limits()[0]:
            return  # under the low-water mark writing is not paused: no timer to arm
        try:
            async with asyncio.timeout(self.request.app[SETTINGS].stall_timeout_s):
                await self.writer.drain()
        except TimeoutError:
            sub.overflowed.set()
            raise SlowConsumer from None

    async def handle(self, raw: str) -> None:
        """Act on one client message; errors go back as error frames."""
        message = loads(raw)
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            raise BadRequest("each message is a JSON object with a string `type`",
                             code="invalid_message")
        kind = message.pop("type")
        handler = getattr(self, f"on_{kind}", None)
        if handler is None:
            raise BadRequest(f"unknown message type {kind!r}", code="unknown_type")
        await handler(message)

    async def on_ping(self, message: dict[str, Any]) -> None:
        await self.ws.send_str('{"type": "pong"}')

    async def on_submit(self, message: dict[str, Any]) -> None:
        if self.task_id is not None:
            raise BadRequest("this socket is already bound to a task", code="already_bound")
        if self.request.match_info.get("id"):
            raise BadRequest("submit is only accepted on /ws", code="already_bound")
        task = await submit(self.request, message)
        await self.attach(task["id"], 0, task["script"])

    def _bound(self) -> str:
        """The bound task's id, once the token may act on it (operator, its script list)."""
        who = identity(self.request)
        who.require("operator")
        if self.task_id is None or self.script is None:
            raise BadRequest("submit a task first", code="not_attached")
        who.require_task(self.script, "operator")
        return self.task_id

    def _active(self, interactive: bool = False) -> Attempt:
        task_id = self._bound()
        active = self.scheduler.attempt(task_id)
        if active is None:
            raise BadRequest("the task is not running", code="not_running")
        if interactive and not (active.task.interactive or active.task.pty):
            raise BadRequest("the task is neither interactive nor PTY", code="not_interactive")
        return active

    async def on_stdin(self, message: dict[str, Any]) -> None:
        data = message.get("data")
        if not isinstance(data, str):
            raise BadRequest("stdin needs a string `data`", code="invalid_message")
        active = self._active(interactive=True)
        if not self.typed:  # once per task and client: a session types many keys
            self.typed = True
            await record(self.request, "stdin", task_id=self.task_id, script=self.script)
        active.control("write", data.encode())

    async def on_eof(self, message: dict[str, Any]) -> None:
        self._active(interactive=True).control("close_stdin")

    async def on_resize(self, message: dict[str, Any]) -> None:
        cols, rows = message.get("cols"), message.get("rows")
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 10000
                   for v in (cols, rows)):
            raise BadRequest("resize needs integer `cols` and `rows`", code="invalid_message")
        self._active().control("resize", cols, rows)

    async def on_signal(self, message: dict[str, Any]) -> None:
        name = message.get("signal")
        name = name.upper().removeprefix("SIG") if isinstance(name, str) else ""
        if name not in SIGNALS:
            raise BadRequest(f"signal must be one of {sorted(SIGNALS)}", code="bad_signal")
        active = self._active()
        await record(self.request, "signal", task_id=self.task_id, script=self.script,
                     detail=name)
        active.control("signal", SIGNALS[name])

    async def on_cancel(self, message: dict[str, Any]) -> None:
        task_id = self._bound()
        await self.scheduler.cancel(task_id, audit=audit_entry(self.request, "cancel"))

    async def stop(self) -> None:
        """Stop pumping (the client went away)."""
        if self.pump is not None and not self.pump.done():
            self.pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.pump


async def close_socket(request: web.Request, ws: web.WebSocketResponse, code: int,
                       reason: bytes) -> None:
    """Close with a code; abort the connection if the client does not take the close frame.

    The close frame is queued behind what the socket already holds (bounded by aiohttp's write
    buffer limit) without waiting for it to drain, so a slow client that reads on finds it.
    """
    with contextlib.suppress(Exception):
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            await ws.close(code=code, message=reason, drain=False)
    if not ws.closed and request.transport is not None:
        request.transport.abort()


class _Socket(web.WebSocketResponse):
    """aiohttp's WebSocket, less a heartbeat re-armed once it is closing.

    aiohttp 3.14.5 re-arms the heartbeat on any data, the client's answer to our close frame
    too: the closed socket, its request, protocol and transport then stay for heartbeat_s, and
    after in a cycle until a full collection (~20 MB after bench soak's 2,700 tasks).
    """

    def _on_data_received(self) -> None:
        if not self._closing and not self.closed:
            super()._on_data_received()


async def _serve(request: web.Request, task: dict[str, Any] | None, since: int,
                 tail: int | None = None) -> web.WebSocketResponse:
    settings = request.app[SETTINGS]
    ws = _Socket(compress=False, max_msg_size=settings.max_ws_message_bytes,
                               heartbeat=settings.heartbeat_s)
    writer = await ws.prepare(request)
    request.app[SOCKETS].add(ws)
    metrics = request.app[METRICS]
    gauge = metrics.child(metrics.clients, "websocket")
    gauge.inc()
    session = Session(request, ws, writer)
    try:
        if task is not None:
            await session.attach(task["id"], since, task["script"], tail)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                try:
                    await session.handle(msg.data)
                except RemoteRunError as exc:
                    if isinstance(exc, Forbidden):
                        await record_denied(request, exc)
                    await ws.send_str(dumps({"type": "error", **exc.to_json()}))
            elif msg.type == WSMsgType.BINARY:
                await ws.send_str(dumps({"type": "error", "error": "binary_frame",
                                         "message": "send JSON text frames"}))
        if ws.close_code == WSCloseCode.MESSAGE_TOO_BIG:
            log.info("ws_message_too_big")
    except ConnectionResetError:
        pass
    finally:
        gauge.dec()
        await session.stop()
        _unhook(request, ws)
    return ws


def _unhook(request: web.Request, ws: _Socket) -> None:
    """Break the cycles a dropped connection leaves, so that its memory goes when it does.

    Left to a full collection (rare: see cli._tune_gc), each of 2,000 replays that vanished
    kept its request, transport and buffers: ~90 MB after they left (bench replay). aiohttp
    3.14.5 leaves three: the protocol keeps the socket's data callback (cleared only on a clean
    close), the socket its request, the request its protocol; and the socket and its reader
    keep the exceptions that ended them (the reset, the failed close frame), whose tracebacks
    hold the frames of the socket's own methods, and so the socket.
    """
    protocol = request.protocol
    if protocol is not None and getattr(protocol, "_data_received_cb", None) is not None:
        protocol._data_received_cb = None  # type: ignore[attr-defined]
    reader = getattr(ws, "_reader", None)
    for exc in (ws.exception(), reader.exception() if reader is not None else None):
        _drop_tracebacks(exc)


def _drop_tracebacks(exc: BaseException | None) -> None:
    """Clear the tracebacks of an exception and of those it was raised from or during."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        one = todo.pop()
        if one is None or id(one) in seen:
            continue
        seen.add(id(one))
        one.__traceback__ = None
        todo += (one.__cause__, one.__context__)


@routes.get("/ws")
async def ws_submit(request: web.Request) -> web.WebSocketResponse:
    """A socket not yet bound to a task: its first useful message is `submit`."""
    identity(request).require("viewer")
    return await _serve(request, None, 0)


@routes.get("/tasks/{id}/ws")
async def ws_attach(request: web.Request) -> web.WebSocketResponse:
    """Attach to a task: replay after `since` (or its last `tail` lines), then live."""
    row = await task_row(request, live=True)  # 404 or 403 before the upgrade
    since = parse_since(request.query.get("since"))
    tail = parse_tail(request.query.get("tail"))
    await record(request, "attach", task_id=row["id"], script=row["script"], detail="ws")
    return await _serve(request, row, since, tail)
