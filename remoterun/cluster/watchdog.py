"""A node's watchdog: a process of its own that kills the node's runs once its lease lapses.

A frozen server (SIGSTOP, a stalled VM, a long GC or swap storm) can do nothing itself, and its
tasks' processes live on in sessions of their own; meanwhile the cluster declares it lost after
`node_timeout_s` and runs its tasks again elsewhere. So each node starts this small process and
feeds it over a pipe: `beat T` after each heartbeat that landed (T: when it was sent, on
CLOCK_BOOTTIME, shared by both processes), `run TASK ATTEMPT` before an attempt may spawn,
`done TASK ATTEMPT` after it ended. When no beat came for `fence_s` after the last one's T, the
watchdog writes `fenced` back, then SIGKILLs every process on the host whose environment
carries a tracked RR_TASK_ID and RR_ATTEMPT, and the process group of each. It keeps sweeping
them until the server answers `rejoined T` (it joined again under a new epoch), and after the
server's end (EOF) it kills at the deadline and exits; `bye` (a clean close) exits at once.
docs/cluster.md gives the timing argument.

The process runs this file by path, on the standard library only: importing the `remoterun`
package would load the whole server into a process that must stay small and start fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from remoterun.spawn import Children

FENCED = b"fenced\n"
SWEEP_S = 0.25  # while fenced, how often the watchdog looks for the tracked runs again
CLOSE_WAIT_S = 5.0


def lease_clock() -> float:
    """The clock of leases: monotonic, shared by every process of the host, and counting the
    time a suspended host slept (CLOCK_BOOTTIME)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


# The watchdog process ------------------------------------------------------------------------


class Keeper:
    """The watchdog's state: when the lease lapses, and the runs it then kills."""

    def __init__(self, fence_s: float, spared: set[int]):
        self.fence_s = fence_s
        self.deadline = lease_clock() + fence_s
        self.runs: set[tuple[str, str]] = set()  # (task id, attempt)
        self.fenced = False
        self.spared = spared  # process groups never killed: the server's and our own

    def take(self, line: str) -> bool:
        """Act on one line from the server; False on `bye`."""
        kind, *args = line.split() or [""]
        if kind == "beat" and not self.fenced:
            self.deadline = max(self.deadline, float(args[0]) + self.fence_s)
        elif kind == "rejoined":
            self.fenced, self.deadline = False, float(args[0]) + self.fence_s
        elif kind == "fence":
            self.deadline = 0.0
        elif kind == "run":
            self.runs.add((args[0], args[1]))
        elif kind == "done":
            self.runs.discard((args[0], args[1]))
        return kind != "bye"

    def due(self) -> float:
        """Seconds until the next thing to do (the deadline, or the next sweep)."""
        return SWEEP_S if self.fenced else max(0.0, self.deadline - lease_clock())

    def tick(self, out: int) -> None:
        """Fence once the deadline passed (say so first, then kill), and sweep while fenced."""
        if not self.fenced and lease_clock() >= self.deadline:
            self.fenced = True
            with contextlib.suppress(OSError):  # the server is gone: kill all the same
                os.write(out, FENCED)
        if self.fenced and self.runs:
            kill_runs(self.runs, self.spared)


def kill_runs(runs: set[tuple[str, str]], spared: set[int]) -> list[int]:
    """SIGKILL every process of these runs (by RR_TASK_ID and RR_ATTEMPT) and its group."""
    marks = [(f"RR_TASK_ID={t}".encode(), f"RR_ATTEMPT={a}".encode()) for t, a in runs]
    killed = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                env = set(fh.read().split(b"\0"))
            group = os.getpgid(pid)
        except OSError:  # gone meanwhile
            continue
        if any(task in env and attempt in env for task, attempt in marks):
            with contextlib.suppress(OSError):
                if group not in spared:
                    os.killpg(group, signal.SIGKILL)
                os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    return killed


def main(fence_s: float, server_group: int) -> None:
    """The watchdog's loop: read the server's lines, fence at the deadline."""
    keeper = Keeper(fence_s, {server_group, os.getpgrp()})
    pending, reading = b"", True
    while reading or not keeper.fenced:
        ready, _, _ = select.select([0] if reading else [], [], [], keeper.due())
        if ready:
            data = os.read(0, 65536)
            if not data:  # the server ended: kill what it left at the deadline, then go
                reading = False
                if not keeper.runs:
                    return
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                if not keeper.take(line.decode()):
                    return
        keeper.tick(1)


