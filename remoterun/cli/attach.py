"""Being attached to a task from a shell: its output to stdout/stderr, stdin and the terminal to it.

One WebSocket (`/tasks/{id}/ws?since=`), reconnected with the last seq seen whenever it drops,
so output is neither lost nor repeated. Ctrl-C sends SIGINT to the task (with `-t` the keystroke
itself goes, as in `docker run -it`); a second one within a second detaches.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import os
import signal
import stat
import sys
import termios
import time
import tty
from collections.abc import Iterator
from typing import Any

import aiohttp

from remoterun.cli.clock import precise
from remoterun.cli.remote import EXIT_REMOTERUN, Remote, RemoteError, exit_code

RECONNECT_S = 60.0  # give up after this long without a connection
DETACH_WINDOW_S = 1.0
CTRL_C = b"\x03"
SIGNALLED = 128


@contextlib.contextmanager
def raw_terminal(fd: int | None) -> Iterator[None]:
    """The terminal on fd in raw mode for the block, restored however the block ends."""
    if fd is None:
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSAFLUSH, saved)


class Output:
    """Writes output frames to our stdout/stderr, optionally one stream, optionally timestamped."""

    def __init__(self, stream: str | None = None, timestamps: bool = False,
                 utc: bool = False):
        self.stream = stream
        self.timestamps = timestamps
        self.utc = utc  # timestamps in UTC (Z) rather than local time with its offset
        self.line_start = {"stdout": True, "stderr": True, "pty": True}

    def write(self, frame: dict[str, Any]) -> None:
        """One output frame."""
        name = frame["stream"]
        if self.stream is not None and name != self.stream:
            return
        data: str = frame["data"]
        if self.timestamps:
            data = self._stamped(name, data, frame["ts"])
        target = sys.stderr if name == "stderr" else sys.stdout
        target.buffer.write(data.encode("utf-8", "replace"))
        target.flush()

    def _stamped(self, name: str, data: str, ts: str) -> str:
        lines = data.splitlines(keepends=True)
        out = []
        for line in lines:
            out.append(f"{precise(ts, self.utc)} {line}" if self.line_start[name] else line)
            self.line_start[name] = line.endswith("\n")
        return "".join(out)


class Attachment:
    """One client attached to one task until it ends (or the user detaches)."""

    def __init__(self, remote: Remote, task_id: str, *, since: int = 0, stdin: bool = False,
                 tty_mode: bool = False, output: Output | None = None,
                 forward_interrupt: bool = True):
        self.remote = remote
        self.task_id = task_id
        self.seq = since
        self.forward_stdin = stdin
        self.tty = tty_mode
        self.output = output or Output()
        self.forward_interrupt = forward_interrupt  # False: Ctrl-C just stops watching
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.running = asyncio.Event()
        self.status = "pending"
        self.last_interrupt = 0.0
        self.detached: str | None = None  # why, when the user (or a signal) detached
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.position_shown = False
        self.closing: list[asyncio.Task[Any]] = []  # sockets being closed by a detach

    # The loop ----------------------------------------------------------------------------------

    async def run(self) -> int:
        """Stream until the task ends; its exit code (README's table), or 0 when detached."""
        loop = asyncio.get_running_loop()
        term_fd = sys.stdin.fileno() if self.tty else None
        with raw_terminal(term_fd):
            handlers = {signal.SIGINT: self._interrupt, signal.SIGWINCH: self._resized,
                        signal.SIGTERM: lambda: self._detach("terminated"),
                        signal.SIGHUP: lambda: self._detach("hung up")}
            for signum, handler in handlers.items():
                loop.add_signal_handler(signum, handler)
            reading = self.forward_stdin and self._start_stdin(loop)
            helpers = [asyncio.create_task(self._send_loop()),
                       asyncio.create_task(self._queue_position())]
            try:
                code = await self._connect_loop()
            finally:
                for helper in helpers:
                    helper.cancel()
                await asyncio.gather(*helpers, *self.closing, return_exceptions=True)
                for signum in handlers:
                    loop.remove_signal_handler(signum)
                if reading:
                    loop.remove_reader(sys.stdin.fileno())
                self._clear_position()
        if self.detached == "interrupted":  # `logs -f` stopped by Ctrl-C, like `tail -f`
            return SIGNALLED + signal.SIGINT
        if self.detached is not None:
            self._say(f"detached ({self.detached}); task {self.task_id} goes on: "
                      f"remoterun attach {self.task_id[:8]}")
            return SIGNALLED + signal.SIGTERM if self.detached == "terminated" else 0
        return code

    async def _connect_loop(self) -> int:
        lost_since: float | None = None
        while self.detached is None:
            url = self.remote.ws_url(f"/tasks/{self.task_id}/ws?since={self.seq}")
            try:
                async with self.remote.session.ws_connect(url, max_msg_size=0,
                                                          heartbeat=20.0) as ws:
                    self.ws, lost_since = ws, None
                    code = await self._read(ws)
                    if code is not None:
                        return code
            except aiohttp.WSServerHandshakeError as exc:
                if exc.status < 500:
                    raise RemoteError(f"{exc.status}: cannot attach to task "
                                      f"{self.task_id}: {exc.message}") from exc
            except (aiohttp.ClientError, OSError, TimeoutError):
                pass
            finally:
                self.ws = None
            if self.detached is not None:
                break
            now = time.monotonic()
            if lost_since is None:
                lost_since = now
                self._say(f"connection lost; reconnecting from seq {self.seq}")
            elif now - lost_since > RECONNECT_S:
                raise RemoteError(f"lost the connection to {self.remote.url} for "
                                  f"{RECONNECT_S:.0f} s; the task may go on: "
                                  f"remoterun attach {self.task_id[:8]}")
            await asyncio.sleep(0.25)
        return 0

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> int | None:
        """Frames until the socket closes: the exit code after `exit`, None to reconnect."""
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            frame = json.loads(msg.data)
            kind = frame.get("type")
            if kind == "output":
                if frame["seq"] > self.seq:
                    self.output.write(frame)
                    self.seq = frame["seq"]
            elif kind == "task":
                self._status(frame["task"]["status"])
            elif kind == "status":
                self._status(frame["status"])
            elif kind == "exit":
                return await self._ended(frame)
            elif kind == "error" and frame.get("error") != "not_running":
                self._say(f"{frame.get('error')}: {frame.get('message')}")
        return None

    async def _ended(self, frame: dict[str, Any]) -> int:
        task = dict(frame)
        if task["status"] == "failed" and task.get("exit_code") is None:
            task = await self.remote.json("GET", f"/tasks/{self.task_id}")
        if task["status"] != "success":
            detail = f" (exit code {task['exit_code']})" if task.get("exit_code") is not None \
                else ""
            error = f": {task['error']}" if task.get("error") else ""
            self._say(f"task {task['status']}{detail}{error}")
        return exit_code(task)

    def _status(self, status: str) -> None:
        self.status = status
        if status == "running":
            self._clear_position()
            if not self.running.is_set():
                self.running.set()
                if self.tty:
                    self._resized()
        elif status == "pending":
            self.running.clear()

    # Sending -----------------------------------------------------------------------------------

    async def _send_loop(self) -> None:
        """Send queued messages, once the task runs and a socket is up."""
        while True:
            message = await self.outbox.get()
            while True:
                await self.running.wait()
                ws = self.ws
                if ws is not None and not ws.closed:
                    with contextlib.suppress(ConnectionError, aiohttp.ClientError):
                        await ws.send_str(json.dumps(message))
                        break
                await asyncio.sleep(0.05)

    def _start_stdin(self, loop: asyncio.AbstractEventLoop) -> bool:
        fd = sys.stdin.fileno()
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            try:
                loop.add_reader(fd, self._stdin_ready, loop, fd)
                return True
            except PermissionError:  # /dev/null and the like: epoll cannot watch them
                pass
        while chunk := os.read(fd, 65536):  # a file (or /dev/null): all of it is ready now
            self._stdin(chunk)
        self.outbox.put_nowait({"type": "eof"})
        return False

    def _stdin_ready(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            chunk = b""
        if not chunk:
            loop.remove_reader(fd)
            self.outbox.put_nowait({"type": "eof"})
            return
        if self.tty and CTRL_C in chunk:
            now = time.monotonic()
            if now - self.last_interrupt < DETACH_WINDOW_S:
                self._detach("Ctrl-C twice")
                return
            self.last_interrupt = now
        self._stdin(chunk)

    def _stdin(self, chunk: bytes) -> None:
        text = self.decoder.decode(chunk)
        if text:
            self.outbox.put_nowait({"type": "stdin", "data": text})

    def _resized(self) -> None:
        try:
            size = os.get_terminal_size(sys.stdin.fileno())
        except OSError:
            return
        self.outbox.put_nowait({"type": "resize", "cols": size.columns, "rows": size.lines})

    def _interrupt(self) -> None:
        if not self.forward_interrupt:
            self._detach("interrupted")
            return
        now = time.monotonic()
        if now - self.last_interrupt < DETACH_WINDOW_S:
            self._detach("Ctrl-C twice")
            return
        self.last_interrupt = now
        if self.status != "running":
            self._say("the task has not started; Ctrl-C again to detach "
                      f"(remoterun cancel {self.task_id[:8]} cancels it)")
            return
        self.outbox.put_nowait({"type": "signal", "signal": "INT"})
        self._say("sent SIGINT to the task; Ctrl-C again within 1 s to detach")

    def _detach(self, why: str) -> None:
        self.detached = why
        self.running.set()  # nothing waits for the task any more
        ws = self.ws
        if ws is not None:
            self.closing.append(asyncio.get_running_loop().create_task(ws.close()))

    # Talking to the user -----------------------------------------------------------------------

    async def _queue_position(self) -> None:
        """While the task waits, its place in the queue on stderr (a terminal only)."""
        if not sys.stderr.isatty():
            return
        while True:
            await asyncio.sleep(0.5)
            if self.status != "pending":
                continue
            try:
                task = await self.remote.json("GET", f"/tasks/{self.task_id}")
            except RemoteError:
                continue
            if task["status"] != "pending" or self.status != "pending":
                continue
            where = f" (position {task['queue_position']})" if "queue_position" in task else ""
            sys.stderr.write(f"\rremoterun: waiting in the queue{where}\033[K")
            sys.stderr.flush()
            self.position_shown = True

    def _clear_position(self) -> None:
        if self.position_shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            self.position_shown = False

    def _say(self, message: str) -> None:
        self._clear_position()
        end = "\r\n" if self.tty else "\n"
        sys.stderr.write(f"remoterun: {message}{end}")
        sys.stderr.flush()


async def follow(remote: Remote, task_id: str, **options: Any) -> int:
    """Attach until the end; `EXIT_REMOTERUN` if the server failed us."""
    try:
        return await Attachment(remote, task_id, **options).run()
    except RemoteError as exc:
        for line in exc.lines():
            sys.stderr.write(line + "\n")
        return EXIT_REMOTERUN

