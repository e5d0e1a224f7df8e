"""The per-mode steps of an attempt's launch: bwrap, Docker, gVisor and none (unsandboxed).

Each turns a Launch made by `Sandbox.prepare` (its work folder, cgroups and quota in place)
into the argv that runs the script that way, with the programs the Sandbox found at start.
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path
from typing import TYPE_CHECKING

from remoterun.isolation import bwrap, docker, gvisor, seccomp
from remoterun.isolation.launch import Launch, SandboxError
from remoterun.isolation.limits import prlimit_argv, rlimits

if TYPE_CHECKING:
    from remoterun.isolation.sandbox import Sandbox


def bwrap_launch(box: Sandbox, launch: Launch, cwd: Path, pty: bool,
                 user: pwd.struct_passwd | None) -> None:
    """bwrap around the script: its filesystem view, namespaces, seccomp filter and the
    pipes by which its first process is bounded before it forks the script (launch.py)."""
    assert box.bwrap is not None
    policy, wd = launch.policy, str(launch.workdir)
    launch.env["HOME"] = wd
    launch.pairs = rlimits(policy.limits, frozenset(launch.cgroup.paths)
                           if launch.cgroup is not None else frozenset())
    info_r, info_w = os.pipe()
    block_r, block_w = os.pipe()
    launch._fds = dict(info_r=info_r, info_w=info_w, block_r=block_r, block_w=block_w)
    os.set_blocking(info_r, False)
    argv = [box.bwrap, "--die-with-parent", "--unshare-pid", "--unshare-ipc",
            "--new-session", "--cap-drop", "ALL", "--info-fd", str(info_w),
            "--block-fd", str(block_r)]
    if not policy.network:
        argv.append("--unshare-net")
    argv += _seccomp(box, launch)
    head = box.bwrap_head
    if launch.quota is not None:  # /tmp and /run: folders of its quota, not tmpfs of their own
        head = bwrap.in_quota(head, str(launch.quota.tmp), str(launch.quota.run))
    argv += [*head, "--bind", wd, wd, *_outside(box.scripts, launch.argv[0], "--ro-bind"),
             *box.bwrap_tail, "--chdir", str(cwd), "--"]
    if pty:  # the terminal becomes the script's, in a session of its own inside
        argv += [box.setsid, "--ctty"]
    launch.argv = [*argv, *launch.argv]
    if user is not None:  # bwrap then runs unprivileged, in a user namespace
        launch.argv = [*_setpriv(needs(box.setpriv, "setpriv"), user), *launch.argv]
    launch.pass_fds = tuple(launch._fds[n] for n in ("info_w", "block_r", "seccomp")
                            if n in launch._fds)
    launch.take_ctty = False
    launch.signal_exit_codes = True


def _seccomp(box: Sandbox, launch: Launch) -> list[str]:
    """bwrap's options loading the policy's filter just before it execs the script (the
    program on a pipe of the launch's); none when it is off."""
    try:
        program = box.filters.program(launch.policy.seccomp)
    except KeyError:
        raise SandboxError(box.filters.unavailable or f"its seccomp profile "
                           f"{launch.policy.seccomp!r} was not loaded at start") from None
    if program is None:
        return []
    launch._fds["seccomp"] = seccomp.pipe_of(program)
    return ["--seccomp", str(launch._fds["seccomp"])]


def unsandboxed(box: Sandbox, launch: Launch, user: pwd.struct_passwd | None) -> None:
    """Mode none: the script behind its rlimits (prlimit), its user (setpriv) and, first,
    the join of its cgroups, all made by exec'ing one program after the other."""
    cgroup = launch.cgroup
    pairs = rlimits(launch.policy.limits,
                    frozenset(cgroup.paths) if cgroup is not None else frozenset())
    if pairs:
        launch.argv = [*prlimit_argv(needs(box.prlimit, "prlimit"), pairs), *launch.argv]
    if user is not None:
        launch.argv = [*_setpriv(needs(box.setpriv, "setpriv"), user), *launch.argv]
    if cgroup is not None:
        launch.argv = [*cgroup.join_argv(box.sh), *launch.argv]


def docker_launch(box: Sandbox, launch: Launch, cwd: Path, pty: bool, name: str) -> None:
    """`docker run` of the policy's image (docker.py), its client's environment added."""
    assert box.docker is not None
    policy, wd = launch.policy, str(launch.workdir)
    launch.env["HOME"] = wd
    launch.container = f"rr-{name}"
    launch.argv = docker.run_argv(
        box.docker, launch.container, policy.image, launch.argv, env=launch.env,
        scripts=str(box.scripts), workdir=wd, cwd=str(cwd), pty=pty,
        program=_outside(box.scripts, launch.argv[0], "-v"),
        network=policy.network, user=policy.run_as, limits=policy.limits,
        tmp=str(launch.quota.tmp) if launch.quota is not None else "")
    launch.env.update(docker.client_env(os.environ))
    launch.signal_exit_codes = True


def gvisor_launch(box: Sandbox, launch: Launch, cwd: Path, pty: bool, name: str) -> None:
    """`runsc run` of a bundle written now (blocking); the task's cgroups joined first
    (they bound the Sentry, which holds all of the script's memory)."""
    assert box.runsc is not None
    policy, wd, user, quota = launch.policy, str(launch.workdir), launch.user, launch.quota
    launch.env["HOME"] = wd
    cgroup = launch.cgroup
    program = None if Path(launch.argv[0]).is_relative_to(box.scripts) else launch.argv[0]
    mounts = gvisor.mounts(box.scripts, wd, *box.hidden, program,
                           tmp=str(quota.tmp) if quota else "",
                           run=str(quota.run) if quota else "")
    ids = (user.pw_uid, user.pw_gid, os.getgrouplist(user.pw_name, user.pw_gid)) \
        if user is not None else (0, 0, ())
    config = gvisor.spec(launch.argv, launch.env, str(cwd), pty=pty, mounts=mounts,
                         rlimits=rlimits(policy.limits, frozenset(cgroup.paths)
                                         if cgroup is not None else frozenset()),
                         network=policy.network, user=ids)
    launch.container, launch.state = f"{gvisor.PREFIX}{name}", box.gvisor_state
    gvisor.write_bundle(box.gvisor_state, launch.container, config)
    launch.argv = gvisor.run_argv(box.runsc, box.gvisor_state, launch.container,
                                  policy.network)
    if cgroup is not None:
        launch.argv = [*cgroup.join_argv(box.sh), *launch.argv]
    # runsc's own environment: the script's is in the spec.
    launch.env = {"PATH": os.environ.get("PATH", os.defpath)}
    launch.take_ctty = False  # nor does the Sentry's: typed ^C is the run's (typed_signals)
    launch.typed_signals = pty
    launch.signal_exit_codes = True


def _outside(scripts: Path, program: str, flag: str) -> list[str]:
    """The mount that shows a program outside the scripts folder (an integrity check's
    private copy, under the database's hidden folder) read-only at its own path."""
    if Path(program).is_relative_to(scripts):
        return []
    if flag == "-v":
        return [flag, f"{program}:{program}:ro"]
    return [flag, program, program]


def needs(path: str | None, program: str) -> str:
    """The path of a util-linux program this launch needs; SandboxError if it was not found."""
    if path is None:
        raise SandboxError(f"util-linux {program} is not installed, and this task's "
                           f"limits or run_as need it")
    return path


def _setpriv(setpriv: str, user: pwd.struct_passwd) -> list[str]:
    """util-linux `setpriv` running what follows as this user (uid, gid and groups)."""
    return [setpriv, f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", "--"]
