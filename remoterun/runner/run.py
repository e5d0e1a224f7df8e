"""One child process's run: spawned from argv in its own process group, over pipes or a PTY.

Its output is read and coalesced into frames (`streams`); when the main process exits,
whatever is left in its process group is killed and the pipes are drained for at most
`drain_grace_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal

from remoterun.runner.failures import SpawnError, is_transient, spawn_message
from remoterun.runner.signals import GroupSignals, typed_signals
from remoterun.runner.spec import OnOutput, RunResult, RunSpec
from remoterun.runner.streams import (
    Coalescer,
    InputWriter,
    OutputReader,
    read_size,
    set_winsize,
    split_utf8,
)
from remoterun.spawn import Children, encode_env, spawn

MAX_SIGNAL = 64


class Run:
    """A started child process and its streams."""

    def __init__(self, spec: RunSpec, on_output: OnOutput, *, read_chunk: int = 65536,
                 kill_grace_s: float = 5.0, drain_grace_s: float = 0.5,
                 coalesce_s: float = 0.004, children: Children | None = None):
        self.spec = spec
        self.children = children if children is not None else Children()
        self.read_chunk = read_chunk
        self.output = Coalescer(on_output, read_chunk, coalesce_s)
        self.kill_grace_s = kill_grace_s
        self.drain_grace_s = drain_grace_s
        self._pid: int | None = None
        self._signals: GroupSignals | None = None  # once started
        self.exited: asyncio.Future[int] | None = None  # the exit code, once reaped
        self.readers: list[OutputReader] = []
        self.stdin: InputWriter | None = None
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
        child_fds: list[int] = []  # the child's ends, ours to close once it has them
        env = [*spec.inherited, *encode_env(spec.env)]
        try:
            self._open_streams(child_fds)
            await self._spawn(loop, env, child_fds)
        except OSError as exc:  # out of descriptors or PTYs before the spawn
            self._close_fds()
            raise SpawnError(f"cannot start {spec.argv[0]}: {exc.strerror}",
                             is_transient(exc)) from exc
        finally:
            for fd in child_fds:
                os.close(fd)
        self._watch_exit(loop)
        self._begin_io(loop)
        if spec.started is not None:
            try:
                self._started().group = await spec.started(self.pid)
            except BaseException:
                self._kill_all()
                raise

    def _open_streams(self, child_fds: list[int]) -> None:
        """Open the PTY or the three pipes; the child's ends go into `child_fds`."""
        if self.spec.pty:
            master, slave = os.openpty()
            set_winsize(master, self.spec.cols, self.spec.rows)
            child_fds.append(slave)
            self.master_fd = master
            self.readers = [OutputReader(master, "pty")]
            return
        # Each end is owned (closed by start's finally or _close_fds) as soon as it exists,
        # so running out of descriptors half way leaks none.
        in_r, in_w = os.pipe()
        child_fds.append(in_r)
        self.stdin = InputWriter(in_w, owns_fd=True)
        for stream in ("stdout", "stderr"):
            read_end, write_end = os.pipe()
            child_fds.append(write_end)
            self.readers.append(OutputReader(read_end, stream))

    async def _spawn(self, loop: asyncio.AbstractEventLoop, env: list[bytes],
                     child_fds: list[int]) -> None:
        """Start the child on `child_fds` (stdin, stdout, stderr; or the PTY's slave)."""
        spec = self.spec
        fds = (child_fds[0],) * 3 if spec.pty else tuple(child_fds)
        children = self.children
        children.spawning += 1
        try:
            if spec.pty and spec.take_ctty:  # a full fork (see spawn): on a thread
                self._pid = await loop.run_in_executor(None, functools.partial(
                    spawn, spec.argv, env, str(spec.cwd), *fds, tty=True,
                    pass_fds=spec.pass_fds))
            else:
                # vfork+exec right here: the loop is held until the child has exec'd
                # (~0.1 ms), less than a hop to a worker thread and back costs it.
                self._pid = spawn(spec.argv, env, str(spec.cwd), *fds, pass_fds=spec.pass_fds)
            children.spawned.add(self._pid)
        except Exception as exc:  # any type (a NUL byte is a ValueError): close what we opened
            self._close_fds()
            raise SpawnError(spawn_message(spec.argv[0], exc), is_transient(exc)) from exc
        finally:
            children.spawning -= 1

    def _begin_io(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read the output, write the input given up front, and close stdin if that is all."""
        assert self.exited is not None
        self._signals = GroupSignals(self.spec, self.pid, self.exited, self.master_fd)
        if self.spec.pty:
            assert self.master_fd is not None
            self.stdin = InputWriter(self.master_fd, owns_fd=False)
        self.children.open_runs += 1
        self._counted = True
        for reader in self.readers:
            os.set_blocking(reader.fd, False)
            loop.add_reader(reader.fd, self._on_readable, reader)
        assert self.stdin is not None
        os.set_blocking(self.stdin.fd, False)
        if self.spec.stdin:
            self.stdin.write(self.spec.stdin)
        if not self.spec.interactive and not self.spec.pty:
            self.stdin.close()

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

    def _on_readable(self, reader: OutputReader) -> None:
        try:
            data = os.read(reader.fd, read_size(self.read_chunk, self.children.open_runs))
        except BlockingIOError:
            return
        except OSError:  # EIO: the PTY's last slave closed, i.e. end of file
            data = b""
        if not data:
            self._finish(reader)
            return
        chunk, reader.tail = split_utf8(reader.tail + data)
        if chunk:
            self.output.hold(reader.stream, chunk)

    def _finish(self, reader: OutputReader) -> None:
        if reader.eof:
            return
        reader.eof = True
        asyncio.get_running_loop().remove_reader(reader.fd)
        if reader.tail:
            self.output.hold(reader.stream, reader.tail)
            reader.tail = b""
        self.output.flush()
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
                for signum in typed_signals(self.master_fd, data):
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
        """Send a signal to the whole process group (in a sandbox, the script's, once it holds
        the script: `GroupSignals.send`)."""
        self._started().send(signum)

    def _started(self) -> GroupSignals:
        assert self._signals is not None
        return self._signals

    def _kill_all(self) -> None:
        self._started().kill_all()

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
        self.output.detach()
        if self._counted:
            self._counted = False
            self.children.open_runs -= 1
        if self.stdin is not None:
            self.stdin.closing = True
            self.stdin.close_now()
        for reader in self.readers:
            with contextlib.suppress(OSError):
                asyncio.get_running_loop().remove_reader(reader.fd)
                os.close(reader.fd)
        self.readers = []
