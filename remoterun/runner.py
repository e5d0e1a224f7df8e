"""One child process: spawned from argv in its own process group, over pipes or a PTY.

Output is read with `loop.add_reader` straight from the file descriptors (no threads, no
StreamReader copies), cut at UTF-8 character boundaries so each chunk decodes on its own, and
coalesced: a read that arrives after a quiet spell of `coalesce_s` is handed on at once (a lone
line costs no added latency), while reads that follow each other closely are gathered for up
to `coalesce_s` or `frame_bytes`, so a script printing many short lines costs a few frames, not
one per line. Both streams share one buffer in arrival order, so stdout/stderr interleaving is
kept. When the main process exits, whatever is left in its process group is killed and the
pipes are drained for at most `drain_grace_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import os
import signal
import struct
import termios
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from remoterun.spawn import Children, encode_env, spawn

OnOutput = Callable[[str, bytes], None]
TIOCGSID = getattr(termios, "TIOCGSID", 0x5429)  # a terminal's session (Linux's number)
MAX_SIGNAL = 64
TYPED_SIGNALS = ((termios.VINTR, signal.SIGINT), (termios.VQUIT, signal.SIGQUIT),
                 (termios.VSUSP, signal.SIGTSTP))
GROUP_WAIT_S = 2.0  # a sandbox forks the script within a few ms: signals wait this long at most


class SpawnError(Exception):
    """The process could not be started; the message says why, for the task's `error`.

    `transient`: the host ran short of descriptors (EMFILE, ENFILE), not the task at fault,
    so the scheduler tries the same attempt again later instead of failing it.
    """

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


TRANSIENT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE})


def is_transient(exc: BaseException) -> bool:
    """Whether a spawn's failure is a shortage of descriptors that may pass."""
    return isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS


@dataclass(frozen=True)
class RunSpec:
    """What to start and how. The child's environment is `inherited` (the server's own, less
    RR_*, encoded once) plus `env` (the task's variables)."""

    argv: Sequence[str]
    env: Mapping[str, str]  # added to `inherited`
    cwd: Path
    pty: bool = False
    interactive: bool = False
    stdin: bytes = b""
    cols: int = 80
    rows: int = 24
    inherited: Sequence[bytes] = ()  # encoded once (spawn.encode_env); names nothing `env` does
    # A sandbox launcher (bwrap, docker run) as argv[0]: the descriptors it is handed, a step
    # run once it is spawned (given its pid; returns the process group that signals go to),
    # whether that group holds the script yet (signals wait until it does), whether it takes
    # the PTY as its controlling terminal (bwrap does not: the script's session inside does),
    # and whether it reports a death by signal N as exit 128 + N. `typed_signals`: nobody holds
    # the PTY as a controlling terminal (gVisor's Sentry does not), so the signal keys typed
    # (^C, ^\\, ^Z, while the terminal's ISIG is on) are sent by the run, as the line
    # discipline would send them.
    pass_fds: Sequence[int] = ()
    started: Callable[[int], Awaitable[int | None]] | None = None
    group_ready: Callable[[], bool] | None = None
    take_ctty: bool = True
    signal_exit_codes: bool = False
    typed_signals: bool = False


@dataclass(frozen=True)
class RunResult:
    """How a run ended: the exit code (negative: killed by that signal) and why it was stopped."""

    exit_code: int
    stopped: str | None = None  # None: exited by itself; "timeout" or "stopped"


def split_utf8(data: bytes) -> tuple[bytes, bytes]:
    """Split off a trailing incomplete UTF-8 sequence, to be prefixed to the next read."""
    end = len(data)
    for back in range(1, min(4, end) + 1):
        byte = data[end - back]
        if byte & 0xC0 != 0x80:  # a lead byte (or ASCII)
            need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else \
                4 if byte & 0xF8 == 0xF0 else 1
            if need > back:
                return data[: end - back], data[end - back :]
            break
    return data, b""


