"""Deployment files: the Dockerfile builds (from a local Debian image) and its container answers
/healthz and runs a script; the systemd unit verifies and is hardened."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, free_port
from debian_image import ensure_dockerd, imported

from remoterun import config


def http_json(url: str, body: dict[str, object] | None = None) -> dict[str, object]:
    """GET (or POST a JSON body to) url; the JSON answer."""
    request = urllib.request.Request(url, method="POST" if body is not None else "GET",
                                     headers={"Content-Type": "application/json"},
                                     data=json.dumps(body).encode() if body is not None else None)
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def docker() -> list[str]:
    """The docker command with a daemon running (started here if none is)."""
    return ensure_dockerd()


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_image_builds_and_serves(docker: list[str], tmp_path: Path) -> None:
    """`docker build` of the Dockerfile on a local Debian image; `docker run` answers /healthz
    and runs an example script end to end."""
    context = tmp_path / "context"
    context.mkdir()
    for name in ("Dockerfile", ".dockerignore"):
        shutil.copy(ROOT / name, context / name)
    shutil.copytree(ROOT / "scripts", context / "scripts")
    (context / "deploy").mkdir()
    shutil.copy(ROOT / "deploy/container.toml", context / "deploy/container.toml")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "-w",
                    str(context / "dist/wheels"), str(ROOT)],
                   check=True, capture_output=True, timeout=600, cwd=tmp_path)
    tag = f"remoterun-test/app:{tmp_path.name.lower()}"
    # No network while building (none is needed: python3 is in BASE, the wheels in the
    # context), and host networking to run: neither needs the daemon's bridge.
    built = subprocess.run([*docker, "build", "--network", "none",
                            "--build-arg", f"BASE={imported(docker)}",
                            "-t", tag, str(context)], capture_output=True, text=True,
                           timeout=900, env={"PATH": "/usr/sbin:/usr/bin:/bin",
                                             "DOCKER_BUILDKIT": "0"})
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    port = free_port()
    name = f"remoterun-test-{port}"
    subprocess.run([*docker, "run", "-d", "--rm", "--name", name, "--network", "host", tag,
                    "serve", "--config", "/etc/remoterun/config.toml", "--port", str(port)],
                   check=True, capture_output=True, timeout=120)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                health = http_json(f"{base}/healthz")
                break
            except OSError:
                assert time.monotonic() < deadline, subprocess.run(
                    [*docker, "logs", name], capture_output=True, text=True).stderr
                time.sleep(0.2)
        assert health["status"] == "ok"
        task = http_json(f"{base}/tasks", {"script": "hello.sh", "params": {"name": "box"}})
        deadline = time.monotonic() + 30
        while http_json(f"{base}/tasks/{task['id']}")["status"] != "success":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        with urllib.request.urlopen(f"{base}/tasks/{task['id']}/output", timeout=5) as out:
            assert b"box" in out.read()
        with urllib.request.urlopen(f"{base}/vendor/xterm/lib/xterm.mjs", timeout=5) as js:
            assert js.status == 200
        user = subprocess.run([*docker, "exec", name, "id", "-un"], capture_output=True,
                              text=True, timeout=60).stdout.strip()
        assert user == "remoterun"
    finally:
        subprocess.run([*docker, "stop", "-t", "5", name], capture_output=True, timeout=60)
        subprocess.run([*docker, "rmi", "-f", tag], capture_output=True, timeout=120)


def test_systemd_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    """deploy/remoterun.service passes `systemd-analyze verify` and scores OK on `security`
    (2.6: the sandbox's user namespaces and mount calls cost 0.9 over the 1.7 of a unit that
    refused them, and with them the sandbox)."""
    unit = (ROOT / "deploy/remoterun.service").read_text()
    for option in ("NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes",
                   "PrivateTmp=yes", "CapabilityBoundingSet=", "SystemCallFilter=@system-service",
                   "StateDirectory=remoterun", "KillSignal=SIGTERM"):
        assert re.search(rf"^{re.escape(option)}", unit, re.M), option
    # verify insists that ExecStart exists: point it at this machine's remoterun.
    here = shutil.which("remoterun") or f"{sys.executable} -m remoterun"
    local = tmp_path / "remoterun.service"
    local.write_text(unit.replace("/opt/remoterun/bin/remoterun", here))
    verified = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True,
                              text=True, timeout=60)
    assert verified.returncode == 0, verified.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(local)],
                              capture_output=True, text=True, timeout=60)
    score = re.search(r"Overall exposure level for remoterun.service: ([\d.]+)", security.stdout)
    assert score is not None, security.stdout[-2000:] + security.stderr
    assert float(score.group(1)) <= 2.6, security.stdout


UNIT = ROOT / "deploy/remoterun.service"
NAMESPACES = {"CLONE_NEWUSER": "user", "CLONE_NEWNS": "mnt", "CLONE_NEWPID": "pid",
              "CLONE_NEWIPC": "ipc", "CLONE_NEWNET": "net", "CLONE_NEWUTS": "uts",
              "CLONE_NEWCGROUP": "cgroup", "CLONE_NEWTIME": "time"}


def unit_settings() -> dict[str, list[str]]:
    """The unit's `Key=value` lines, every value of a repeated key kept in order."""
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def install_steps() -> list[list[str]]:
    """The install commands the unit's header comment gives, each split into words."""
    lines = [line[1:].strip() for line in UNIT.read_text().splitlines()
             if line.startswith("#   ")]
    return [step.split("#")[0].split() for line in lines for step in line.split("&&")]


