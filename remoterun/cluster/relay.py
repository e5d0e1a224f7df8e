"""Live output between nodes through Redis Streams, and controls through Redis pub/sub.

The node running a task publishes every item of its hub (output frames, status, exit) to the
task's stream `rr:out:<task id>`: an entry per batch, its id `<last seq of the batch>-<n>`, so
entries are keyed by seq and a reader resumes after seq K by reading after id `K-0`. Publishing
never awaits: `push` appends to a buffer, and one writer task sends every buffered batch in a
pipeline, trimming each stream to the hub's memory window (MINID of its oldest frame). While
Redis is away the buffer is bounded (oldest batches dropped): readers see the gap by seq and
take those frames from the archive, as they do for anything older than the window.

Controls (cancel, stdin, eof, resize, signal) for a task that another node runs are published
on one channel, `rr:ctl`, signed with the cluster's key (`cluster.control`); each node acts on
those for tasks it holds, once verified, and drops the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import orjson
import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from remoterun.cluster.control import Action, Control, ControlRefused, Controls
from remoterun.errors import Unavailable
from remoterun.wire import Event, Frame, Item

log = structlog.get_logger(__name__)
CONTROL_CHANNEL = "rr:ctl"
STREAM_TTL_S = 600  # a finished task's stream lingers this long for late readers
BUFFER_LIMIT_BYTES = 64 * 1024 * 1024  # what waits for Redis at most; older batches dropped
_FRAME = struct.Struct("<qBdI")  # seq, stream (0 stdout, 1 stderr), ts, length
_STREAMS = ("stdout", "stderr")


def stream_key(task_id: str) -> str:
    """The Redis key of a task's live output."""
    return f"rr:out:{task_id}"


def encode_frames(frames: list[Frame]) -> bytes:
    """Frames as one entry's payload."""
    parts = []
    for f in frames:
        parts.append(_FRAME.pack(f.seq, 1 if f.stream == "stderr" else 0, f.ts, len(f.data)))
        parts.append(f.data)
    return b"".join(parts)


def decode_frames(payload: bytes) -> list[Frame]:
    """An entry's payload back as frames."""
    out = []
    pos = 0
    view = memoryview(payload)
    while pos < len(payload):
        seq, stream, ts, size = _FRAME.unpack_from(payload, pos)
        pos += _FRAME.size
        out.append(Frame(seq, _STREAMS[stream], ts, bytes(view[pos:pos + size])))
        pos += size
    return out


def decode_entry(fields: dict[bytes, bytes]) -> list[Item]:
    """The items of one stream entry."""
    if b"f" in fields:
        return list[Item](decode_frames(fields[b"f"]))
    body = orjson.loads(fields[b"e"])
    return [Event(body["kind"], body["body"])]


