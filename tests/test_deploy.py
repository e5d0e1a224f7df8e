"""Deployment files: the Dockerfile builds (from a local Debian image) and its container answers
/healthz and runs a script; the systemd unit verifies and is hardened."""

from __future__ import annotations

import json
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
    """deploy/remoterun.service passes `systemd-analyze verify` and scores OK on `security`."""
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
    assert float(score.group(1)) <= 2.0, security.stdout