def set_winsize(fd: int, cols: int, rows: int) -> None:
    """Set a terminal's size (the foreground process group gets SIGWINCH)."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


READ_BUDGET = 128 * 1024  # 256 KiB: flood p99 43-47 ms in bench/; 128 KiB: 36-38 ms
MIN_READ = 2048


class _Writer:
    """Non-blocking writes to a file descriptor, buffered while the reader is slow."""

    def __init__(self, fd: int, owns_fd: bool):
        self.fd = fd
        self.owns_fd = owns_fd
        self.buffer = bytearray()
        self.closing = False
        self.closed = False
        self.loop = asyncio.get_running_loop()

    def write(self, data: bytes) -> None:
        if self.closed or self.closing:
            return
        self.buffer += data
        self._flush()

    def _flush(self) -> None:
        while self.buffer:
            try:
                n = os.write(self.fd, self.buffer)
            except BlockingIOError:
                self.loop.add_writer(self.fd, self._flush)
                return
            except OSError:  # the reader is gone (EPIPE, EIO): drop what is left
                self.buffer.clear()
                break
            del self.buffer[:n]
        self.loop.remove_writer(self.fd)
        if self.closing:
            self._close_now()

    def close(self) -> None:
        self.closing = True
        if not self.buffer:
            self._close_now()

    def _close_now(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.remove_writer(self.fd)
        if self.owns_fd:
            os.close(self.fd)


@dataclass
class _Reader:
    fd: int
    stream: str
    tail: bytes = b""
    eof: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Run:
    """A started child process and its streams."""

    def __init__(self, spec: RunSpec, on_output: OnOutput, *, read_chunk: int = 65536,
                 kill_grace_s: float = 5.0, drain_grace_s: float = 0.5,
                 coalesce_s: float = 0.004, children: Children | None = None):
        self.spec = spec
        self.children = children if children is not None else Children()
        self.on_output = on_output
        self.read_chunk = read_chunk
        self.coalesce_s = coalesce_s
        # Output read but not yet handed on: each stream's run of reads, joined only when a
        # frame gathers several (a read handed on alone is passed as it is, not copied twice).
        self._held: list[tuple[str, list[bytes]]] = []
        self._held_bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        self._last_flush = 0.0
        self.kill_grace_s = kill_grace_s
        self.drain_grace_s = drain_grace_s
        self._pid: int | None = None
        self._group: int | None = None  # where signals go, if not the main process's group
        self._deferred: list[int] = []  # signals held until the sandbox's group holds the script
        self._deferred_until = 0.0
        self.exited: asyncio.Future[int] | None = None  # the exit code, once reaped
        self.readers: list[_Reader] = []
        self.stdin: _Writer | None = None
        self.master_fd: int | None = None
        self._counted = False  # in _open_runs
        self.paused = False  # output not read for now (see pause)

    @property
    def stdin_pending(self) -> int:
        """Bytes written to stdin that the process has not read yet."""
        return len(self.stdin.buffer) if self.stdin is not None else 0

    @property
    def pid(self) -> int:
        """The main process's id, also its process group's id."""
        assert self._pid is not None
        return self._pid

    async def start(self) -> None:
        """Spawn the process; SpawnError if it cannot start."""
        loop = asyncio.get_running_loop()
        spec = self.spec
        child_fds: list[int] = []
        env = [*spec.inherited, *encode_env(spec.env)]
        try:
            if spec.pty:
                master, slave = os.openpty()
                set_winsize(master, spec.cols, spec.rows)
                child_fds = [slave]
                self.master_fd = master
                self.readers = [_Reader(master, "pty")]
            else:
                # Each end is owned (closed by the finally or _close_fds) as soon as it exists,
                # so running out of descriptors half way leaks none.
                in_r, in_w = os.pipe()
                child_fds.append(in_r)
                self.stdin = _Writer(in_w, owns_fd=True)
                for stream in ("stdout", "stderr"):
                    read_end, write_end = os.pipe()
                    child_fds.append(write_end)
                    self.readers.append(_Reader(read_end, stream))
                in_r, out_w, err_w = child_fds
            children = self.children
            children.spawning += 1
            try:
                if spec.pty and spec.take_ctty:  # a full fork (see spawn): on a thread
                    self._pid = await loop.run_in_executor(None, functools.partial(
                        spawn, spec.argv, env, str(spec.cwd), slave, slave, slave, tty=True,
                        pass_fds=spec.pass_fds))
                else:
                    # vfork+exec right here: the loop is held until the child has exec'd
                    # (~0.1 ms), less than a hop to a worker thread and back costs it.
                    fds = (slave, slave, slave) if spec.pty else (in_r, out_w, err_w)
                    self._pid = spawn(spec.argv, env, str(spec.cwd), *fds,
                                      pass_fds=spec.pass_fds)
                children.spawned.add(self._pid)
            except Exception as exc:  # any type (a NUL byte is a ValueError): close what we opened
                self._close_fds()
                raise SpawnError(spawn_message(spec.argv[0], exc), is_transient(exc)) from exc
            finally:
                children.spawning -= 1
        except OSError as exc:  # out of descriptors or PTYs before the spawn
            self._close_fds()
            raise SpawnError(f"cannot start {spec.argv[0]}: {exc.strerror}",
                             is_transient(exc)) from exc
        finally:
            for fd in child_fds:
                os.close(fd)
        self._watch_exit(loop)
        if spec.pty:
            assert self.master_fd is not None
            self.stdin = _Writer(self.master_fd, owns_fd=False)
        self.children.open_runs += 1
        self._counted = True
        for reader in self.readers:
            os.set_blocking(reader.fd, False)
            loop.add_reader(reader.fd, self._on_readable, reader)
        assert self.stdin is not None
        os.set_blocking(self.stdin.fd, False)
        if spec.stdin:
            self.stdin.write(spec.stdin)
        if not spec.interactive and not spec.pty:
            self.stdin.close()
        if spec.started is not None:
            try:
                self._group = await spec.started(self.pid)
            except BaseException:
                self._kill_all()
                raise

    def _watch_exit(self, loop: asyncio.AbstractEventLoop) -> None:
        """Reap the child when its pidfd becomes readable (no thread, no SIGCHLD handler)."""
        pid = self.pid
        self.exited = loop.create_future()
        pidfd = os.pidfd_open(pid)

        def on_exit() -> None:
            try:
                reaped, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: report as asyncio does
                reaped, status = pid, 255 << 8
            if not reaped:
                return
            loop.remove_reader(pidfd)
            os.close(pidfd)
            self.children.spawned.discard(pid)
            code = os.waitstatus_to_exitcode(status)
            if self.spec.signal_exit_codes and 128 < code <= 128 + MAX_SIGNAL:
                code = 128 - code  # the launcher's "killed by signal N"
            assert self.exited is not None
            if not self.exited.done():
                self.exited.set_result(code)

        loop.add_reader(pidfd, on_exit)

    def _chunk(self) -> int:
        """This read's size: the loop's per-iteration read budget shared by the open runs.

        One loop iteration serves every ready pipe once, so its length (and with it every
        client's latency) grows with the bytes read per callback. A lone task reads full
        chunks; a hundred flooding tasks read 2 KiB each, so a quiet task's line is not
        stuck behind 100 x 64 KiB of reading and compressing."""
        share = READ_BUDGET // max(1, self.children.open_runs)
        return max(MIN_READ, min(self.read_chunk, share))

    def _on_readable(self, reader: _Reader) -> None:
        try:
            data = os.read(reader.fd, self._chunk())
        except BlockingIOError:
            return
        except OSError:  # EIO: the PTY's last slave closed, i.e. end of file
            data = b""
        if not data:
            self._finish(reader)
            return
        chunk, reader.tail = split_utf8(reader.tail + data)
        if chunk:
            self._hold(reader.stream, chunk)

    def _hold(self, stream: str, data: bytes) -> None:
        if self._held and self._held[-1][0] == stream:
            self._held[-1][1].append(data)
        else:
            self._held.append((stream, [data]))
        self._held_bytes += len(data)
        if self._timer is not None and self._held_bytes < self.read_chunk:
            return
        loop = asyncio.get_running_loop()
        quiet = loop.time() - self._last_flush >= self.coalesce_s
        if quiet or self._held_bytes >= self.read_chunk:
            self._flush_held()
        else:
            self._timer = loop.call_later(self.coalesce_s, self._flush_held)

    def _flush_held(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        held, self._held, self._held_bytes = self._held, [], 0
        self._last_flush = asyncio.get_running_loop().time()
        for stream, parts in held:
            self.on_output(stream, parts[0] if len(parts) == 1 else b"".join(parts))

    def _finish(self, reader: _Reader) -> None:
        if reader.eof:
            return
        reader.eof = True
        asyncio.get_running_loop().remove_reader(reader.fd)
        if reader.tail:
            self._hold(reader.stream, reader.tail)
            reader.tail = b""
        self._flush_held()
        reader.done.set()

    def pause(self) -> None:
        """Stop reading the output until resume(): the pipes fill and the process blocks on
        its writes, as under `docker run` with a blocking log driver."""
        if not self.paused:
            self.paused = True
            loop = asyncio.get_running_loop()
            for reader in self.readers:
                if not reader.eof:
                    loop.remove_reader(reader.fd)

    def resume(self) -> None:
        """Read the output again."""
        if self.paused:
            self.paused = False
            loop = asyncio.get_running_loop()
            for reader in self.readers:
                if not reader.eof:
                    loop.add_reader(reader.fd, self._on_readable, reader)

    # Control ---------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Send bytes to stdin (or the PTY as typed keys)."""
        if self.stdin is not None:
            self.stdin.write(data)
            if self.spec.typed_signals and self.master_fd is not None:
                self._typed_signals(data)

    def _typed_signals(self, data: bytes) -> None:
        """The signals of the keys typed in `data` (INTR, QUIT, SUSP), sent as the line
        discipline sends them to a terminal's foreground group, if its ISIG is on."""
        assert self.master_fd is not None
        try:
            attrs = termios.tcgetattr(self.master_fd)
        except termios.error:
            return
        if not attrs[3] & termios.ISIG:
            return
        for key, signum in TYPED_SIGNALS:
            char = attrs[6][key]
            if char not in (b"\0", b"") and char in data:
                self.signal(signum)

    def close_stdin(self) -> None:
        """End of input: close the pipe, or send the terminal's EOF character on a PTY."""
        if self.stdin is None:
            return
        if self.spec.pty:
            self.stdin.write(b"\x04")
        else:
            self.stdin.close()

    def resize(self, cols: int, rows: int) -> None:
        """Set the PTY's size; ignored for pipe tasks."""
        if self.master_fd is not None:
            with contextlib.suppress(OSError):
                set_winsize(self.master_fd, cols, rows)

    def signal(self, signum: int) -> None:
        """Send a signal to the whole process group (in a sandbox, the script's). A sandbox's
        group that does not hold the script yet (bwrap forks it a few ms after it starts) gets
        it, and the signals after it, in order, once it does; SIGKILL goes at once (it ends
        bwrap's first process, and with it every process of its namespace)."""
        ready = self.spec.group_ready
        if signum != signal.SIGKILL and (self._deferred or (ready is not None and not ready())):
            self._deferred.append(signum)
            if len(self._deferred) == 1:
                self._deferred_until = asyncio.get_running_loop().time() + GROUP_WAIT_S
                self._retry_deferred()
            return
        self._deferred.clear()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._target(), signum)

    def _retry_deferred(self) -> None:
        """Send the held signals once the group holds the script (or it waited long enough,
        or the process is gone), else look again in a millisecond."""
        if not self._deferred:
            return
        loop = asyncio.get_running_loop()
        ready = self.spec.group_ready
        if ((ready is not None and not ready()) and loop.time() < self._deferred_until
                and not (self.exited is not None and self.exited.done())):
            loop.call_later(0.001, self._retry_deferred)
            return
        held, self._deferred = self._deferred, []
        for signum in held:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._target(), signum)

    def _target(self) -> int:
        if self.spec.pty and not self.spec.take_ctty and self.master_fd is not None:
            # The script's session inside the sandbox holds the terminal: signal it, as ^C
            # would (its id as this server sees it; until it exists, the launcher's group).
            with contextlib.suppress(OSError):
                sid: int = struct.unpack("i", fcntl.ioctl(self.master_fd, TIOCGSID, b"\0" * 4))[0]
                if sid > 0:
                    return sid
        return self._group if self._group is not None else self.pid

    def _kill_all(self) -> None:
        """SIGKILL the signals' group and the main process's, when they differ."""
        self.signal(signal.SIGKILL)
        if self._target() != self.pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)

    # Lifetime --------------------------------------------------------------------------------

    async def wait(self, timeout_s: float | None, stop: asyncio.Future[None]) -> RunResult:
        """Wait for the main process to exit, stopping it on timeout or once `stop` is done."""
        assert self.exited is not None
        waiter = self.exited
        loop = asyncio.get_running_loop()
        # Callbacks on the two futures and a timer, rather than asyncio.wait() and a task to
        # wait on a stop event: the same, at a fraction of the cost for every task.
        woken: asyncio.Future[None] = loop.create_future()

        def wake(_: object = None) -> None:
            if not woken.done():
                woken.set_result(None)

        waiter.add_done_callback(wake)
        stop.add_done_callback(wake)
        timer = loop.call_later(timeout_s, wake) if timeout_s is not None else None
        stopped: str | None = None
        try:
            await woken
            if not waiter.done():
                stopped = "stopped" if stop.done() else "timeout"
                await self._terminate(waiter)
            code = await asyncio.shield(waiter)
        finally:
            waiter.remove_done_callback(wake)
            stop.remove_done_callback(wake)
            if timer is not None:
                timer.cancel()
            self._kill_all()  # whatever is left of the group goes with the main process
        await self._drain()
        return RunResult(code, stopped)

    async def _terminate(self, waiter: asyncio.Future[int]) -> None:
        self.signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(waiter), self.kill_grace_s)
            return
        self._kill_all()

    async def _drain(self) -> None:
        self.resume()  # what is left is read now, whoever else is behind
        pending = [r.done.wait() for r in self.readers if not r.eof]
        if pending:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.drain_grace_s):
                    await asyncio.gather(*pending)
        for reader in self.readers:
            if not reader.eof:
                # Still open after the grace: a process outside the group holds the pipe.
                self._on_readable(reader)
                self._finish(reader)
        self._close_fds()

    def _close_fds(self) -> None:
        # Closed, a run hands nothing on: dropping the callback (as asyncio's transports drop
        # their protocol) breaks the cycle run -> owner -> run, so a finished attempt and its
        # hub's window go by reference counting, not at the rare full collection (cli._tune_gc).
        self.on_output = _discard
        if self._counted:
            self._counted = False
            self.children.open_runs -= 1
        if self.stdin is not None:
            self.stdin.closing = True
            self.stdin._close_now()
        for reader in self.readers:
            with contextlib.suppress(OSError):
                asyncio.get_running_loop().remove_reader(reader.fd)
                os.close(reader.fd)
        self.readers = []


