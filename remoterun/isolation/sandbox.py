"""Isolation of a task's processes: bwrap, Docker or gVisor around the script, its environment.

`[sandbox] mode` (and a script's `sandbox` table) picks how an attempt runs: `bwrap` (the
system read-only, a private /tmp and /run, the scripts folder read-only, a writable work
folder of its own, the server's database, archive, config and work folders not there at all,
its own PID namespace: every process of the task ends with it), `docker` (`docker run --rm` of
`image`, the scripts folder mounted read-only), or `none` (the server's own view, rlimits and
cgroups only). `auto` is bwrap where `bwrap` works here, probed once at start. With
`disk_bytes` the work folder is in a tmpfs of that size (limits.Quota) whose `tmp` folder is
bwrap's and Docker's /tmp (bwrap's /run too; Docker's own filesystem is then read-only) and
mode none's TMPDIR. Whatever the mode, the environment is the allow-list (PATH, HOME, LANG,
LC_*, TZ) plus `[engine] env`, the script's metadata `env` and the task's RR_* variables,
never the server's own.

bwrap (its view of the filesystem: bwrap.py) is spawned with `--info-fd` and `--block-fd`:
it reports its namespace's first process, which is placed into the task's cgroups and given
its rlimits before it is let go to fork the script, so that nothing of the task runs
unbounded. It runs with `--new-session`, so signals go to the script's process group, never
to bwrap's monitor (which would die of a SIGTERM and take the script down without its
grace); a PTY task's script takes the terminal as its own controlling terminal inside
(`setsid --ctty`). Both bwrap and `docker run` report a death by
signal N as exit 128 + N, which the run reads back as -N.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from remoterun.config import ResourceLimits, SandboxConfig, Settings
from remoterun.isolation import bwrap, docker, gvisor, seccomp
from remoterun.isolation.limits import (
    Cgroups,
    Counters,
    Quota,
    TaskCgroup,
    apply_rlimits,
    limit_error,
    prlimit_argv,
    rlimits,
)
from remoterun.spawn import Children, run_helper

log = structlog.get_logger(__name__)
ALLOWED_ENV = ("PATH", "HOME", "LANG", "TZ")  # and every LC_*
def allowed_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables of the server's environment a task may see."""
    return {k: v for k, v in environ.items() if k in ALLOWED_ENV or k.startswith("LC_")}


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


