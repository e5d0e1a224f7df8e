"""A Debian bookworm image built locally (no registry): debootstrap, cached, `docker import`ed.

The rootfs is cached under /var/cache/remoterun-test/ (the path the suite's Docker fixtures share),
built once under a file lock so parallel sessions do not debootstrap twice.
"""

from __future__ import annotations

import fcntl
import re
import shutil
import subprocess
import time
from pathlib import Path

CACHE = Path("/var/cache/remoterun-test")
ROOTFS = CACHE / "bookworm-python"
IMAGE = "remoterun-test/bookworm-python:latest"
PACKAGES = "python3,python3-venv,ca-certificates"


def apt_mirror() -> str:
    """The Debian mirror this machine's apt uses (never a hostname written in the repository)."""
    for path in sorted(Path("/etc/apt").glob("sources.list*")) + \
            sorted(Path("/etc/apt/sources.list.d").glob("*")):
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            found = re.match(r"\s*(?:URIs:|deb)\s+(?:\[[^]]*\]\s+)?(\S+/debian)/?\s*$", line) or \
                re.match(r"\s*(?:URIs:|deb)\s+(?:\[[^]]*\]\s+)?(\S+/debian)/?\s", line)
            if found:
                return found.group(1)
    raise RuntimeError("no Debian mirror found in /etc/apt")


def rootfs() -> Path:
    """The cached minbase bookworm root with python3, debootstrapped on first use."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / "bookworm-python.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (ROOTFS / "usr/bin/python3").exists():
            partial = CACHE / "bookworm-python.partial"
            shutil.rmtree(partial, ignore_errors=True)
            subprocess.run(["debootstrap", "--variant=minbase", f"--include={PACKAGES}",
                            "bookworm", str(partial), apt_mirror()],
                           check=True, capture_output=True, timeout=1800)
            partial.rename(ROOTFS)
    return ROOTFS


def imported(docker: list[str]) -> str:
    """The rootfs as a local image (imported once); its name."""
    root = rootfs()
    with (CACHE / "import.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if subprocess.run([*docker, "image", "inspect", IMAGE], capture_output=True).returncode:
            with subprocess.Popen(["tar", "-C", str(root), "-c", "."],
                                  stdout=subprocess.PIPE) as tar:
                subprocess.run([*docker, "import", "-", IMAGE], stdin=tar.stdout, check=True,
                               capture_output=True, timeout=600)
    return IMAGE


DOCKER = ["/usr/bin/docker"] if Path("/usr/bin/docker").exists() else ["docker"]


def docker_ok() -> bool:
    """Whether a Docker daemon answers."""
    return subprocess.run([*DOCKER, "info"], capture_output=True, timeout=60).returncode == 0


# The daemons started here, held so that their Popen objects are not collected while they run
# (Popen.__del__ warns about a running child, and pytest turns that into an error).
_STARTED: list[subprocess.Popen] = []


def ensure_dockerd(timeout_s: float = 90.0) -> list[str]:
    """The docker command, with a daemon running: the one already there (another fixture's,
    the machine's) or one started here and left running for whoever needs it next."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / "dockerd.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if docker_ok():
            return DOCKER
        with (CACHE / "dockerd.log").open("ab") as log:
            _STARTED.append(subprocess.Popen(["dockerd"], stdout=log, stderr=log,
                                             stdin=subprocess.DEVNULL, start_new_session=True))
        deadline = time.monotonic() + timeout_s
        while not docker_ok():
            if time.monotonic() > deadline:
                raise RuntimeError(f"dockerd did not start: see {CACHE / 'dockerd.log'}")
            time.sleep(0.5)
    return DOCKER