# The server's side ---------------------------------------------------------------------------


class Watchdog:
    """The server's end of its watchdog process: beats and runs go in, `fenced` comes out.

    `fenced` (read fresh from the pipe each time) stays true from the fence until `rejoined`;
    `on_fence` is called once per fence, with why. A watchdog that died or stopped reading
    counts as a fence: without it the node could not keep its promise.
    """

    def __init__(self, fence_s: float, on_fence: Callable[[str], None], children: Children):
        self.fence_s = fence_s
        self.on_fence = on_fence
        self.children = children
        self._proc: subprocess.Popen[bytes] | None = None
        self._fenced = False

    def start(self, sent_at: float) -> None:
        """Start the process; its lease runs from `sent_at` (before the write that took it)."""
        self._proc = subprocess.Popen(
            [sys.executable, __file__, repr(self.fence_s), str(os.getpgrp())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
        self.children.spawned.add(self._proc.pid)  # ours: the orphan reaper leaves it alone
        assert self._proc.stdin is not None and self._proc.stdout is not None
        os.set_blocking(self._proc.stdin.fileno(), False)
        os.set_blocking(self._proc.stdout.fileno(), False)
        asyncio.get_running_loop().add_reader(self._proc.stdout.fileno(), self._poll)
        self._fenced = False
        self._send(f"rejoined {sent_at!r}")

    @property
    def fenced(self) -> bool:
        """Whether the node's lease lapsed and it has not joined again since."""
        self._poll()
        return self._fenced

    def beat(self, sent_at: float) -> None:
        """A heartbeat sent at `sent_at` landed: the lease runs from then."""
        if not self.fenced:
            self._send(f"beat {sent_at!r}")

    def track(self, task_id: str, attempt: int) -> None:
        """This attempt may spawn processes from now on."""
        self._send(f"run {task_id} {attempt}")

    def untrack(self, task_id: str, attempt: int) -> None:
        """This attempt ended: nothing of it is left to kill."""
        self._send(f"done {task_id} {attempt}")

    def fence(self, why: str) -> None:
        """The server knows its lease is gone (declared lost): fence now."""
        self._send("fence")
        self._set_fenced(why)

    def rejoined(self, sent_at: float) -> None:
        """The node joined again (a new epoch, registered at `sent_at`): unfence. A watchdog
        that died is started again."""
        if self._proc is None or self._proc.poll() is not None:
            if self._proc is not None:
                self._stop_reading()
                self.children.spawned.discard(self._proc.pid)
            self.start(sent_at)
            return
        self._fenced = False
        self._send(f"rejoined {sent_at!r}")

    async def close(self) -> None:
        """Tell the process to go without killing anything, and wait for it."""
        proc = self._proc
        if proc is None:
            return
        self._send("bye")
        self._stop_reading()
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(proc.wait, CLOSE_WAIT_S)
        if proc.poll() is None:
            proc.kill()
            await asyncio.to_thread(proc.wait)
        self.children.spawned.discard(proc.pid)
        self._proc = None

    def _send(self, line: str) -> None:
        proc = self._proc
        if proc is None or proc.stdin is None or proc.stdin.closed:
            return
        try:
            os.write(proc.stdin.fileno(), line.encode() + b"\n")
        except OSError as exc:  # dead (EPIPE) or not reading (pipe full): not to be trusted
            self._set_fenced(f"the watchdog cannot be told: {exc}")

    def _poll(self) -> None:
        proc = self._proc
        if proc is None or proc.stdout is None:
            return
        try:
            data = os.read(proc.stdout.fileno(), 4096)
        except BlockingIOError:
            return
        except OSError as exc:
            data, why = b"", str(exc)
        else:
            why = "the watchdog ended"
        if FENCED in data:
            self._set_fenced("the lease was not renewed in time")
        elif not data:
            self._stop_reading()
            self._set_fenced(why)

    def _set_fenced(self, why: str) -> None:
        if not self._fenced:
            self._fenced = True
            self.on_fence(why)

    def _stop_reading(self) -> None:
        """Stop watching the process's output, and close our ends of its pipes."""
        proc = self._proc
        if proc is None or proc.stdout is None or proc.stdout.closed:
            return
        asyncio.get_running_loop().remove_reader(proc.stdout.fileno())
        proc.stdout.close()
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()


if __name__ == "__main__":  # in a session of its own: a ^C meant for the server is not for us
    main(float(sys.argv[1]), int(sys.argv[2]))
