"""The wheel carries the whole page: built, installed in a fresh venv outside the checkout, served,
and its terminal typed into from Chromium."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tarfile
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, TEST_SCRIPTS, free_port
from playwright.sync_api import sync_playwright

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update"]


def clean_env() -> dict[str, str]:
    """The environment without anything that points back into a checkout."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "REMOTERUN_NODE_MODULES", "VIRTUAL_ENV")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pip wheel --no-deps` of this checkout."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True, timeout=300, cwd=out)
    (built,) = out.glob("remoterun-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv (system site-packages for the dependencies) with the wheel installed."""
    where = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(where)],
                   check=True, timeout=120)
    if sys.prefix != sys.base_prefix:  # run from a venv (`make test`): its packages, not the base's
        (site,) = where.glob("lib/python3*/site-packages")
        (site / "outer-venv.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([str(where / "bin/pip"), "install", "-q", "--no-deps", "--no-index",
                    "--force-reinstall", str(wheel)], check=True, capture_output=True,
                   timeout=300, env=clean_env(), cwd=where)
    return where


class Served:
    """`remoterun serve` of the venv, run from a folder outside the checkout."""

    def __init__(self, venv: Path, home: Path):
        self.home = home
        scripts = home / "scripts"
        if not scripts.exists():
            shutil.copytree(TEST_SCRIPTS, scripts, symlinks=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home / "server.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [str(venv / "bin/remoterun"), "serve", "--scripts", "scripts", "--archive",
                 "archive", "--db", "rr.db", "--port", str(self.port)],
                cwd=home, env=clean_env(), stdout=log, stderr=log)
        deadline = time.monotonic() + 20
        while True:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the installed server did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        """Stop the server (killed if it has not ended after its drain)."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def served(venv: Path, tmp_path: Path) -> Iterator[Served]:
    """The installed server, started."""
    server = Served(venv, tmp_path)
    yield server
    server.stop()


@pytest.mark.timeout(300)  # the module's wheel is built here
def test_wheel_contains_the_page_and_its_packages(wheel: Path) -> None:
    """The wheel holds the page and xterm.js + the fit addon at the versions package.json pins."""
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in ("page/index.html", "page/app.js", "page/vendor/xterm/lib/xterm.mjs",
                 "page/vendor/xterm/css/xterm.css",
                 "page/vendor/xterm-addon-fit/lib/addon-fit.mjs"):
        assert f"remoterun/{path}" in names, path
    pins = json.loads((ROOT / "package.json").read_text())["dependencies"]
    inside = json.loads(zipfile.ZipFile(wheel).read("remoterun/page/vendor/xterm/package.json"))
    assert inside["version"] == pins["@xterm/xterm"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_installed_wheel_serves_a_terminal_one_can_type_into(venv: Path, served: Served) -> None:
    """From the venv, outside the checkout: the page loads xterm and typing reaches a task."""
    where = subprocess.run([str(venv / "bin/python"), "-c",
                            "import remoterun; print(remoterun.__file__)"],
                           capture_output=True, text=True, env=clean_env(), cwd=served.home,
                           check=True).stdout
    assert where.startswith(str(venv)), where
    with urllib.request.urlopen(f"{served.url}/vendor/xterm/lib/xterm.mjs") as response:
        assert response.status == 200 and len(response.read()) > 100_000
    request = urllib.request.Request(
        f"{served.url}/tasks", method="POST", headers={"Content-Type": "application/json"},
        data=json.dumps({"script": "echo_stdin.sh", "interactive": True}).encode())
    with urllib.request.urlopen(request) as response:
        task = json.loads(response.read())
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                         args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(base_url=served.url)
            page.goto(f"/?task={task['id']}")
            page.wait_for_function("() => window.terminalText && terminalText().includes('ready')",
                                   timeout=15_000)
            assert page.locator("#terminal .xterm").count() == 1  # xterm.js, not the plain view
            page.locator("#terminal").click()
            page.keyboard.type("from chromium")
            page.keyboard.press("Enter")
            page.wait_for_function("() => terminalText().includes('got: from chromium')",
                                   timeout=15_000)
            page.keyboard.press("Control+D")
            page.wait_for_function("() => terminalText().includes('lines: 1')", timeout=15_000)
        finally:
            browser.close()
    assert "page_vendor_missing" not in served.log.read_text()


@pytest.mark.timeout(300)
def test_a_server_without_the_packages_says_so(venv: Path, tmp_path: Path) -> None:
    """With neither the packaged copy nor node_modules, the server logs it at start."""
    copy = tmp_path / "env"
    shutil.copytree(venv, copy, symlinks=True)
    (site,) = copy.glob("lib/python3*/site-packages")
    shutil.rmtree(site / "remoterun/page/vendor")
    for script in (copy / "bin").iterdir():  # the venv's scripts name its old path
        if script.is_file() and not script.is_symlink():
            script.write_text(script.read_text(errors="replace").replace(str(venv), str(copy)))
    home = tmp_path / "home"
    home.mkdir()
    server = Served(copy, home)
    try:
        deadline = time.monotonic() + 10
        while "page_vendor_missing" not in server.log.read_text():
            assert time.monotonic() < deadline, server.log.read_text()
            time.sleep(0.05)
        line = next(json.loads(x) for x in server.log.read_text().splitlines()
                    if "page_vendor_missing" in x)
        assert line["level"] == "warning" and "npm ci" in line["hint"]
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sdist_carries_the_page_and_builds_a_whole_wheel(tmp_path: Path) -> None:
    """The sdist holds the vendored packages, so a wheel built from it (no node_modules there)
    has them too."""
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    (sdist,) = tmp_path.glob("remoterun-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = archive.getnames()
        archive.extractall(tmp_path / "src", filter="data")
    assert any(n.endswith("remoterun/page/vendor/xterm/lib/xterm.mjs") for n in names)
    (source,) = (tmp_path / "src").iterdir()
    assert not (source / "node_modules").exists()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(tmp_path / "wheel"), str(source)], check=True, capture_output=True,
                   timeout=300, cwd=tmp_path)
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    assert "remoterun/page/vendor/xterm-addon-fit/lib/addon-fit.mjs" in \
        zipfile.ZipFile(wheel).namelist()
