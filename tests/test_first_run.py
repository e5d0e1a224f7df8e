"""`remoterun serve` in an empty folder, no config: it starts and says where it keeps what."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, free_port


def _wait_for_page(proc: subprocess.Popen[str], url: str, timeout: float = 20.0) -> str:
    """The page's HTML once the server answers, or fail with what the server said."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {proc.communicate()}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                return str(response.read().decode())
        except OSError:
            time.sleep(0.05)
    raise AssertionError("the page did not answer")


@pytest.fixture
def first_run(tmp_path: Path):
    """`remoterun serve --port N` started in an empty folder; (folder, url, process)."""
    folder = tmp_path / "empty"
    folder.mkdir()
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    env.pop("REMOTERUN_SECRET_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "remoterun", "serve", "--port", str(port)],
                            cwd=folder, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    yield folder, f"http://127.0.0.1:{port}/", proc
    if proc.poll() is None:
        proc.terminate()
        proc.wait(timeout=20)


def test_first_run_starts_and_says_where_things_are(first_run):
    """No config in an empty folder: the server starts, makes an empty scripts folder, and
    its first lines name the scripts, database, archive and key by absolute path, say how to
    add a script, and give the page's address."""
    folder, url, proc = first_run
    assert "<html" in _wait_for_page(proc, url).lower()
    proc.terminate()
    _, err = proc.communicate(timeout=20)
    assert (folder / "scripts").is_dir()
    for name in ("scripts", "remoterun.db", "archive", "remoterun-secret.key"):
        assert f"{folder / name}" in err, (name, err)
    assert "chmod +x" in err
    assert url in err
    assert "first run" in err


def test_missing_scripts_with_a_config_says_what_to_create(tmp_path):
    """A config whose scripts folder does not exist: exit 2 and the exact folder to create."""
    (tmp_path / "config.toml").write_text('[paths]\nscripts = "mine"\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ran = subprocess.run([sys.executable, "-m", "remoterun", "serve", "--port", "0"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 2
    assert ran.stderr.splitlines() == [
        f"remoterun: config error: paths.scripts: {tmp_path}/mine does not exist; "
        f"create it (mkdir -p {tmp_path}/mine) and put executable scripts in it"]