def entry_seq(entry_id: bytes | str) -> int:
    """The seq part of an entry id."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.split("-", 1)[0])


def connect(url: str, **options: Any) -> aioredis.Redis:
    """A client that retries a dropped connection a few times (Redis restarting). Without a
    driver name and version: redis-py would read its package metadata from disk for each new
    connection, on the event loop (it names the client to the server, nothing we need)."""
    return aioredis.from_url(url, retry=Retry(ExponentialBackoff(cap=0.5), 3),
                             retry_on_error=[RedisConnectionError, RedisTimeoutError],
                             socket_connect_timeout=2, health_check_interval=10,
                             lib_name=None, lib_version=None, **options)


class Relay:
    """This node's side of Redis: the output writer, the control listener, readers."""

    def __init__(self, url: str):
        self.url = url
        self.redis = connect(url, max_connections=2000)
        self._buffer: deque[tuple[str, int, int | None, dict[str, bytes]]] = deque()
        self._buffered = 0
        self._wake = asyncio.Event()
        self.last_error: str | None = None  # the latest failure to reach Redis
        self.on_control: Callable[[Control], None] = lambda control: None
        self.controls: Controls | None = None  # set once the cluster's key is read
        self._loops: list[asyncio.Task[None]] = []
        self._control_order = asyncio.Lock()  # one publish at a time, in call order

    async def start(self) -> None:
        """Start the writer and the control listener."""
        self._loops = [asyncio.create_task(self._write_loop(), name="relay-writer"),
                       asyncio.create_task(self._control_loop(), name="relay-controls")]

    async def close(self) -> None:
        """Send what is buffered (briefly), stop the loops, close the connections."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                while self._buffer and self.last_error is None:
                    self._wake.set()
                    await asyncio.sleep(0.01)
        for loop in self._loops:
            loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        await self.redis.aclose()

    # Publishing ------------------------------------------------------------------------------

    def push(self, task_id: str, items: list[Item], top: int, min_seq: int | None) -> None:
        """Queue a hub's items for the task's stream, in order (never blocks).

        `top` is the seq of the last frame published before these items, `min_seq` the oldest
        seq of the hub's memory window, below which the stream is trimmed. A run of frames
        becomes one entry `<its last seq>-*`, an event one entry `<top so far>-*`.
        """
        key = stream_key(task_id)
        run: list[Frame] = []
        for item in [*items, None]:
            if isinstance(item, Frame):
                run.append(item)
                continue
            if run:
                top = run[-1].seq
                self._queue(key, top, min_seq, {"f": encode_frames(run)})
                run = []
            if item is not None:
                self._queue(key, top, None, {"e": orjson.dumps(
                    {"kind": item.kind, "body": item.body})})

    def _queue(self, key: str, seq: int, min_seq: int | None, fields: dict[str, bytes]) -> None:
        size = sum(len(v) for v in fields.values())
        self._buffer.append((key, seq, min_seq, fields))
        self._buffered += size
        while self._buffered > BUFFER_LIMIT_BYTES and len(self._buffer) > 1:
            dropped = self._buffer.popleft()
            self._buffered -= sum(len(v) for v in dropped[3].values())
        self._wake.set()

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._buffer:
                batch = list(self._buffer)
                try:
                    await self._send(batch)
                except (RedisError, OSError) as exc:
                    if self.last_error is None:
                        log.warning("redis_unavailable", error=str(exc))
                    self.last_error = str(exc) or type(exc).__name__
                    await asyncio.sleep(0.2)
                    continue
                self.last_error = None
                for _ in batch:
                    _, _, _, fields = self._buffer.popleft()
                    self._buffered -= sum(len(v) for v in fields.values())

    async def _send(self, batch: list[tuple[str, int, int | None, dict[str, bytes]]]) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for key, seq, min_seq, fields in batch:
                pipe.xadd(key, cast(Any, fields), id=f"{seq}-*", minid=min_seq,
                          approximate=True)
                if fields.get("e", b"").startswith(b'{"kind":"exit"'):
                    pipe.expire(key, STREAM_TTL_S)
            results = await pipe.execute(raise_on_error=False)
        for result in results:
            if isinstance(result, RedisError) and "equal or smaller" not in str(result):
                raise result  # an id at or below the top: a re-send after a lost reply

    async def publish_ended(self, task_id: str, items: list[Event]) -> None:
        """Add status and exit events to a stream whose writer is gone (a lost node's task),
        after whatever it holds."""
        key = stream_key(task_id)
        try:
            top: Any = await self.redis.xrevrange(key, count=1)
            seq = entry_seq(top[0][0]) if top else 0
            for item in items:
                await self.redis.xadd(key, {"e": orjson.dumps(
                    {"kind": item.kind, "body": item.body})}, id=f"{seq}-*")
            await self.redis.expire(key, STREAM_TTL_S)
        except (RedisError, OSError) as exc:  # its readers see the end in the database
            log.warning("redis_unavailable", error=str(exc))

    # Reading ---------------------------------------------------------------------------------

    async def read(self, task_id: str, after: str, block_ms: int, count: int = 256
                   ) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """Entries after the id `after`, waiting up to `block_ms` for one; [] if none came.
        Unavailable while Redis cannot be reached."""
        try:
            got: Any = await self.redis.xread({stream_key(task_id): after}, count=count,
                                         block=block_ms)
        except (RedisError, OSError) as exc:
            self.last_error = str(exc) or type(exc).__name__
            raise Unavailable(f"redis cannot be reached: {self.last_error}",
                              code="redis_unavailable", retry_after_s=1.0) from exc
        if not got:
            return []
        return list(got[0][1])

    # Controls --------------------------------------------------------------------------------

    async def send_control(self, task_id: str, method: str, *args: Any) -> None:
        """Publish a signed control for whichever node runs the task; Unavailable without
        Redis."""
        assert self.controls is not None, "the relay's controls were not given their key"
        message = self.controls.sign(Control(task_id, Action(method), args))
        try:
            async with self._control_order:  # FIFO: stdin then eof arrive in that order
                await self.redis.publish(CONTROL_CHANNEL, message)
        except (RedisError, OSError) as exc:
            raise Unavailable(f"redis cannot be reached: {exc}", code="redis_unavailable",
                              retry_after_s=1.0) from exc

    async def _control_loop(self) -> None:
        while True:
            try:
                async with self.redis.pubsub() as pubsub:
                    await pubsub.subscribe(CONTROL_CHANNEL)
                    async for message in _messages(pubsub):
                        self._dispatch(message)
            except (RedisError, OSError) as exc:
                self.last_error = str(exc) or type(exc).__name__
                await asyncio.sleep(0.5)

    def _dispatch(self, raw: bytes) -> None:
        if self.controls is None:
            return
        try:
            control = self.controls.verify(raw)
        except ControlRefused as exc:  # forged, stale, replayed or not a control
            log.warning("control_refused", reason=str(exc))
            return
        try:
            self.on_control(control)
        except Exception:  # a bad message must not stop the listener
            log.exception("control_failed")

    async def ping(self) -> None:
        """Raise unless Redis answers."""
        await self.redis.ping()


class RelaySink:
    """Stands among a hub's subscribers and hands what it publishes to the relay, the items
    of one turn of the loop as one batch."""

    def __init__(self, relay: Relay, task_id: str, hub: Any):
        self.relay = relay
        self.task_id = task_id
        self.hub = hub
        self.items: list[Item] = []
        self.overflowed = asyncio.Event()  # (never set: the relay's buffer bounds itself)

    def push(self, item: Item) -> None:
        """Take an item (called by the hub; never blocks)."""
        if not self.items:
            asyncio.get_running_loop().call_soon(self.flush)
        self.items.append(item)

    def flush(self) -> None:
        """Hand the items gathered so far to the relay."""
        items, self.items = self.items, []
        if not items:
            return
        hub = self.hub
        first = next((i for i in items if isinstance(i, Frame)), None)
        top = first.seq - 1 if first is not None else hub.next_seq - 1
        self.relay.push(self.task_id, items, top, hub.window[0].seq if hub.window else None)

    def close(self) -> None:
        """Nothing to release."""


async def _messages(pubsub: Any) -> AsyncIterator[bytes]:
    async for message in pubsub.listen():
        if message.get("type") == "message":
            yield message["data"]
