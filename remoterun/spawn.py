"""Start a child process with its stdio on given descriptors, in a new session: vfork + exec.

`subprocess.Popen` does this, and then some: on the event loop, where every task is spawned,
its Python-level preparation (arguments, the environment encoded variable by variable, the
error pipe, bookkeeping for objects we never use) cost ~70 us per spawn here, as much as the
vfork and exec themselves. On CPython 3.11, `spawn` calls the same C function Popen calls,
`_posixsubprocess.fork_exec`, with the same arguments Popen would pass for
`Popen(argv, cwd=cwd, env=env, stdin=.., stdout=.., stderr=.., start_new_session=True)`, and
reads the child's exec error the same way. Its signature is private and changes between Python
versions, so on any other version `spawn` is Popen. Either way: every other descriptor is closed
in the child, signals are reset to their defaults, and a failed exec raises the OSError it met.
"""

from __future__ import annotations

import _posixsubprocess
import asyncio
import builtins
import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import termios
import threading
from collections.abc import Mapping, Sequence

FAST = sys.version_info[:2] == (3, 11)  # the fork_exec signature below is 3.11's


def encode_env(env: Mapping[str, str]) -> list[bytes]:
    """An environment as the `KEY=value` byte strings exec takes (computed once for the
    server's own environment, then extended per task)."""
    out = []
    for key, value in env.items():
        name = os.fsencode(key)
        if b"=" in name or not name:
            raise ValueError(f"illegal environment variable name {key!r}")
        out.append(name + b"=" + os.fsencode(value))
    return out


INHERITED_IGNORES = (signal.SIGINT, signal.SIGQUIT)
_unignored = False


def _unignore_inherited() -> None:
    """A server started as a background job (`remoterun serve &`, nohup) begins with SIGINT
    and SIGQUIT ignored, and an ignored signal stays ignored across exec: every task would
    shrug off ^C and `signal INT`. Here such a signal gets a handler that does nothing, which
    keeps the server deaf to it and lets exec give each child the default. Once, from the
    main thread (where the loop that spawns runs)."""
    global _unignored
    if threading.current_thread() is not threading.main_thread():
        return
    _unignored = True
    for sig in INHERITED_IGNORES:
        if signal.getsignal(sig) == signal.SIG_IGN:
            signal.signal(sig, _ignore)


def _ignore(signum: int, frame: object) -> None:
    """The server's reaction to a signal it was started ignoring: none."""


def _make_controlling_tty() -> None:  # runs in the child, after setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def spawn(argv: Sequence[str], env: list[bytes], cwd: str, stdin: int, stdout: int,
          stderr: int, *, tty: bool = False, fast: bool = FAST,
          pass_fds: Sequence[int] = ()) -> int:
    """Start argv[0] (a path) with these descriptors as 0, 1 and 2; its pid.

    `env` is the whole environment, encoded (`encode_env`). The caller reaps the child. With
    `tty`, stdin is a terminal the child takes as its controlling terminal: that needs code
    run in the child, so a full fork (page tables copied, ~1 ms here), through Popen.
    `pass_fds` stay open in the child under their numbers (a sandbox launcher's pipes).
    """
    if not _unignored:
        _unignore_inherited()
    if tty or not fast:
        environ = dict(item.split(b"=", 1) for item in env)
        child = subprocess.Popen(list(argv), cwd=cwd, env=environ,
                                 stdin=stdin, stdout=stdout, stderr=stderr,
                                 start_new_session=True, pass_fds=tuple(pass_fds),
                                 preexec_fn=_make_controlling_tty if tty else None)
        child.returncode = 0  # reaped by the caller: Popen must never wait for it
        return child.pid
    err_read, err_write = os.pipe()
    try:
        low = []
        while err_write < 3:  # not on 0-2, which the child's stdio take
            low.append(err_write)
            err_write = os.dup(err_write)
        for fd in low:
            os.close(fd)
        try:
            pid: int = _posixsubprocess.fork_exec(
                list(argv), (os.fsencode(argv[0]),), True,
                tuple(sorted({err_write, *pass_fds})), cwd, env,
                stdin, -1, -1, stdout, -1, stderr, err_read, err_write,
                True, True, -1, None, None, None, -1,
                None,  # type: ignore[arg-type]  # no preexec_fn (the stub says one is needed)
                subprocess._USE_VFORK)
        finally:
            os.close(err_write)
        failure = os.read(err_read, 50_000)  # empty: exec closed it (close-on-exec)
    finally:
        os.close(err_read)
    if failure:
        os.waitpid(pid, 0)
        raise _child_error(failure, argv[0], cwd)
    return pid


def _child_error(data: bytes, executable: str, cwd: str) -> Exception:
    """The exception the child reported before exec, as Popen builds it."""
    name, _, rest = data.partition(b":")
    hex_errno, _, message = rest.partition(b":")
    kind = getattr(builtins, name.decode("ascii", "replace"), subprocess.SubprocessError)
    if isinstance(kind, type) and issubclass(kind, OSError) and hex_errno:
        number = int(hex_errno, 16)
        # "noexec": it failed before exec, at chdir: the path at fault is the cwd.
        filename = cwd if message == b"noexec" else executable
        return kind(number, os.strerror(number), filename)
    if isinstance(kind, type) and issubclass(kind, Exception):
        return kind(message.decode(errors="replace"))
    return subprocess.SubprocessError(message.decode(errors="replace"))


class Children:
    """The server's registry of the children its runs wait for; one per app, never global.

    A pid joins `spawned` only once `spawn()` returns, so while a spawn is under way
    (`spawning`) no zombie may be reaped by anyone else: it might be the child just forked.
    `open_runs` counts the runs whose output is being read, which share the loop's read budget.
    """

    __slots__ = ("open_runs", "spawned", "spawning")

    def __init__(self) -> None:
        self.spawned: set[int] = set()
        self.spawning = 0
        self.open_runs = 0



async def run_helper(argv: Sequence[str], children: Children, null: int, timeout_s: float
                     ) -> int | None:
    """Run a helper program (`docker rm`, `runsc delete`) to its end, its stdio on `null`,
    reaped as a task's process is (the registry, a pidfd callback), never waited for on the
    loop; its exit code, or None if it could not start or was killed after `timeout_s`."""
    loop = asyncio.get_running_loop()
    children.spawning += 1
    try:
        pid = spawn(argv, [], "/", null, null, null)
        children.spawned.add(pid)
    except OSError:
        return None
    finally:
        children.spawning -= 1
    pidfd = os.pidfd_open(pid)
    done: asyncio.Future[int] = loop.create_future()

    def exited() -> None:  # a callback, as Run reaps: never a wait inside a coroutine
        with contextlib.suppress(ChildProcessError):
            reaped, status = os.waitpid(pid, os.WNOHANG)
            if not reaped:
                return
            if not done.done():
                done.set_result(os.waitstatus_to_exitcode(status))
        if not done.done():  # reaped by someone else
            done.set_result(-1)

    loop.add_reader(pidfd, exited)
    try:
        async with asyncio.timeout(timeout_s):
            return await done
    except TimeoutError:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        return None
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        children.spawned.discard(pid)  # if not reaped here, the reaper's (tend_orphans)