def syscall_groups() -> dict[str, list[str]]:
    """systemd's @groups and their members (names or other @groups), as this systemd has them."""
    listed = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True,
                            text=True, timeout=60, check=True).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] = []
    for line in listed.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.split()[0], [])
        elif line.strip() and not line.strip().startswith("#"):
            current.append(line.strip())
    return groups


def allowed_syscalls(filters: list[str]) -> set[str]:
    """The system calls an allow-list SystemCallFilter= (its lines together) lets through."""
    groups = syscall_groups()

    def expand(name: str) -> set[str]:
        if not name.startswith("@"):
            return {name}
        return set().union(*(expand(member) for member in groups[name]))

    assert not any(f.startswith("~") for f in filters), "an allow-list is expected"
    return set().union(*(expand(name) for f in filters for name in f.split()))


def traced_bwrap(tmp_path: Path) -> str:
    """strace of bwrap run as the server runs it (its flags and mounts), by an unprivileged
    user as the service's is: the system calls and namespaces the sandbox needs."""
    from remoterun.isolation.bwrap import filesystem

    head, tail = filesystem(Path("/usr/bin"), [], [])
    argv = ["bwrap", "--die-with-parent", "--unshare-pid", "--unshare-ipc", "--unshare-net",
            "--new-session", "--cap-drop", "ALL", *head, *tail, "--", "true"]
    user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if (
        os.geteuid() == 0) else []
    trace = tmp_path / "bwrap.trace"
    ran = subprocess.run(["strace", "-f", "-qq", "-o", str(trace), *user, *argv],
                         capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    return trace.read_text()


def test_systemd_unit_lets_the_sandbox_work(tmp_path: Path) -> None:
    """Every namespace and system call bwrap needs (traced, as an unprivileged user) is
    allowed by the unit's RestrictNamespaces= and SystemCallFilter=, and nothing is mounted
    over /proc (the kernel then refuses bwrap a new proc)."""
    trace = traced_bwrap(tmp_path)
    unit = unit_settings()
    (namespaces,) = unit["RestrictNamespaces"]
    needed = {NAMESPACES[flag] for flag in re.findall(r"CLONE_NEW[A-Z]+", trace)}
    assert needed and needed <= set(namespaces.split()), (needed, namespaces)
    calls = set(re.findall(r"^\d+\s+([a-z0-9_]+)\(", trace, re.M))
    assert calls - allowed_syscalls(unit["SystemCallFilter"]) == set()
    for over_proc in ("ProtectKernelTunables", "ProtectKernelLogs", "ProcSubset"):
        assert unit.get(over_proc, ["no"])[-1] in ("no", "all"), over_proc


def test_systemd_unit_paths_match_its_config() -> None:
    """The unit's absolute paths, the config its comment installs and the folders it makes
    agree: scripts in ReadOnlyPaths= and made by a step, data in StateDirectory=, the config
    where ExecStart= reads it, and Documentation= files installed from this checkout."""
    unit = unit_settings()
    steps = install_steps()
    (exec_start,) = unit["ExecStart"]
    program, *args = exec_start.split()
    assert Path(program).is_absolute() and Path(unit["WorkingDirectory"][0]).is_absolute()
    config_path = args[args.index("--config") + 1]
    (source,) = [s[-2] for s in steps if s[:1] == ["install"] and s[-1] == config_path]
    settings = config.load(ROOT / source)
    state = Path("/var/lib") / unit["StateDirectory"][0]
    assert settings.db_path.parent == state and settings.archive_dir.is_relative_to(state)
    assert unit["WorkingDirectory"] == [str(state)]
    assert [p.lstrip("-") for p in unit["ReadOnlyPaths"]] == [str(settings.scripts_dir)]
    assert any(s[:2] == ["install", "-d"] and s[-1] == str(settings.scripts_dir) for s in steps)
    docs = [s for s in steps if s[:1] == ["install"] and "/usr/share/doc/remoterun" in s]
    for url in unit["Documentation"][0].split():
        assert url.startswith(("https://", "file:///usr/share/doc/remoterun/")), url
        name = url.rsplit("/", 1)[1]
        assert any((ROOT / f).is_file() and Path(f).name == name for s in docs for f in s), url
