"""Why a child could not start: the SpawnError a task records, its words, and the #! check."""

from __future__ import annotations

import errno
import os
from pathlib import Path

NOT_STARTED = 127  # the shell's "command not found": the task's exit code when it cannot start
TRANSIENT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE})


class SpawnError(Exception):
    """The process could not be started; the message says why, for the task's `error`.

    `transient`: the host ran short of descriptors (EMFILE, ENFILE), not the task at fault,
    so the scheduler tries the same attempt again later instead of failing it.
    """

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


def is_transient(exc: BaseException) -> bool:
    """Whether a spawn's failure is a shortage of descriptors that may pass."""
    return isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS


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