class Sandbox:
    """The server's isolation: probed once at start, then one Launch per attempt."""

    def __init__(self, settings: Settings, children: Children, secret_files: tuple[Path, ...] = ()):
        self.settings = settings
        self.children = children
        self.secret_files = secret_files  # hidden too, wherever they are (the secret key)
        self.base_env = {**allowed_env(os.environ), **settings.env}
        self.bwrap: str | None = None  # its path, once it is known to work here
        self.bwrap_network_off = False  # --unshare-net works too
        self.docker: str | None = None  # the programs' paths, found at start
        self.runsc: str | None = None
        self.gvisor_state = Path()  # remoterun-gvisor beside the database, resolved at start
        self._hidden: tuple[list[Path], list[Path]] = ([], [])
        self.prlimit: str | None = None
        self.setsid = "setsid"
        self.sh = "/bin/sh"
        self.setpriv: str | None = None
        self.cgroups = Cgroups({})
        self.quotas = False  # disk_bytes can be enforced here (a tmpfs per attempt)
        self.auto = "none"
        self.work_root = settings.work_dir or Path("remoterun-work")  # in the temp folder
        self.scripts = settings.scripts_dir  # resolved at start
        self._head: list[str] = []  # bwrap's filesystem before the work folder, and after
        self._tail: list[str] = []
        self._null = -1
        self.filters = seccomp.Filters()  # bwrap's seccomp programs, one per profile
        self._config_dir = (settings.config_path.parent if settings.config_path is not None
                            else Path.cwd())  # a profile's relative path starts there

    async def start(self) -> None:
        """Probe bubblewrap and the cgroups (in a thread), and say which mode is in force."""
        await asyncio.to_thread(self._probe)
        mode = self.settings.sandbox.mode
        resolved = self.auto if mode == "auto" else mode
        details: dict[str, Any] = dict(mode=resolved, configured=mode,
                                       cgroups=sorted(self.cgroups.controllers),
                                       network_off=self.bwrap_network_off,
                                       seccomp=self.settings.sandbox.seccomp
                                       if resolved == "bwrap" else "not applied")
        if resolved == "none":
            log.warning("sandbox_mode", **details, detail="tasks run unsandboxed: they see "
                        "what the server's user sees (install bubblewrap, or set [sandbox])")
        else:
            log.info("sandbox_mode", **details)
        if resolved == "bwrap" and self.bwrap is None:
            log.error("sandbox_unavailable", mode="bwrap", detail="bwrap does not work here: "
                      "bwrap tasks fail at start")
        if (self.filters.unavailable and resolved == "bwrap"
                and self.settings.sandbox.seccomp != seccomp.OFF):
            log.error("seccomp_unavailable", detail=self.filters.unavailable + ": bwrap tasks "
                      "with a seccomp filter fail at start")
        limits = self.settings.limits
        if os.geteuid() == 0 and limits.processes and "pids" not in self.cgroups.controllers:
            log.warning("limit_not_enforced", limit="processes",
                        detail="no pids cgroup, and RLIMIT_NPROC does not bound root")
        if limits.memory_bytes and "memory" not in self.cgroups.controllers:
            log.warning("limit_weakened", limit="memory_bytes",
                        detail="no writable memory cgroup (v1): RLIMIT_AS per process, whose "
                        "hit fails an allocation and is not named")
        if limits.disk_bytes and not self.quotas:
            log.warning("limit_not_enforced", limit="disk_bytes",
                        detail="the server cannot mount a tmpfs here (it needs root)")

    def _probe(self) -> None:
        self._null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        if self.settings.work_dir is None:  # gettempdir() tries candidate folders: not on the loop
            self.work_root = Path(tempfile.gettempdir()) / "remoterun-work"
        # Traversable but not listable: a run_as user reaches its own folder (0700, its own)
        # by a name it is given, and lists nobody else's.
        self.work_root.mkdir(mode=0o711, parents=True, exist_ok=True)
        if self.work_root.stat().st_uid == os.geteuid():  # found open (it existed): closed
            os.chmod(self.work_root, 0o711)
        else:
            log.warning("work_root_not_ours", path=str(self.work_root),
                        hint="another user owns it: set paths.work to a folder of the server's")
        self.cgroups = Cgroups.find()
        self.quotas = Quota.usable(self.work_root)
        self.docker, self.prlimit, self.setpriv = map(shutil.which, ("docker", "prlimit",
                                                                     "setpriv"))
        self.setsid = shutil.which("setsid") or "setsid"
        self.sh = shutil.which("sh") or "/bin/sh"
        self.scripts = self.settings.scripts_dir.resolve()
        path = shutil.which("bwrap")
        if path is not None and _works([path, *bwrap.PROBE_ARGS, "true"]):
            self.bwrap = path
            self.auto = "bwrap"
            self.bwrap_network_off = _works([path, "--unshare-net", *bwrap.PROBE_ARGS, "true"])
        s = self.settings
        dirs, files = bwrap.hidden(s.archive_dir, self.work_root, s.db_path, s.config_path,
                                   s.tls_cert, s.tls_key, *self.secret_files)
        self.gvisor_state = s.db_path.resolve().parent / "remoterun-gvisor"
        dirs = sorted({*dirs, self.gvisor_state})
        self._hidden = (dirs, files)
        self.runsc = shutil.which("runsc")
        if self.runsc is not None:
            gvisor.prepare_state(self.runsc, self.gvisor_state)
        self._head, self._tail = bwrap.filesystem(self.scripts, dirs, files)
        self.filters.build(self._seccomp_settings())

    def _seccomp_settings(self) -> list[tuple[str, str]]:
        """Every seccomp setting config.toml makes, resolved (a sidecar may name no other)."""
        found = [("sandbox.seccomp", self.settings.sandbox.seccomp),
                 ("sidecars", seccomp.DEFAULT)]
        for name, meta in self.settings.scripts.items():
            box = meta.get("sandbox")
            if isinstance(box, dict) and isinstance(box.get("seccomp"), str):
                found.append((f"scripts.{name!r}.sandbox.seccomp", box["seccomp"]))
        return [(where, seccomp.resolve(value, self._config_dir)) for where, value in found]

    async def close(self) -> None:
        """Remove the server's cgroup folders; close what start() opened."""
        await asyncio.to_thread(self.cgroups.close)
        if self._null >= 0:
            os.close(self._null)
            self._null = -1

    def policy(self, sandbox: Mapping[str, Any], limits: Mapping[str, int],
               env: Mapping[str, str]) -> Policy:
        """A script's policy from its metadata's `sandbox`, `limits` and `env` tables."""
        config: SandboxConfig = self.settings.sandbox
        mode = sandbox.get("mode", config.mode)
        merged = ResourceLimits(**limits).over(self.settings.limits)  # its 0 lifts the config's
        merged = ResourceLimits(**{k: v or None for k, v in vars(merged).items()})
        return Policy(mode=self.auto if mode == "auto" else mode,
                      network=sandbox.get("network", config.network),
                      image=sandbox.get("image", config.image),
                      run_as=sandbox.get("run_as", config.run_as),
                      limits=merged, env=env,
                      seccomp=seccomp.resolve(sandbox.get("seccomp", config.seccomp),
                                              self._config_dir))

    async def work_folders(self) -> list[tuple[Path, str, int]]:
        """The attempt work folders under the work root, off the loop (see `work_folders`)."""
        return await asyncio.to_thread(work_folders, self.work_root)

    async def remove_work_folders(self, folders: Sequence[Path]) -> int:
        """Remove these work folders off the loop; how many went."""
        return await asyncio.to_thread(remove_work_folders, folders)

    # One attempt -----------------------------------------------------------------------------

    async def prepare(self, policy: Policy, argv: Sequence[str], env: Mapping[str, str],
                      cwd: Path, pty: bool, name: str) -> Launch:
        """The launch of one attempt (`name`: task id and attempt): its work folder and cgroups
        made, its argv and environment built. SandboxError when its mode cannot run here."""
        if policy.mode == "bwrap" and self.bwrap is None:
            raise SandboxError("the script's sandbox is bwrap, which does not work on this "
                               "server")
        if policy.mode == "bwrap" and not policy.network and not self.bwrap_network_off:
            raise SandboxError("network = false needs a network namespace, which bwrap "
                               "cannot create on this server")
        if policy.mode == "gvisor" and (self.runsc is None or os.geteuid() != 0):
            raise SandboxError("the script's sandbox is gvisor: it needs runsc installed and "
                               "the server running as root")
        if policy.mode == "docker" and (self.docker is None or not policy.image):
            raise SandboxError("the script's sandbox is docker: it needs the docker command "
                               "and an image (sandbox.image)")
        if (policy.run_as or (policy.mode != "docker" and self._wants_cgroup(policy.limits))
                or self._wants_quota(policy.limits)):
            launch = await asyncio.to_thread(self._make, name, policy, argv, env)
        else:
            # The common case, here on the loop: a 4-byte read of the script, one mkdir in
            # the work root (the temp folder): tens of microseconds, where a hop to a worker
            # thread and back cost ~15 ms per attempt beside 8 busy clients (GIL hand-overs,
            # bench `trivial`). A user's lookup, cgroup folders and mounts stay on a thread.
            launch = self._make(name, policy, argv, env)
        user = launch.user
        try:
            if policy.mode == "bwrap":
                self._bwrap(launch, cwd, pty, user)
            elif policy.mode == "docker":
                self._docker(launch, cwd, pty, name)
            elif policy.mode == "gvisor":  # its bundle written: on a thread
                await asyncio.to_thread(self._gvisor, launch, cwd, pty, name)
            else:
                if launch.quota is not None:  # /tmp stays the host's: its variable points in
                    launch.env["TMPDIR"] = str(launch.quota.tmp)
                self._unsandboxed(launch, user)
        except BaseException:
            await self.finish(launch, None, None)
            raise
        return launch

    @staticmethod
    def _needs(path: str | None, program: str) -> str:
        if path is None:
            raise SandboxError(f"util-linux {program} is not installed, and this task's "
                               f"limits or run_as need it")
        return path

    def _wants_cgroup(self, limits: ResourceLimits) -> bool:
        return bool((limits.processes and "pids" in self.cgroups.bases)
                    or (limits.memory_bytes and "memory" in self.cgroups.bases))

    def _wants_quota(self, limits: ResourceLimits) -> bool:
        return bool(limits.disk_bytes and self.quotas)

    def _make(self, name: str, policy: Policy, argv: Sequence[str], env: Mapping[str, str]
              ) -> Launch:
        """The blocking part of a launch: the checks, the work folder (in its disk quota),
        the cgroups, the environment."""
        _check_exec(argv[0])
        user = _user(policy.run_as) if policy.run_as else None
        uid, gid = (user.pw_uid, user.pw_gid) if user is not None else (0, 0)
        workdir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.work_root))
        launch = Launch(list(argv), {}, workdir, policy, user=user)
        try:
            if self._wants_quota(policy.limits):
                assert policy.limits.disk_bytes is not None
                try:
                    launch.quota = Quota.mount(workdir, policy.limits.disk_bytes, uid, gid)
                except OSError as exc:
                    raise SandboxError(f"its disk quota could not be mounted: {exc}") from exc
                launch.workdir = launch.quota.work
            elif user is not None:
                os.chown(workdir, uid, gid)
            if policy.mode == "gvisor":  # its processes are gVisor's own, not the script's
                launch.cgroup = self.cgroups.create(
                    name, dataclasses.replace(policy.limits, processes=None))
            elif policy.mode != "docker":  # Docker's own cgroups bound its containers
                launch.cgroup = self.cgroups.create(name, policy.limits)
        except (OSError, SandboxError):
            _clean(launch)
            raise
        launch.env = {**self.base_env, **policy.env, **env, "RR_WORKDIR": str(launch.workdir)}
        return launch

    def _bwrap(self, launch: Launch, cwd: Path, pty: bool,
               user: pwd.struct_passwd | None) -> None:
        assert self.bwrap is not None
        policy, wd = launch.policy, str(launch.workdir)
        launch.env["HOME"] = wd
        launch.pairs = rlimits(policy.limits, frozenset(launch.cgroup.paths)
                               if launch.cgroup is not None else frozenset())
        info_r, info_w = os.pipe()
        block_r, block_w = os.pipe()
        launch._fds = dict(info_r=info_r, info_w=info_w, block_r=block_r, block_w=block_w)
        os.set_blocking(info_r, False)
        argv = [self.bwrap, "--die-with-parent", "--unshare-pid", "--unshare-ipc",
                "--new-session", "--cap-drop", "ALL", "--info-fd", str(info_w),
                "--block-fd", str(block_r)]
        if not policy.network:
            argv.append("--unshare-net")
        argv += self._seccomp(launch)
        head = self._head
        if launch.quota is not None:  # /tmp and /run: folders of its quota, not tmpfs of their own
            head = bwrap.in_quota(head, str(launch.quota.tmp), str(launch.quota.run))
        argv += [*head, "--bind", wd, wd, *self._outside(launch.argv[0], "--ro-bind"),
                 *self._tail, "--chdir", str(cwd), "--"]
        if pty:  # the terminal becomes the script's, in a session of its own inside
            argv += [self.setsid, "--ctty"]
        launch.argv = [*argv, *launch.argv]
        if user is not None:  # bwrap then runs unprivileged, in a user namespace
            launch.argv = [*_setpriv(self._needs(self.setpriv, "setpriv"), user),
                           *launch.argv]
        launch.pass_fds = tuple(launch._fds[n] for n in ("info_w", "block_r", "seccomp")
                                if n in launch._fds)
        launch.take_ctty = False
        launch.signal_exit_codes = True

    def _seccomp(self, launch: Launch) -> list[str]:
        """bwrap's options loading the policy's filter just before it execs the script (the
        program on a pipe of the launch's); none when it is off."""
        try:
            program = self.filters.program(launch.policy.seccomp)
        except KeyError:
            raise SandboxError(self.filters.unavailable or f"its seccomp profile "
                               f"{launch.policy.seccomp!r} was not loaded at start") from None
        if program is None:
            return []
        launch._fds["seccomp"] = seccomp.pipe_of(program)
        return ["--seccomp", str(launch._fds["seccomp"])]

    def _unsandboxed(self, launch: Launch, user: pwd.struct_passwd | None) -> None:
        """Mode none: the script behind its rlimits (prlimit), its user (setpriv) and, first,
        the join of its cgroups, all made by exec'ing one program after the other."""
        cgroup = launch.cgroup
        pairs = rlimits(launch.policy.limits,
                        frozenset(cgroup.paths) if cgroup is not None else frozenset())
        if pairs:
            launch.argv = [*prlimit_argv(self._needs(self.prlimit, "prlimit"), pairs),
                           *launch.argv]
        if user is not None:
            launch.argv = [*_setpriv(self._needs(self.setpriv, "setpriv"), user), *launch.argv]
        if cgroup is not None:
            launch.argv = [*cgroup.join_argv(self.sh), *launch.argv]

    def _docker(self, launch: Launch, cwd: Path, pty: bool, name: str) -> None:
        assert self.docker is not None
        policy, wd = launch.policy, str(launch.workdir)
        launch.env["HOME"] = wd
        launch.container = f"rr-{name}"
        launch.argv = docker.run_argv(
            self.docker, launch.container, policy.image, launch.argv, env=launch.env,
            scripts=str(self.scripts), workdir=wd, cwd=str(cwd), pty=pty,
            program=self._outside(launch.argv[0], "-v"),
            network=policy.network, user=policy.run_as, limits=policy.limits,
            tmp=str(launch.quota.tmp) if launch.quota is not None else "")
        launch.env.update(docker.client_env(os.environ))
        launch.signal_exit_codes = True

    def _gvisor(self, launch: Launch, cwd: Path, pty: bool, name: str) -> None:
        """`runsc run` of a bundle written now (blocking); the task's cgroups joined first
        (they bound the Sentry, which holds all of the script's memory)."""
        assert self.runsc is not None
        policy, wd, user, quota = launch.policy, str(launch.workdir), launch.user, launch.quota
        launch.env["HOME"] = wd
        cgroup = launch.cgroup
        program = None if Path(launch.argv[0]).is_relative_to(self.scripts) else launch.argv[0]
        mounts = gvisor.mounts(self.scripts, wd, *self._hidden, program,
                               tmp=str(quota.tmp) if quota else "",
                               run=str(quota.run) if quota else "")
        ids = (user.pw_uid, user.pw_gid, os.getgrouplist(user.pw_name, user.pw_gid)) \
            if user is not None else (0, 0, ())
        config = gvisor.spec(launch.argv, launch.env, str(cwd), pty=pty, mounts=mounts,
                             rlimits=rlimits(policy.limits, frozenset(cgroup.paths)
                                             if cgroup is not None else frozenset()),
                             network=policy.network, user=ids)
        launch.container, launch.state = f"{gvisor.PREFIX}{name}", self.gvisor_state
        gvisor.write_bundle(self.gvisor_state, launch.container, config)
        launch.argv = gvisor.run_argv(self.runsc, self.gvisor_state, launch.container,
                                      policy.network)
        if cgroup is not None:
            launch.argv = [*cgroup.join_argv(self.sh), *launch.argv]
        # runsc's own environment: the script's is in the spec.
        launch.env = {"PATH": os.environ.get("PATH", os.defpath)}
        launch.take_ctty = False  # nor does the Sentry's: typed ^C is the run's (typed_signals)
        launch.typed_signals = pty
        launch.signal_exit_codes = True

    def _outside(self, program: str, flag: str) -> list[str]:
        """The mount that shows a program outside the scripts folder (an integrity check's
        private copy, under the database's hidden folder) read-only at its own path."""
        if Path(program).is_relative_to(self.scripts):
            return []
        if flag == "-v":
            return [flag, f"{program}:{program}:ro"]
        return [flag, program, program]

    async def finish(self, launch: Launch, exit_code: int | None, stopped: str | None
                     ) -> str | None:
        """Undo an attempt's launch (its container, cgroups, work folder); the limit its run
        hit, named for the task's error, if it is known to have hit one."""
        for fd in launch._fds.values():
            os.close(fd)
        launch._fds.clear()
        if launch.state is not None and launch.container is not None:
            await self._gvisor_finish(launch.state, launch.container)
        elif launch.container is not None and (exit_code is None or stopped or exit_code < 0):
            assert self.docker is not None  # a killed client leaves its container running
            await docker.remove(self.docker, launch.container, self.children, self._null)
        counters = None
        if launch.cgroup is None and launch.quota is None:  # an empty work folder: one rmdir
            with contextlib.suppress(OSError):
                os.rmdir(launch.workdir)
                counters = Counters()
        if counters is None:  # what the task left there, and its cgroups: on a thread
            counters = await asyncio.to_thread(_clean, launch)
        if stopped is not None:
            return None  # a timeout or a stop is what the task's error says
        return limit_error(launch.policy.limits, exit_code, counters,
                           in_container=launch.container is not None)

    async def _gvisor_finish(self, state: Path, container: str) -> None:
        """Delete a state its run left (killed, it could not), then the bundle."""
        if await asyncio.to_thread(gvisor.has_state, state, container) and self.runsc:
            code = await run_helper(gvisor.delete_argv(self.runsc, state, container),
                                    self.children, self._null, gvisor.DELETE_TIMEOUT_S)
            if code != 0:
                log.warning("gvisor_delete_failed", container=container, exit_code=code)
        await asyncio.to_thread(gvisor.remove_bundle, state, container)


