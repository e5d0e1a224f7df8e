"""An attempt's resource limits: rlimits, cgroup v1 folders, a disk quota, and the name of a
limit it hit.

Rlimits bound each process: `cpu_seconds` (RLIMIT_CPU: SIGXCPU at the limit, SIGKILL a second
later), `file_bytes` (RLIMIT_FSIZE: SIGXFSZ, or EFBIG where the signal is ignored, as Python
does), `open_files` (RLIMIT_NOFILE: EMFILE). `memory_bytes` and `processes` bound the whole
task, which rlimits cannot: a memory cgroup (the kernel's OOM killer ends the task at the limit,
and its `oom_kill` count says so) and a pids cgroup (a fork past the limit fails with EAGAIN, and
`pids.events` counts the refusals). Those need a cgroup v1 hierarchy this server may write
(root); where there is none they fall back to RLIMIT_AS (an allocation past it fails: nothing
marks the task as having hit it) and RLIMIT_NPROC (per user, and never enforced for root), and
the server says so at start. Unsandboxed, the script joins its cgroups through a fixed `sh`
program (JOIN) that execs it. `disk_bytes` is a tmpfs of that size per attempt (Quota), holding
its work folder and /tmp: a write past it fails with ENOSPC, and a quota full at the end of a
failed task names the limit. Everything here blocks (files of /sys, /proc, mounts): call it
off the loop.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from remoterun.config import ResourceLimits

CGROUP_CONTROLLERS = ("pids", "memory")
RMDIR_TRIES = 50  # a killed task's processes leave their cgroup within a few ms


def rlimits(limits: ResourceLimits, cgroups: frozenset[str]) -> list[tuple[int, int, int]]:
    """(resource, soft, hard) for the limits that rlimits carry, given the cgroup controllers
    that carry memory and processes instead."""
    out = []
    if limits.cpu_seconds:
        out.append((resource.RLIMIT_CPU, limits.cpu_seconds, limits.cpu_seconds + 1))
    if limits.file_bytes:
        out.append((resource.RLIMIT_FSIZE, limits.file_bytes, limits.file_bytes))
    if limits.open_files:
        out.append((resource.RLIMIT_NOFILE, limits.open_files, limits.open_files))
    if limits.memory_bytes and "memory" not in cgroups:
        out.append((resource.RLIMIT_AS, limits.memory_bytes, limits.memory_bytes))
    if limits.processes and "pids" not in cgroups:
        out.append((resource.RLIMIT_NPROC, limits.processes, limits.processes))
    return out


_PRLIMIT_FLAGS = {resource.RLIMIT_CPU: "--cpu", resource.RLIMIT_FSIZE: "--fsize",
                  resource.RLIMIT_NOFILE: "--nofile", resource.RLIMIT_AS: "--as",
                  resource.RLIMIT_NPROC: "--nproc"}


def prlimit_argv(prlimit: str, pairs: list[tuple[int, int, int]]) -> list[str]:
    """util-linux `prlimit` setting these rlimits, then exec'ing what follows its argv."""
    return [prlimit, *(f"{_PRLIMIT_FLAGS[r]}={soft}:{hard}" for r, soft, hard in pairs), "--"]


def apply_rlimits(pid: int, pairs: list[tuple[int, int, int]]) -> None:
    """Set these rlimits on a running process (before it forks what they must bound)."""
    for res, soft, hard in pairs:
        resource.prlimit(pid, res, (soft, hard))


@dataclass
class Counters:
    """What a task's cgroups counted (OOM kills, forks refused at the processes limit), and
    whether its disk quota was full at its end."""

    oom_kills: int = 0
    forks_refused: int = 0
    disk_full: bool = False


