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
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog

from remoterun.config import ResourceLimits, SandboxConfig, Settings
from remoterun.isolation import bwrap, docker, gvisor, modes, seccomp
from remoterun.isolation.launch import Launch, Policy, SandboxError
from remoterun.isolation.limits import Cgroups, Counters, Quota, limit_error
from remoterun.isolation.workdirs import clean, remove_work_folders, work_folders
from remoterun.spawn import Children, run_helper

__all__ = ["ALLOWED_ENV", "Launch", "Policy", "Sandbox", "SandboxError", "allowed_env",
           "remove_work_folders", "work_folders"]

log = structlog.get_logger(__name__)
ALLOWED_ENV = ("PATH", "HOME", "LANG", "TZ")  # and every LC_*


def allowed_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables of the server's environment a task may see."""
    return {k: v for k, v in environ.items() if k in ALLOWED_ENV or k.startswith("LC_")}


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
        self.hidden: tuple[list[Path], list[Path]] = ([], [])  # from every view
        self.prlimit: str | None = None
        self.setsid = "setsid"
        self.sh = "/bin/sh"
        self.setpriv: str | None = None
        self.cgroups = Cgroups({})
        self.quotas = False  # disk_bytes can be enforced here (a tmpfs per attempt)
        self.auto = "none"
        self.work_root = settings.work_dir or Path("remoterun-work")  # in the temp folder
        self.scripts = settings.scripts_dir  # resolved at start
        self.bwrap_head: list[str] = []  # bwrap's filesystem before the work folder, and after
        self.bwrap_tail: list[str] = []
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
        self.hidden = (dirs, files)
        self.runsc = shutil.which("runsc")
        if self.runsc is not None:
            gvisor.prepare_state(self.runsc, self.gvisor_state)
        self.bwrap_head, self.bwrap_tail = bwrap.filesystem(self.scripts, dirs, files)
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
                modes.bwrap_launch(self, launch, cwd, pty, user)
            elif policy.mode == "docker":
                modes.docker_launch(self, launch, cwd, pty, name)
            elif policy.mode == "gvisor":  # its bundle written: on a thread
                await asyncio.to_thread(modes.gvisor_launch, self, launch, cwd, pty, name)
            else:
                if launch.quota is not None:  # /tmp stays the host's: its variable points in
                    launch.env["TMPDIR"] = str(launch.quota.tmp)
                modes.unsandboxed(self, launch, user)
        except BaseException:
            await self.finish(launch, None, None)
            raise
        return launch

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
            clean(launch)
            raise
        launch.env = {**self.base_env, **policy.env, **env, "RR_WORKDIR": str(launch.workdir)}
        return launch

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
            counters = await asyncio.to_thread(clean, launch)
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

