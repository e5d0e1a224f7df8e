"""gVisor mode: an attempt in `runsc run` of an OCI bundle written for it, and the state folder.

Each attempt is one sandbox: `runsc --root=STATE/run run --bundle STATE/bundles/ID ID`, with
the config.json written here (spec): the host's root read-only, a fresh /dev, /proc, /tmp and
/run, the server's folders and files hidden under empty read-only tmpfs (the bind of /dev/null
for a file), the scripts folder read-only, the work folder writable, no capabilities, the
limits that rlimits carry as the spec's rlimits (enforced by gVisor's kernel, RLIMIT_NPROC
included). The script's system calls are served by gVisor's kernel (the Sentry, a user-space
process under a seccomp filter), never by the host's.

`runsc run` stays attached: its exit status is the script's (128 + N for a death by signal
N). The Sentry's process (`runsc-sandbox`, in a session of its own) forwards the signals it
gets to the container's first process, or with a terminal to the terminal's foreground
process group; so signals go to its group, once the container is running. It dies with
`runsc run` (a parent-death signal), and every process of the task dies with it. A state
left behind (a killed run) is deleted when the attempt ends, and at the server's start
every one in STATE (ours alone: the folder is the server's) is.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)
PREFIX = "rr-"  # a container's id: this and the attempt's name (task id and attempt)
SANDBOX_PROGRAM = b"runsc-sandbox"  # argv[0] of the Sentry's process
DELETE_TIMEOUT_S = 30.0
START_TIMEOUT_S = 30.0  # runsc starts its Sentry within ~0.1 s; a hung one is not waited on
_RLIMIT_NAMES = {getattr(resource, n): n for n in ("RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NOFILE",
                                                    "RLIMIT_AS", "RLIMIT_NPROC")}


def run_argv(runsc: str, state: Path, container: str, network: bool) -> list[str]:
    """`runsc run` of the bundle written for `container` (see `write_bundle`). Host cgroups
    are ours to set (the server's own folders), not runsc's."""
    return [runsc, f"--root={state / 'run'}", f"--network={'host' if network else 'none'}",
            "--ignore-cgroups", "run", "--bundle", str(state / "bundles" / container),
            container]


def mounts(scripts: Path, workdir: str, dirs: Sequence[Path], files: Sequence[Path],
           program: str | None, tmp: str = "", run: str = "") -> list[dict[str, Any]]:
    """The spec's mounts, in order (blocking: it looks for the hidden files): as bwrap's view
    (bwrap.filesystem), with `tmp` and `run` (folders of a disk quota) bound as /tmp and
    /run instead of fresh tmpfs."""
    out: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]},
        _bind(tmp, "/tmp", False) if tmp else _tmpfs("/tmp", False),
        _bind(run, "/run", False) if run else _tmpfs("/run", False)]

    def visible(path: Path, again: bool) -> bool:
        if again:
            return path.is_relative_to(scripts)
        return not path.is_relative_to("/tmp") and not any(
            path != d and path.is_relative_to(d) for d in dirs)

    for again in (False, True):
        out += [_tmpfs(str(d), True) for d in dirs if visible(d, again)]
        out += [_bind(os.devnull, str(f), True) for f in files if visible(f, again) and f.exists()]
        if not again:
            out.append(_bind(str(scripts), str(scripts), True))
            out.append(_bind(workdir, workdir, False))
            if program is not None:
                out.append(_bind(program, program, True))
    return out


def _tmpfs(where: str, readonly: bool) -> dict[str, Any]:
    options = ["nosuid", "nodev", "mode=755", *(["ro"] if readonly else [])]
    return {"destination": where, "type": "tmpfs", "source": "tmpfs", "options": options}


def _bind(source: str, where: str, readonly: bool) -> dict[str, Any]:
    return {"destination": where, "type": "bind", "source": source,
            "options": ["rbind", "nosuid", "nodev", "ro" if readonly else "rw"]}


def spec(argv: Sequence[str], env: Mapping[str, str], cwd: str, *, pty: bool,
         mounts: list[dict[str, Any]], rlimits: Sequence[tuple[int, int, int]],
         network: bool, user: tuple[int, int, Sequence[int]] = (0, 0, ())) -> dict[str, Any]:
    """The OCI runtime spec of one attempt: its process (no capabilities, no new privileges,
    the terminal its stdin if `pty`), the host's root read-only, its mounts, its namespaces
    (with `network`, runsc's --network=host: the host's, through gVisor's kernel)."""
    uid, gid, groups = user
    caps: dict[str, list[str]] = {k: [] for k in ("bounding", "effective", "inheritable",
                                                  "permitted", "ambient")}
    return {
        "ociVersion": "1.0.0",
        "process": {
            "terminal": pty, "user": {"uid": uid, "gid": gid, "additionalGids": list(groups)},
            "args": list(argv), "env": [f"{k}={v}" for k, v in env.items()], "cwd": cwd,
            "capabilities": caps, "noNewPrivileges": True,
            "rlimits": [{"type": _RLIMIT_NAMES[r], "soft": soft, "hard": hard}
                        for r, soft, hard in rlimits]},
        "root": {"path": "/", "readonly": True},
        "hostname": "remoterun",
        "mounts": mounts,
        "linux": {"namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount",
                                                        *([] if network else ["network"]))]}}