class Cgroups:
    """This server's cgroup v1 folders (one per controller it may write), under its own."""

    def __init__(self, bases: dict[str, Path]):
        self.bases = bases

    @property
    def controllers(self) -> frozenset[str]:
        """The controllers available: some of "pids", "memory"."""
        return frozenset(self.bases)

    @classmethod
    def find(cls) -> Cgroups:
        """The controllers of a cgroup v1 hierarchy mounted here that this process may create
        folders in, each under the cgroup this server is in; none on cgroup v2 or without
        the right (v2 would need a delegated subtree: not supported yet)."""
        mounts: dict[str, Path] = {}
        with contextlib.suppress(OSError), open("/proc/self/mounts") as fh:
            for line in fh:
                _, where, kind, options = line.split()[:4]
                for name in CGROUP_CONTROLLERS:
                    if kind == "cgroup" and name in options.split(","):
                        mounts[name] = Path(where)
        own: dict[str, str] = {}
        with contextlib.suppress(OSError), open("/proc/self/cgroup") as fh:
            for line in fh:
                _, names, path = line.rstrip("\n").split(":", 2)
                for name in names.split(","):
                    own[name] = path
        bases = {}
        for name, mount in mounts.items():
            parent = mount / own.get(name, "/").lstrip("/")
            _sweep(parent)
            base = parent / f"remoterun-{os.getpid()}"
            try:
                base.mkdir(exist_ok=True)
            except OSError:
                continue
            bases[name] = base
        return cls(bases)

    def create(self, name: str, limits: ResourceLimits) -> TaskCgroup | None:
        """A task's folders with its limits written, for the controllers its limits need."""
        paths = {}
        wanted = {"pids": limits.processes, "memory": limits.memory_bytes}
        try:
            for controller, value in wanted.items():
                if value and controller in self.bases:
                    path = self.bases[controller] / name
                    path.parent.mkdir(exist_ok=True)  # another app of this process removed it
                    path.mkdir()
                    paths[controller] = path
                    if controller == "pids":
                        (path / "pids.max").write_text(str(value))
                    else:
                        (path / "memory.limit_in_bytes").write_text(str(value))
                        with contextlib.suppress(OSError):  # no swap past it either
                            (path / "memory.memsw.limit_in_bytes").write_text(str(value))
        except OSError:
            TaskCgroup(paths).close()
            raise
        return TaskCgroup(paths) if paths else None

    def close(self) -> None:
        """Remove this server's folders (its tasks' are gone by now)."""
        for base in self.bases.values():
            with contextlib.suppress(OSError):
                base.rmdir()


def _sweep(parent: Path) -> None:
    """Remove the folders a dead server left (remoterun-<its pid>), with its tasks' inside."""
    with contextlib.suppress(OSError):
        for old in parent.glob("remoterun-*"):
            pid = old.name.removeprefix("remoterun-")
            if not pid.isdigit() or Path(f"/proc/{pid}").exists():
                continue
            for task in [p for p in old.iterdir() if p.is_dir()]:
                TaskCgroup({"": task}).close()
            with contextlib.suppress(OSError):
                old.rmdir()


# Unsandboxed, nothing stands between the server's spawn and the script to place it in its
# cgroups (bwrap's --block-fd does it for bwrap): this fixed program writes its own pid into
# each cgroup.procs named before `--`, then execs what follows, so the script and all it forks
# start inside. A write that fails ends it with 125 and the shell's message on stderr.
JOIN = ('for f; do shift; [ "$f" = -- ] && break; echo $$ > "$f" || exit 125; done; '
        'exec "$@"')


class TaskCgroup:
    """One attempt's cgroup folders."""

    def __init__(self, paths: dict[str, Path]):
        self.paths = paths

    def join_argv(self, sh: str) -> list[str]:
        """The argv prefix that joins these folders, then execs what follows it."""
        procs = [str(path / "cgroup.procs") for path in self.paths.values()]
        return [sh, "-c", JOIN, "sh", *procs, "--"]

    def place(self, pid: int) -> None:
        """Move a process (before it forks the task's others) into every folder."""
        for path in self.paths.values():
            (path / "cgroup.procs").write_text(str(pid))

    def close(self) -> Counters:
        """Read the counters, kill what is left, remove the folders."""
        counters = Counters()
        with contextlib.suppress(OSError, ValueError):
            if "memory" in self.paths:
                for line in (self.paths["memory"] / "memory.oom_control").read_text().split("\n"):
                    if line.startswith("oom_kill "):
                        counters.oom_kills = int(line.split()[1])
        with contextlib.suppress(OSError, ValueError, IndexError):
            if "pids" in self.paths:
                counters.forks_refused = int(
                    (self.paths["pids"] / "pids.events").read_text().split()[1])
        for path in self.paths.values():
            for _ in range(RMDIR_TRIES):
                with contextlib.suppress(OSError, ValueError):
                    for pid in (path / "cgroup.procs").read_text().split():
                        with contextlib.suppress(OSError):
                            os.kill(int(pid), signal.SIGKILL)
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.002)
        return counters


MS_NOSUID, MS_NODEV, MNT_DETACH = 2, 4, 2
QUOTA_SOURCE = "remoterun-"  # + the server's pid: a quota mount's source, whose it is


def _libc_call(name: str, *args: object) -> None:
    """mount(2) or umount2(2) through libc (Python has neither); OSError as they fail."""
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number), str(args[1] if name == "mount" else args[0]))


