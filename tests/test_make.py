"""The README's first command, `make serve`, in a fresh clone with the distribution's Python."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_PATH = "/usr/bin:/bin"
# The machine's package sources (pip, npm settings and proxies) pass; PATH is the distribution's.
PASSED = ("HOME", "LANG", "PIP_", "NPM_CONFIG_", "npm_config_", "HTTP_PROXY", "HTTPS_PROXY",
          "NO_PROXY", "http_proxy", "https_proxy", "no_proxy", "SSL_CERT_FILE")


def distribution_env() -> dict[str, str]:
    """This environment with PATH limited to the distribution's folders and no Python settings."""
    env = {k: v for k, v in os.environ.items() if k.startswith(PASSED)}
    return {**env, "PATH": SYSTEM_PATH}


def serve_until_page(clone: Path, port: int, deadline_s: float) -> tuple[float, str]:
    """Run `make serve` until the page answers; the seconds it took and make's output."""
    log = clone / "make.log"
    started = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(["make", "serve", f"SERVE_ARGS=--port {port}"], cwd=clone,
                                env=distribution_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as page:
                    if page.status == 200 and b"<html" in page.read().lower():
                        return time.monotonic() - started, log.read_text()
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() - started < deadline_s, log.read_text()
            time.sleep(0.1)
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Ctrl+C to make's process group, then SIGKILL if it lingers."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """A fresh `git clone` of this checkout's HEAD."""
    where = tmp_path / "remoterun"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(where)], check=True, timeout=120)
    return where


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_make_serve_on_the_distribution_python(clone: Path) -> None:
    """`make serve` with PATH=/usr/bin:/bin (an externally managed python3) makes .venv with the
    runtime only and serves the page; a second `make serve` skips pip and npm and serves fast."""
    assert Path("/usr/bin/python3").exists()
    managed = subprocess.run(["/usr/bin/python3", "-c", "import sysconfig; print("
                              "sysconfig.get_path('stdlib'))"], capture_output=True, text=True,
                             check=True).stdout.strip()
    assert (Path(managed) / "EXTERNALLY-MANAGED").is_file()  # PEP 668: no system-wide pip
    first_s, first = serve_until_page(clone, free_port(), deadline_s=600)
    assert "pip install" in first and "npm ci" in first
    venv_python = clone / ".venv/bin/python"
    assert subprocess.run([str(venv_python), "-c", "import aiohttp, remoterun"]).returncode == 0
    no_tests = subprocess.run([str(venv_python), "-c", "import pytest"], capture_output=True)
    assert no_tests.returncode != 0  # the runtime only: tests get theirs in `make test`
    again_s, again = serve_until_page(clone, free_port(), deadline_s=60)
    assert "pip install" not in again and "npm ci" not in again, again
    print(f"make serve: first {first_s:.1f} s, again {again_s:.1f} s")
    assert again_s < 10, again  # about 3 s on an idle machine; 2 shared cores here
