"""One attempt's sandbox as the run sees it: its Policy, its Launch, and SandboxError.

bwrap (its view of the filesystem: bwrap.py) is spawned with `--info-fd` and `--block-fd`:
it reports its namespace's first process, which `Launch.started` places into the task's
cgroups and gives its rlimits before it is let go to fork the script, so that nothing of the
task runs unbounded. It runs with `--new-session`, so signals go to the script's process group,
never to bwrap's monitor (which would die of a SIGTERM and take the script down without its
grace); a PTY task's script takes the terminal as its own controlling terminal inside
(`setsid --ctty`). Both bwrap and `docker run` report a death by signal N as exit 128 + N,
which the run reads back as -N.
"""

from __future__ import annotations

import asyncio
import os
import pwd
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from remoterun.config import ResourceLimits
from remoterun.isolation import bwrap, gvisor
from remoterun.isolation.limits import Quota, TaskCgroup, apply_rlimits


class SandboxError(Exception):
    """An attempt cannot be sandboxed as its policy says; the message says why."""


@dataclass(frozen=True)
class Policy:
    """How one script's attempts run: the config's `[sandbox]`/`[limits]`/`env` under its own."""

    mode: str  # bwrap, docker, gvisor or none ("auto" resolved)
    network: bool = True
    image: str = ""
    run_as: str = ""
    limits: ResourceLimits = ResourceLimits()
    env: Mapping[str, str] = field(default_factory=dict)
    seccomp: str = "default"  # bwrap's filter: default, off or a profile's absolute path


@dataclass(eq=False)
class Launch:
    """One attempt's sandbox: what to spawn, what to do once it is spawned and after it ends."""

    argv: list[str]
    env: dict[str, str]
    workdir: Path
    policy: Policy
    pass_fds: tuple[int, ...] = ()
    take_ctty: bool = True
    signal_exit_codes: bool = False
    typed_signals: bool = False
    cgroup: TaskCgroup | None = None
    quota: Quota | None = None  # its disk: the work folder and /tmp in one tmpfs
    pairs: list[tuple[int, int, int]] = field(default_factory=list)  # rlimits set after spawn
    container: str | None = None  # Docker's or gVisor's name of it
    state: Path | None = None  # gVisor's state folder (its runsc --root and bundles)
    user: pwd.struct_passwd | None = None  # run_as's
    _fds: dict[str, int] = field(default_factory=dict)  # ours of bwrap's info and block pipes
    _first: int | None = None  # bwrap's first process, once it reported it
    _forked: bool = False  # that process has forked the script

    @property
    def hooked(self) -> bool:
        """Whether the run calls `started` and `group_ready` (bwrap's and gVisor's)."""
        return bool(self.pass_fds) or self.state is not None

    async def started(self, pid: int) -> int | None:
        """bwrap is spawned: bound its first process and let it start the script; the group
        that signals go to (that process's). gVisor: its Sentry's (see gvisor.py)."""
        if self.state is not None:
            self._first = await _poll(lambda: gvisor.sandbox_pid(pid),
                                      gvisor.START_TIMEOUT_S) or None
            return self._first
        for name in ("info_w", "block_r", "seccomp"):  # the child's ends: it has them now
            if name in self._fds:
                os.close(self._fds.pop(name))
        first = await bwrap.read_child_pid(self._fds["info_r"])
        if first is None:  # bwrap failed (its error is in the output): let it end
            os.close(self._fds.pop("block_w"))
            return None
        block_w = self._fds.pop("block_w")
        try:  # a cgroupfs write and prlimit(2) calls: microseconds, no disk behind them
            if self.cgroup is not None:
                self.cgroup.place(first)
            apply_rlimits(first, self.pairs)
        finally:
            os.close(block_w)  # its read returns: it goes on and forks the script
        self._first = first
        return first

    def group_ready(self) -> bool:
        """Whether bwrap's first process has forked the script (or is gone): until then a
        signal would reach that process alone, which ignores it, so the run holds signals
        back until this says yes (a procfs read, no disk behind it)."""
        if self._forked or self._first is None:
            return True
        if self.state is not None and self.container is not None:
            self._forked = gvisor.running(self.state, self.container)
            return self._forked
        try:
            with open(f"/proc/{self._first}/task/{self._first}/children", "rb") as fh:
                self._forked = bool(fh.read().strip())
        except OSError:  # it is gone: nothing to wait for
            self._forked = True
        return self._forked


async def _poll(probe: Callable[[], int | None], timeout_s: float) -> int | None:
    """The first value `probe` gives that is not None, looked for every few ms up to
    `timeout_s` (None then)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    # Nothing signals a new grandchild: /proc is looked at again (a read of a few bytes).
    while (found := probe()) is None and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.005)
    return found