def write_bundle(state: Path, container: str, config: Mapping[str, Any]) -> None:
    """The bundle folder of `container`, with its config.json (blocking). Its environment is
    in there: the folder is the server's alone (0700)."""
    folder = state / "bundles" / container
    folder.mkdir(mode=0o700)
    fd = os.open(folder / "config.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(config, fh)


def remove_bundle(state: Path, container: str) -> None:
    """Remove the bundle folder of `container`: one file and its folder."""
    folder = state / "bundles" / container
    with contextlib.suppress(OSError):
        os.unlink(folder / "config.json")
        os.rmdir(folder)


def has_state(state: Path, container: str) -> bool:
    """Whether runsc keeps a state for `container` (one its run did not delete)."""
    return (state / "run" / f"{container}_sandbox:{container}.state").exists()


def running(state: Path, container: str) -> bool:
    """Whether the container's process has started (runsc's state file says `running`): from
    then on its Sentry forwards the signals it gets."""
    try:
        with open(state / "run" / f"{container}_sandbox:{container}.state", "rb") as fh:
            return b'"status":"running"' in fh.read()
    except OSError:
        return False


def sandbox_pid(runsc_pid: int) -> int | None:
    """The Sentry's process among `runsc run`'s children, once it has started one; 0 once
    `runsc run` has ended (or is ending) without one."""
    try:
        with open(f"/proc/{runsc_pid}/stat", "rb") as fh:
            if fh.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X"):
                return 0
        with open(f"/proc/{runsc_pid}/task/{runsc_pid}/children", "rb") as fh:
            kids = fh.read().split()
    except (OSError, IndexError):
        return 0
    for kid in kids:
        try:
            with open(f"/proc/{int(kid)}/cmdline", "rb") as fh:
                if fh.read(len(SANDBOX_PROGRAM) + 1) == SANDBOX_PROGRAM + b"\0":
                    return int(kid)
        except OSError:
            continue
    return None


def prepare_state(runsc: str | None, state: Path) -> int:
    """Make the state folder (0700), and delete every container a former server left in it
    (blocking); how many there were."""
    (state / "run").mkdir(mode=0o700, parents=True, exist_ok=True)
    (state / "bundles").mkdir(mode=0o700, exist_ok=True)
    os.chmod(state, 0o700)
    stale = sorted({p.name.split("_sandbox:", 1)[0] for p in (state / "run").iterdir()
                    if "_sandbox:" in p.name and p.name.startswith(PREFIX)})
    for container in stale:
        if runsc is not None:
            try:
                subprocess.run([runsc, f"--root={state / 'run'}", "delete", "--force",
                                container], stdin=subprocess.DEVNULL, capture_output=True,
                               timeout=DELETE_TIMEOUT_S)
            except (OSError, subprocess.TimeoutExpired) as exc:
                log.warning("gvisor_delete_failed", container=container, error=str(exc))
        for left in (state / "run").glob(f"{container}_sandbox:*"):  # its lock file
            left.unlink(missing_ok=True)
        log.info("gvisor_stale_deleted", container=container)
    for folder in (state / "bundles").iterdir():
        shutil.rmtree(folder, ignore_errors=True)
    return len(stale)


def delete_argv(runsc: str, state: Path, container: str) -> list[str]:
    """`runsc delete --force` of a container a killed run left (its Sentry killed too)."""
    return [runsc, f"--root={state / 'run'}", "delete", "--force", container]