class SandboxError(Exception):
    """An attempt cannot be sandboxed as its policy says; the message says why."""


def _check_exec(path: str) -> None:
    """OSError as exec would raise it for this file. A launcher's exec is execvp, which runs a
    file without a #! line with /bin/sh instead of failing: refuse it here, as the kernel would.
    """
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not os.access(path, os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
    if not head.startswith((b"#!", b"\x7fELF")):
        raise OSError(errno.ENOEXEC, os.strerror(errno.ENOEXEC), path)


async def _poll(probe: Callable[[], int | None], timeout_s: float) -> int | None:
    """The first value `probe` gives that is not None, looked for every few ms up to
    `timeout_s` (None then)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    # Nothing signals a new grandchild: /proc is looked at again (a read of a few bytes).
    while (found := probe()) is None and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.005)
    return found


def _works(argv: list[str]) -> bool:
    try:
        return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise SandboxError(f"sandbox.run_as: no user named {name!r} here") from None


def _setpriv(setpriv: str, user: pwd.struct_passwd) -> list[str]:
    """util-linux `setpriv` running what follows as this user (uid, gid and groups)."""
    return [setpriv, f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", "--"]


# An attempt's work folder: tempfile.mkdtemp(prefix="{task id}-{attempt}-") in the work root.
_WORK_FOLDER = re.compile(r"(?P<task>[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12})-(?P<attempt>\d+)-"
                          r"[^/]+")


def work_folders(root: Path) -> list[tuple[Path, str, int]]:
    """(folder, task id, attempt) of each attempt work folder under `root`: real folders only,
    never a symlink named like one (blocking)."""
    found = []
    try:
        with os.scandir(root) as entries:
            for entry in entries:
                named = _WORK_FOLDER.fullmatch(entry.name)
                if named and entry.is_dir(follow_symlinks=False):
                    found.append((Path(entry.path), named["task"], int(named["attempt"])))
    except FileNotFoundError:
        return []
    return found


def remove_work_folders(folders: Sequence[Path]) -> int:
    """Remove each folder and what it holds (blocking); how many went. rmtree works by file
    descriptor here (`avoids_symlink_attacks`): a symlink inside is unlinked, never followed,
    and one put in a folder's place is refused; a folder still mounted on is left."""
    removed = 0
    for folder in folders:
        if os.path.ismount(folder):  # a live disk quota (a dead server's went at start)
            log.warning("work_folder_mounted", path=str(folder))
            continue
        try:
            shutil.rmtree(folder)
            removed += 1
        except OSError as exc:
            log.warning("work_folder_not_removed", path=str(folder), error=str(exc))
    return removed


def _clean(launch: Launch) -> Counters:
    """The cgroups' counters once they are removed (and with them every process of the
    task); whether its quota was full; the work folder removed (blocking)."""
    counters = launch.cgroup.close() if launch.cgroup is not None else Counters()
    if launch.quota is not None:
        counters.disk_full = launch.quota.close()
    else:
        shutil.rmtree(launch.workdir, ignore_errors=True)
    return counters