def _discard(stream: str, data: bytes) -> None:
    pass


NOT_STARTED = 127  # the shell's "command not found": the task's exit code when it cannot start


def start_problem(path: Path) -> str | None:
    """Why the script at `path` cannot start, in words that say what to do; None if its #!
    line (if any) names an interpreter that exists. Reads the file: call it off the loop."""
    try:
        with path.open("rb") as file:
            head = file.read(256)
    except OSError:  # out of descriptors, removed since: the spawn meets it and says so
        return None
    if not head.startswith(b"#!"):
        return None  # exec decides (ENOEXEC names it)
    line = head[2:].split(b"\n", 1)[0]
    if line.endswith(b"\r"):
        return (f"{path.name} has Windows line endings (CRLF): its #! line names "
                f"{line.strip().decode(errors='replace')!r}^M, which does not exist; "
                f"convert it: sed -i 's/\\r$//' {path.name} (or dos2unix)")
    interpreter = line.split()[0].decode(errors="replace") if line.split() else ""
    if not interpreter or not os.path.isfile(interpreter):
        return (f"{path.name}: the interpreter {interpreter!r} of its #! line is not installed "
                f"on the server: install it or fix the #! line (e.g. #!/usr/bin/env python3)")
    return None


def spawn_message(path: str, exc: Exception) -> str:
    """A spawn's failure as the task's `error` says it."""
    if not isinstance(exc, OSError):
        return f"cannot start {path}: {type(exc).__name__}: {exc}"
    if exc.errno == errno.ENOEXEC:
        return f"cannot execute {path}: exec format error (missing #! line?)"
    if isinstance(exc, PermissionError):
        return f"cannot execute {path}: permission denied"
    if isinstance(exc, FileNotFoundError):
        return f"cannot execute {path}: file or interpreter not found"
    return f"cannot execute {path}: {exc.strerror}"
