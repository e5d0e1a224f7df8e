"""`remoterun serve` refuses what it cannot use: one line, a non-zero exit, nothing created."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TEST_SCRIPTS


def serve(tmp_path, *args, config=""):
    """`python -m remoterun serve` in tmp_path with the test scripts; it must end by itself."""
    (tmp_path / "config.toml").write_text(config)
    if not (tmp_path / "scripts").exists():
        (tmp_path / "scripts").symlink_to(TEST_SCRIPTS)
    return subprocess.run([sys.executable, "-m", "remoterun", "serve", "--config",
                           str(tmp_path / "config.toml"), "--scripts", "scripts", *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)


def created(tmp_path):
    """What the server made in tmp_path (besides what the test put there)."""
    return sorted(p.name for p in tmp_path.iterdir() if p.name not in ("config.toml", "scripts",
                                                                          "file"))


def test_port_in_use(tmp_path):
    """A port another socket holds: one line naming it, exit 1, no database or archive."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        ran = serve(tmp_path, "--port", str(port))
    assert ran.returncode == 1
    assert ran.stderr.splitlines() == [
        f"remoterun: cannot start: cannot listen on 127.0.0.1:{port}: Address already in use"]
    assert created(tmp_path) == []


@pytest.mark.parametrize(("config", "message"), [
    ("[server]\nport = 70000\n", "server.port: must be between 0 and 65535, got 70000"),
    ("[server]\nport = -1\n", "server.port: must be positive, got -1"),
    ('[server]\nport = "http"\n', "server.port: expected a number, got 'http'"),
])
def test_bad_port(tmp_path, config, message):
    """A port out of range or not a number: one line naming the key, exit 2, nothing created."""
    ran = serve(tmp_path, config=config)
    assert ran.returncode == 2
    assert ran.stderr.splitlines() == [f"remoterun: config error: {message}"]
    assert created(tmp_path) == []


@pytest.mark.parametrize(("args", "message"), [
    (["--db", "file/rr.db"], "paths.db: {tmp}/file is not a directory"),
    (["--archive", "file/archive"], "paths.archive: {tmp}/file is not a directory"),
    (["--db", "."], "paths.db: {tmp} is a directory"),
])
def test_unusable_paths(tmp_path, args, message):
    """A database or archive path that cannot be made: one line naming it, exit 1."""
    (tmp_path / "file").write_text("not a folder")
    ran = serve(tmp_path, "--port", "0", *args)
    assert ran.returncode == 1
    assert ran.stderr.splitlines() == [
        "remoterun: cannot start: " + message.format(tmp=tmp_path)]
    assert created(tmp_path) == []


def test_unreadable_scripts(tmp_path):
    """A scripts path that is not a folder: one line, exit 2."""
    (tmp_path / "scripts").write_text("")
    ran = serve(tmp_path, "--port", "0")
    assert ran.returncode == 2
    assert ran.stderr.splitlines() == [
        f"remoterun: config error: paths.scripts: {tmp_path}/scripts is not a directory"]


def _environ(pid):
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def test_serve_runs_on_libc_malloc(server):
    """`serve` re-executes itself (same PID) on glibc's malloc, whose trim hands freed pages
    back: on pymalloc, a few survivors pin whole arenas after many clients leave."""
    server.start()
    env = _environ(server.proc.pid)
    assert env.get("PYTHONMALLOC") == "malloc"
    assert server.proc.poll() is None


def test_serve_keeps_a_chosen_allocator(server, monkeypatch):
    """A PYTHONMALLOC the operator set is theirs: the value kept (the re-exec that empties
    the environment block of secrets keeps it)."""
    monkeypatch.setenv("PYTHONMALLOC", "pymalloc")
    server.start()
    assert _environ(server.proc.pid).get("PYTHONMALLOC") == "pymalloc"
