"""bubblewrap's view of the filesystem for a task, and reading its `--info-fd` report.

The system is bound read-only (`--ro-bind / /`, every mount under it read-only too), with a
fresh `/dev`, `/proc` (its `sys` and `sysrq-trigger` covered read-only: bwrap leaves them
writable to uid 0), `/tmp` and `/run` (sockets such as Docker's live there). The server's own
folders are then hidden by read-only tmpfs mounts, the scripts folder bound back read-only (a
hidden folder may hold it: the config's, say), the task's work folder bound writable, and what
must stay hidden inside those binds hidden again. Order matters: bwrap applies the options in
turn, and a bind needs its mount point made before a folder is remounted read-only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path

INFO_TIMEOUT_S = 30.0  # bwrap reports its child within milliseconds; a hung one is not waited on
# Folders hidden file by file, never as a whole: hiding them would hide the system.
SYSTEM_DIRS = frozenset({"/", "/usr", "/usr/local", "/etc", "/var", "/var/lib", "/opt", "/srv",
                         "/home", "/root", "/tmp", "/mnt", "/media", "/run"})
PROBE_ARGS = ["--unshare-pid", "--die-with-parent", "--new-session", "--ro-bind", "/", "/",
              "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]


def hidden(archive: Path, work_root: Path, *files: Path | None
           ) -> tuple[list[Path], list[Path]]:
    """The server's folders and files no task may see (blocking: it resolves them): the
    archive, the work folders, and for the database and the config their folder (or the files
    alone, with the database's -wal, -shm and -journal, in a system folder), TLS files."""
    dirs = [archive.resolve(), work_root.resolve()]
    alone: list[Path] = []
    db, config, *others = files
    for path in (db, config):
        if path is None:
            continue
        path = path.resolve()
        if str(path.parent) in SYSTEM_DIRS:
            alone += [path, *(path.parent / (path.name + x) for x in ("-wal", "-shm", "-journal"))]
        else:
            dirs.append(path.parent)
    alone += [p.resolve() for p in others if p is not None]
    return sorted(set(dirs)), sorted(set(alone))


def filesystem(scripts: Path, dirs: list[Path], files: list[Path]
               ) -> tuple[list[str], list[str]]:
    """The mounts before the work folder's bind, and after it (blocking: it looks at files)."""
    head = ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
            "--ro-bind", "/proc/sys", "/proc/sys",
            "--ro-bind-try", "/proc/sysrq-trigger", "/proc/sysrq-trigger",
            "--tmpfs", "/tmp", "--tmpfs", "/run"]
    resolv = Path("/etc/resolv.conf").resolve()
    if resolv.is_relative_to("/run") and resolv.is_file():  # systemd-resolved's stub
        head += ["--ro-bind", str(resolv), str(resolv)]

    # A path needs a mount of its own where it is still visible: not under /tmp (a fresh
    # tmpfs), not under a hidden folder; and again after the scripts' bind if under it.
    def visible(path: Path, again: bool) -> bool:
        if again:
            return path.is_relative_to(scripts)
        return not path.is_relative_to("/tmp") and not any(
            path != d and path.is_relative_to(d) for d in dirs)

    tail: list[str] = []
    for mounts, again in ((head, False), (tail, True)):
        for folder in dirs:
            if visible(folder, again):
                mounts += ["--tmpfs", str(folder)]
        for file in files:
            if visible(file, again) and file.exists():
                mounts += ["--ro-bind", os.devnull, str(file)]
        if not again:
            head += ["--ro-bind", str(scripts), str(scripts)]
    for folder in dirs:  # last: the binds above made their mount points in them
        if visible(folder, False) or visible(folder, True):
            tail += ["--remount-ro", str(folder)]
    return head, tail


def in_quota(head: list[str], tmp: str, run: str) -> list[str]:
    """The mounts before the work folder's bind with /tmp and /run bound from these folders
    (of the attempt's disk quota) instead of fresh tmpfs as large as half the memory."""
    out = list(head)
    for source, where in ((tmp, "/tmp"), (run, "/run")):
        at = next(i for i in range(len(out) - 1) if out[i:i + 2] == ["--tmpfs", where])
        out[at:at + 2] = ["--bind", source, where]
    return out


async def read_child_pid(fd: int) -> int | None:
    """bwrap's `--info-fd` report (a non-blocking pipe), read to its end: the pid of its
    namespace's first process (None if bwrap failed before it, and said why on stderr)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    data = bytearray()

    def readable() -> None:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        data.extend(chunk)
        if not chunk and not done.done():
            done.set_result(None)

    loop.add_reader(fd, readable)
    try:
        async with asyncio.timeout(INFO_TIMEOUT_S):
            await done
    except TimeoutError:
        return None
    finally:
        loop.remove_reader(fd)
    with contextlib.suppress(ValueError, TypeError):
        pid = json.loads(data)["child-pid"]
        return pid if isinstance(pid, int) and pid > 0 else None
    return None
