"""`serve`'s re-exec: a clean environment block (no secret in /proc/<pid>/environ), glibc malloc."""

from __future__ import annotations

import os
import sys

# What `serve`'s re-exec keeps in its environment block: what the interpreter and the C library
# read as the new image starts (or that is no secret anyway). Everything else is carried out of
# the block and put back in os.environ only, so that /proc/<server>/environ, readable by any
# process of the server's user (a task under `mode = "none"`), holds no secret (issue 26).
BLOCK_ENV = ("PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TERM", "USER", "LOGNAME", "SHELL",
             "PWD", "TMPDIR", "GLIBC_TUNABLES")
BLOCK_ENV_PREFIXES = ("LC_", "PYTHON", "LD_", "MALLOC_")
CARRIED_FD_ENV = "REMOTERUN_CARRIED_ENV_FD"  # the descriptor the carried variables are read from


def _in_block(name: bytes) -> bool:
    text = os.fsdecode(name)
    return text in BLOCK_ENV or text.startswith(BLOCK_ENV_PREFIXES)


def reexec_serve() -> None:
    """Start `serve` again (same PID, same arguments) with a clean environment block, on
    glibc's malloc unless the caller chose an allocator; or, in the image so started, put the
    carried variables back. A no-op when nothing needs either.

    The kernel keeps a process's initial environment in /proc/<pid>/environ for its life:
    os.environ.pop changes only the C library's copy. So the variables outside BLOCK_ENV
    (REMOTERUN_SECRET_KEY, tokens, cloud keys) travel to the new image in an anonymous
    memory file (memfd) it reads and closes first thing; they never touch its block.

    On malloc: pymalloc frees a 1 MiB arena only when every block in it is free: after 2,000
    replaying clients left, ~5,000 small survivors (parser strings, log lines) kept 55 arenas
    with 31 MB of empty pools resident (idle +46 MB, bench replay). glibc's malloc_trim, which
    the server runs every 10 s, returns any free page: +22 MB.
    """
    if CARRIED_FD_ENV in os.environ:
        _restore_carried(os.environ.pop(CARRIED_FD_ENV))
        return
    if not hasattr(os, "execve") or not hasattr(os, "memfd_create"):
        return
    env = {k: v for k, v in os.environb.items() if _in_block(k)}
    carried = b"".join(k + b"=" + v + b"\0" for k, v in os.environb.items()
                       if not _in_block(k))
    if b"PYTHONMALLOC" not in env:
        env[b"PYTHONMALLOC"] = b"malloc"
    elif not carried:
        return
    if carried:
        fd = os.memfd_create("remoterun-env")  # close-on-exec until we say otherwise
        os.write(fd, carried)
        os.lseek(fd, 0, os.SEEK_SET)
        os.set_inheritable(fd, True)
        env[CARRIED_FD_ENV.encode()] = str(fd).encode()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def _restore_carried(fd_text: str) -> None:
    """Read the variables the re-exec carried (NUL-separated `KEY=value`) into os.environ."""
    try:
        fd = int(fd_text)
        with open(fd, "rb") as fh:
            data = fh.read()
    except (ValueError, OSError) as exc:
        raise SystemExit(f"remoterun: {CARRIED_FD_ENV} is the server's own; "
                         f"unset it ({exc})") from None
    for item in data.split(b"\0"):
        if item:
            key, _, value = item.partition(b"=")
            os.environb[key] = value

