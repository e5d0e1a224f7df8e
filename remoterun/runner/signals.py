"""Signals to a run's process group, held until a sandbox's group holds the script."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import struct
import termios

from remoterun.runner.spec import RunSpec

TIOCGSID = getattr(termios, "TIOCGSID", 0x5429)  # a terminal's session (Linux's number)
TYPED_SIGNALS = ((termios.VINTR, signal.SIGINT), (termios.VQUIT, signal.SIGQUIT),
                 (termios.VSUSP, signal.SIGTSTP))
GROUP_WAIT_S = 2.0  # a sandbox forks the script within a few ms: signals wait this long at most


class GroupSignals:
    """Where a started run's signals go, and the signals that wait for it.

    `pid` is the main process's (also its group's) id; `group`, once a sandbox's start-up
    step has named it, the group that signals go to instead; `master_fd` the PTY's, if any.
    """

    def __init__(self, spec: RunSpec, pid: int, exited: asyncio.Future[int],
                 master_fd: int | None):
        self.spec = spec
        self.pid = pid
        self.exited = exited
        self.master_fd = master_fd
        self.group: int | None = None
        self._deferred: list[int] = []  # signals held until the sandbox's group holds the script
        self._deferred_until = 0.0

    def send(self, signum: int) -> None:
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
            os.killpg(self.target(), signum)

    def _retry_deferred(self) -> None:
        """Send the held signals once the group holds the script (or it waited long enough,
        or the process is gone), else look again in a millisecond."""
        if not self._deferred:
            return
        loop = asyncio.get_running_loop()
        ready = self.spec.group_ready
        if ((ready is not None and not ready()) and loop.time() < self._deferred_until
                and not self.exited.done()):
            loop.call_later(0.001, self._retry_deferred)
            return
        held, self._deferred = self._deferred, []
        for signum in held:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.target(), signum)

    def target(self) -> int:
        """The process group that signals go to."""
        if self.spec.pty and not self.spec.take_ctty and self.master_fd is not None:
            # The script's session inside the sandbox holds the terminal: signal it, as ^C
            # would (its id as this server sees it; until it exists, the launcher's group).
            with contextlib.suppress(OSError):
                sid: int = struct.unpack("i", fcntl.ioctl(self.master_fd, TIOCGSID, b"\0" * 4))[0]
                if sid > 0:
                    return sid
        return self.group if self.group is not None else self.pid

    def kill_all(self) -> None:
        """SIGKILL the signals' group and the main process's, when they differ."""
        self.send(signal.SIGKILL)
        if self.target() != self.pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)


def typed_signals(master_fd: int, data: bytes) -> list[int]:
    """The signals of the keys typed in `data` (INTR, QUIT, SUSP), as the line discipline
    sends them to a terminal's foreground group, if its ISIG is on."""
    try:
        attrs = termios.tcgetattr(master_fd)
    except termios.error:
        return []
    if not attrs[3] & termios.ISIG:
        return []
    found: list[int] = []
    for key, signum in TYPED_SIGNALS:
        char = attrs[6][key]
        if char not in (b"\0", b"") and char in data:
            found.append(signum)
    return found