class Quota:
    """One attempt's disk: a tmpfs of `disk_bytes` the server mounts on an empty folder,
    holding `work` (its work folder), `tmp` (its /tmp in bwrap and Docker, TMPDIR
    unsandboxed) and `run` (bwrap's /run), so that together they meet ENOSPC at the limit; its
    bytes are memory, never the host's disk. Blocking (mount, statvfs): call it off the loop."""

    def __init__(self, root: Path):
        self.root = root
        self.work = root / "work"
        self.tmp = root / "tmp"
        self.run = root / "run"

    @classmethod
    def mount(cls, root: Path, size: int, uid: int = 0, gid: int = 0) -> Quota:
        """Mount the tmpfs on `root` (an empty folder) and make its two folders. Inodes are
        bounded too (one per KiB: an empty file costs kernel memory, not space)."""
        options = f"size={size},nr_inodes={max(1024, size // 1024)},mode=0711"
        _libc_call("mount", f"{QUOTA_SOURCE}{os.getpid()}".encode(), os.fsencode(root),
                   b"tmpfs", MS_NOSUID | MS_NODEV, options.encode())
        quota = cls(root)
        try:
            quota.work.mkdir(mode=0o700)
            quota.run.mkdir(mode=0o755)
            for path in (quota.work, quota.run):
                os.chown(path, uid, gid)
            quota.tmp.mkdir()
            os.chmod(quota.tmp, 0o1777)
        except OSError:
            quota.close()
            raise
        return quota

    def full(self) -> bool:
        """Whether no block or no inode is left: a write has met ENOSPC, or the next would."""
        with contextlib.suppress(OSError):
            st = os.statvfs(self.root)
            return st.f_bavail == 0 or st.f_favail == 0
        return False

    def close(self) -> bool:
        """Unmount (lazily: a process that escaped may still hold a file) and remove the
        folder; whether it was full."""
        full = self.full()
        with contextlib.suppress(OSError):
            _libc_call("umount2", os.fsencode(self.root), MNT_DETACH)
        with contextlib.suppress(OSError):
            self.root.rmdir()
        return full

    @staticmethod
    def usable(work_root: Path) -> bool:
        """Whether this server may mount quotas here (root, with CAP_SYS_ADMIN): one tried;
        the quotas a dead server left under `work_root` are removed first."""
        _sweep_quotas(work_root)
        if os.geteuid() != 0:
            return False
        probe = Path(tempfile.mkdtemp(prefix="quota-probe-", dir=work_root))
        try:
            Quota.mount(probe, 1 << 20).close()
        except OSError:
            with contextlib.suppress(OSError):
                probe.rmdir()
            return False
        return True


def _sweep_quotas(work_root: Path) -> None:
    """Unmount the quotas under `work_root` whose server (the pid in their source) is gone."""
    with contextlib.suppress(OSError), open("/proc/self/mounts") as fh:
        mounts = [line.split()[:2] for line in fh]
    for source, where in mounts:
        pid = source.removeprefix(QUOTA_SOURCE)
        path = Path(where.replace("\\040", " "))
        if (source.startswith(QUOTA_SOURCE) and pid.isdigit() and path.is_relative_to(work_root)
                and not Path(f"/proc/{pid}").exists()):
            Quota(path).close()


def limit_error(limits: ResourceLimits, exit_code: int | None, counters: Counters,
                in_container: bool = False) -> str | None:
    """The `error` of a task that ended by hitting one of its limits; None if none is known.

    Only what is certain is named: a death by SIGXCPU or SIGXFSZ with that limit set, an OOM
    kill counted by the task's memory cgroup, a disk quota left without a free block or inode,
    a fork refused by its pids cgroup (when the task then failed). In a container, a SIGKILL
    nobody here sent with a memory limit set is the container's OOM killer's, most likely, and
    is said so.
    """
    if exit_code is None or exit_code == 0:
        return None
    if exit_code == -signal.SIGXCPU and limits.cpu_seconds:
        return f"killed by SIGXCPU: cpu_seconds limit of {limits.cpu_seconds} s"
    if exit_code == -signal.SIGXFSZ and limits.file_bytes:
        return f"killed by SIGXFSZ: file_bytes limit of {limits.file_bytes} bytes"
    if counters.oom_kills and limits.memory_bytes:
        return (f"killed by the out-of-memory killer: memory_bytes limit of "
                f"{limits.memory_bytes} bytes")
    if in_container and exit_code == -signal.SIGKILL and limits.memory_bytes:
        return (f"killed by SIGKILL with a memory_bytes limit of {limits.memory_bytes} bytes: "
                f"the container's out-of-memory killer, most likely")
    if counters.disk_full and limits.disk_bytes:
        return f"failed with no space left at the disk_bytes limit of {limits.disk_bytes} bytes"
    if counters.forks_refused and limits.processes:
        return (f"failed after {counters.forks_refused} new process(es) were refused at the "
                f"processes limit of {limits.processes}")
    return None
