"""Docker mode: an attempt's `docker run` command, and removing its container.

`docker run --rm -i [-t] --init`: the client relays stdin, stdout/stderr (or the PTY) and the
signals it gets (`--sig-proxy`, its default) to the container, whose init (`--init`) passes
them on and reaps. A killed client (SIGKILL after the grace) does not stop its container: the
attempt removes it by name (`docker rm -f`) whenever the run did not end by itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import structlog

from remoterun.config import ResourceLimits
from remoterun.spawn import Children, run_helper

log = structlog.get_logger(__name__)
CLIENT_ENV = ("DOCKER_HOST", "DOCKER_CONTEXT", "DOCKER_CONFIG", "DOCKER_CERT_PATH",
              "DOCKER_TLS_VERIFY")  # the client's own settings, from the server's environment
RM_TIMEOUT_S = 30.0
# A daemon older than API 1.42 (Debian's docker.io 20.10) ignores the console size the client
# sends with `create` and sets it only by a resize after the start, so a script could read
# 0x0 at its first line. In a PTY the script is started by this fixed program, which waits
# (at most ~1 s) until the terminal has a size and then execs the script's argv as given: no
# parameter ever passes through the shell. Without `stty` in the image it starts at once.
TTY_WAIT = ('n=0; while [ "$(stty size 2>/dev/null)" = "0 0" ] && [ "$n" -lt 100 ]; '
            'do sleep 0.01; n=$((n+1)); done; exec "$@"')


def run_argv(docker: str, name: str, image: str, argv: Sequence[str], *,
             env: Mapping[str, str], scripts: str, workdir: str, cwd: str, pty: bool,
             network: bool, user: str, limits: ResourceLimits,
             program: Sequence[str] = (), tmp: str = "") -> list[str]:
    """`docker run` of argv in `image`: the scripts folder read-only and the work folder
    writable at their own paths, `env`'s names passed (their values stay in the client's
    environment, never in argv where `ps` shows them), the limits as Docker's flags. With
    `tmp` (a folder of the attempt's disk quota, which also holds the work folder) as its
    /tmp, the container's own filesystem is read-only: nothing it writes reaches the
    daemon's disk beyond the quota."""
    out = [docker, "run", "--rm", "-i", *(["-t"] if pty else []), "--init", "--name", name,
           "-v", f"{scripts}:{scripts}:ro", "-v", f"{workdir}:{workdir}", *program, "-w", cwd]
    if tmp:
        out += ["--read-only", "-v", f"{tmp}:/tmp"]
    if not network:
        out += ["--network", "none"]
    if user:
        out += ["--user", user]
    out += limit_flags(limits)
    for key in env:
        if key != "PATH":  # the image's own
            out += ["-e", key]
    if pty:
        argv = ["sh", "-c", TTY_WAIT, "sh", *argv]
    return [*out, image, *argv]


def limit_flags(limits: ResourceLimits) -> list[str]:
    """The limits as `docker run` flags (memory and processes for the whole container)."""
    out = []
    if limits.memory_bytes:
        out += [f"--memory={limits.memory_bytes}", f"--memory-swap={limits.memory_bytes}"]
    if limits.processes:
        out.append(f"--pids-limit={limits.processes}")
    if limits.cpu_seconds:
        out += ["--ulimit", f"cpu={limits.cpu_seconds}:{limits.cpu_seconds + 1}"]
    if limits.file_bytes:
        out += ["--ulimit", f"fsize={limits.file_bytes}:{limits.file_bytes}"]
    if limits.open_files:
        out += ["--ulimit", f"nofile={limits.open_files}:{limits.open_files}"]
    return out


def client_env(environ: Mapping[str, str]) -> dict[str, str]:
    """What the docker client needs of the server's environment to find its daemon."""
    return {k: v for k, v in environ.items() if k in CLIENT_ENV}


async def remove(docker: str, name: str, children: Children, null: int) -> None:
    """`docker rm -f NAME` (spawn.run_helper); a failure is logged."""
    code = await run_helper([docker, "rm", "-f", name], children, null, RM_TIMEOUT_S)
    if code is None:
        log.warning("docker_rm_failed", container=name)
