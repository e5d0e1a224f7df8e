"""Orphans and lost runs: the processes a task left behind, found by its RR_TASK_ID, killed.

The server is a child subreaper, so a double-forked daemon that escaped its task's process group
is reparented to it; `Reaper.tend` (every flush slice) reaps the dead ones and kills the live ones
whose task no longer runs. After a crash, `kill_left_behind` finds a dead server's processes by
their environment.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from collections.abc import Container, Iterable

from remoterun.spawn import Children

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Adopt orphaned descendants (double-forked daemons), so that they can be found and killed.

    Without this, a process that escapes its task's process group with setsid() and a double
    fork is reparented to init and outlives the task. Linux only; False where not allowed.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def _children(children: Children) -> list[tuple[int, str]]:
    """(pid, state) of this process's adopted children: its direct children (one /proc file,
    not a scan of /proc) but the tasks' main processes, which their runs reap."""
    me = os.getpid()  # the main thread: it spawns every child, and adopts orphans
    try:
        with open(f"/proc/{me}/task/{me}/children", "rb") as fh:
            pids = [int(p) for p in fh.read().split()]
    except OSError:
        return []
    found = []
    for pid in pids:
        if pid in children.spawned:
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                found.append((pid, fh.read().rsplit(b")", 1)[1].split()[0].decode()))
        except OSError:
            continue
    return found


def kill_task_processes(task_id: str, pids: Iterable[int]) -> list[int]:
    """SIGKILL those of `pids` (and their groups) whose environment carries this RR_TASK_ID."""
    needle = f"RR_TASK_ID={task_id}".encode()
    killed = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                if needle not in fh.read().split(b"\0"):
                    continue
        except OSError:  # gone, or a zombie
            continue
        _kill_tree(pid)
        killed.append(pid)
    return killed


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and the group it leads, if it leads one (a setsid() daemon does)."""
    for kill in (os.killpg, os.kill):
        with contextlib.suppress(OSError):
            kill(pid, signal.SIGKILL)


def tend_orphans(children: Children, running: Container[str]) -> list[int]:
    """Reap adopted orphans that died; SIGKILL the live ones of tasks no longer running.

    An orphan is a process that outlived its parent and was reparented to us (we are a child
    subreaper): a double-forked daemon that escaped its task's process group, whose SIGKILL
    at the end of the run it missed. Its RR_TASK_ID says whose it is. Called every flush
    tick, one /proc file when there are none, so such a daemon dies within a tick of its
    task's end, not with every task's end paying for the look. Returns the pids killed.
    """
    killed = []
    for pid, state in _children(children):
        if state == "Z":
            if not children.spawning:  # else it might be the child just forked, not yet listed
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                env = fh.read().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        task = next((v[len(b"RR_TASK_ID="):].decode() for v in env
                     if v.startswith(b"RR_TASK_ID=")), None)
        if task is not None and task not in running:
            _kill_tree(pid)
            killed.append(pid)
    return killed


def kill_left_behind(task_id: str) -> list[int]:
    """SIGKILL whatever a dead server's run of this task left behind, found by RR_TASK_ID.

    Its processes run in sessions of their own, so they outlive the server; the environment
    marks them even when their pid was never recorded (a crash within a flush interval).
    """
    return kill_task_processes(task_id, (int(e.name) for e in os.scandir("/proc")
                                         if e.name.isdigit()))

