"""What a run starts and how (RunSpec), and how it ended (RunResult)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

OnOutput = Callable[[str, bytes], None]  # (stream, bytes): each frame's worth of output


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
